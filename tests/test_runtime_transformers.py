"""Transformers models end to end: pruned BERT / GPT-2 (Linear and Conv1D) in, sparse kernels out, same outputs."""

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from sparsearch.cli import app
from sparsearch.kernels.modules import FusedActivation
from sparsearch.runtime import SparseLinear
from sparsearch.runtime.hf import convert_transformers, load_transformers, sample_inputs, save_transformers

transformers = pytest.importorskip("transformers")
FORCE = {"batch_sizes": (4,), "min_speedup": 1e-9, "repeats": 1}


def prune_all(model, sparsity=0.9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if type(module).__name__ in ("Linear", "Conv1D") and not name.endswith("lm_head"):
                module.weight.mul_(torch.rand(module.weight.shape, generator=generator) >= sparsity)
    return model.eval()


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=101, n_positions=64)
    return prune_all(transformers.GPT2LMHeadModel(config))


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=101, max_position_embeddings=64)
    return prune_all(transformers.BertModel(config))


def test_gpt2_conv1d_and_attention_go_sparse_and_generate_the_same_tokens(tmp_path):
    model = tiny_gpt2()
    fast, _, report = convert_transformers(model, **FORCE)
    by_name = {d.name: d for d in report.layers}
    for name in ("transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.1.mlp.c_fc",
                 "transformer.h.1.mlp.c_proj"):
        assert by_name[name].layer_type == "Conv1D" and by_name[name].sparse
        assert isinstance(fast.get_submodule(name), SparseLinear)
    assert not by_name["lm_head"].sparse and "tied" in by_name["lm_head"].reason
    assert "matches the original" in report.output_check
    ids = torch.tensor([[5, 17, 42, 8]])
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
        expected = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(fast.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0), expected)
    save_transformers(fast, tmp_path / "out", report=report)
    loaded, _ = load_transformers(tmp_path / "out")
    assert isinstance(loaded.transformer.h[0].attn.c_attn, SparseLinear)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    with torch.no_grad():
        assert torch.equal(loaded.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0), expected)


def test_default_sample_is_one_generation_step_for_a_decoder_and_a_sentence_for_an_encoder():
    assert tuple(sample_inputs(tiny_gpt2())["input_ids"].shape) == (1, 1)
    assert tuple(sample_inputs(tiny_bert())["input_ids"].shape) == (1, 16)


def test_bert_attention_projections_go_sparse_with_outputs_checked():
    model = tiny_bert()
    fast, _, report = convert_transformers(model, **FORCE)
    assert "encoder.layer.0.attention.self.query" in report.sparse_layers
    assert "encoder.layer.1.output.dense" in report.sparse_layers
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(fast(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state,
                                   rtol=1e-4, atol=1e-4)


def test_bad_inputs_are_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match=r"no config\.json"):
        convert_transformers(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        convert_transformers(tmp_path / "missing")
    dense = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                           intermediate_size=64, vocab_size=50))
    with pytest.raises(ValueError, match="nothing to convert"):
        convert_transformers(dense, **FORCE)
    with pytest.raises(ValueError, match="not a converted sparse transformers directory"):
        load_transformers(tmp_path)


def test_cli_converts_a_model_directory_and_refuses_a_non_model(tmp_path):
    model = tiny_gpt2()
    source = tmp_path / "pruned"
    model.save_pretrained(source)
    tokenizer_free = tmp_path / "sparse"
    result = CliRunner().invoke(app, ["convert", str(source), "-o", str(tokenizer_free), "--batch-sizes", "4",
                                      "--min-speedup", "1e-9"])
    assert result.exit_code == 0, result.output
    assert "Activations computed by the sparse layer before them: transformer.h.0.mlp.act" in result.output
    assert (tokenizer_free / "model.sparse.safetensors").is_file() and (tokenizer_free / "config.json").is_file()
    loaded, _ = load_transformers(tokenizer_free)
    assert isinstance(loaded.transformer.h[1].mlp.act, FusedActivation)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    result = CliRunner().invoke(app, ["convert", str(source), "-o", str(tmp_path / "unfused"), "--batch-sizes", "4",
                                      "--min-speedup", "1e-9", "--no-fuse-activations"])
    assert result.exit_code == 0 and "Activations computed" not in result.output, result.output
    unfused, _ = load_transformers(tmp_path / "unfused")
    assert not any(isinstance(m, FusedActivation) for m in unfused.modules())
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    save_file({"w": torch.zeros(2, 2)}, str(not_a_model / "weights.safetensors"))
    result = CliRunner().invoke(app, ["convert", str(not_a_model), "-o", str(tmp_path / "never")])
    assert result.exit_code == 2 and "not a transformers model directory" in result.output
    assert not (tmp_path / "never").exists()


def test_gpt2_fine_tunes_on_the_kernels_like_its_masked_dense_twin():
    """Sparse fine-tuning after pruning, the common workflow: GPT-2's Conv1D layers (attention included) train on
    the kernels; the tied lm_head stays dense; losses follow the masked dense model step for step."""
    from sparsearch.runtime import for_training

    model = tiny_gpt2()  # eval mode: no dropout, so both models draw nothing at random
    model.config.use_cache = False
    masks = {name: module.weight != 0 for name, module in model.named_modules()
             if type(module).__name__ == "Conv1D"}
    trainable, report = for_training(model)
    decided = {d.name: d for d in report.layers}
    assert set(report.sparse_layers) == set(masks)
    assert not decided["lm_head"].sparse and "tied" in decided["lm_head"].reason
    dense_opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sparse_opt = torch.optim.AdamW(trainable.parameters(), lr=1e-3)
    tokens = torch.randint(0, 101, (4, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        losses = []
        for net, opt in ((model, dense_opt), (trainable, sparse_opt)):
            opt.zero_grad()
            loss = net(tokens, labels=tokens).loss
            loss.backward()
            if net is model:
                for name, mask in masks.items():
                    model.get_submodule(name).weight.grad.mul_(mask)
            opt.step()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_cli_int8_with_8_bit_activations_round_trips_and_refuses_other_bits(tmp_path):
    """--int8 --int8-activation-bits 8: the decoder's one-token steps on W8A8 kernels, outputs checked by convert and
    the choice kept by the directory; bits the kernels do not have are refused before anything is written."""
    model = tiny_gpt2()
    source = tmp_path / "pruned"
    model.save_pretrained(source)
    out = tmp_path / "a8"
    result = CliRunner().invoke(app, ["convert", str(source), "-o", str(out), "--batch-sizes", "1",
                                      "--min-speedup", "1e-9", "--int8", "--int8-activation-bits", "8"])
    assert result.exit_code == 0, result.output
    assert "matches the original" in result.output
    loaded, _ = load_transformers(out)
    layer = loaded.transformer.h[0].attn.c_attn
    assert isinstance(layer, SparseLinear) and layer.matrix.is_int8 and layer.matrix.activation_bits == 8
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        step = loaded(ids[:, :1]).logits  # one token: the batch-1 kernel with 8-bit inputs
        torch.testing.assert_close(step, model(ids[:, :1]).logits, rtol=0, atol=5e-2)
    for args, message in ((["--int8", "--int8-activation-bits", "4"],
                           "int8_activation_bits must be one of ('auto', 16, 8)"),
                          (["--int8", "--int8-activation-bits", "eight"], "got 'eight'"),
                          (["--int8-activation-bits", "16"], "other than 'auto' only with int8=True")):
        result = CliRunner().invoke(app, ["convert", str(source), "-o", str(tmp_path / "never"), *args])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "never").exists()
