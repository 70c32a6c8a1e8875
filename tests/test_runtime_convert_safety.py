"""`convert` never breaks a model: layers whose weight a parent reads or that are tied stay dense, outputs are
checked on a sample input, and files written from real users' models (attention, tied heads, BatchNorm) load."""

import importlib

import pytest
import torch
from runtime_support import sparsify
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from sparsearch.cli import app
from sparsearch.runtime import SparseConv1d, SparseLinear, convert_with_report, load_sparse, save_sparse
from sparsearch.runtime.timing import PairedTiming

FORCE = {"batch_sizes": (4,), "min_speedup": 1e-9, "repeats": 1}  # sparse wherever allowed, whatever the timing




class UserModel(nn.Module):
    """Issue 10's model: Embedding + Conv1d + BatchNorm + TransformerEncoderLayer + a head tied to the embedding."""

    def __init__(self, vocab: int = 200, dim: int = 64) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.conv = nn.Conv1d(dim, dim, 3, padding=1)
        self.norm = nn.BatchNorm1d(dim)
        self.encoder = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=128, batch_first=True)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embedding.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens)
        x = self.norm(self.conv(x.transpose(1, 2))).transpose(1, 2)
        return self.head(torch.relu(self.proj(self.encoder(x))))


class ResidualBlock(nn.Module):
    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels * 8 * 8, 256)
        self.out = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(x + self.bn2(self.conv2(y)))
        return self.out(torch.relu(self.fc(y.flatten(1))))


def decisions(report):
    return {d.name: d for d in report.layers}


@pytest.mark.parametrize("with_sample", [True, False])
def test_transformer_encoder_layer_keeps_the_layers_its_fast_path_reads(with_sample):
    torch.manual_seed(0)
    layer = sparsify(nn.TransformerEncoderLayer(64, nhead=4, dim_feedforward=128, batch_first=True))
    x = torch.randn(2, 5, 64)
    with pytest.warns(UserWarning):
        fast, report = convert_with_report(layer, x if with_sample else None, **FORCE)
    by_name = decisions(report)
    for name in ("self_attn.out_proj", "linear1", "linear2"):
        assert not by_name[name].sparse and "reads" in by_name[name].reason
        assert isinstance(fast.get_submodule(name), nn.Linear)
    assert "in_proj_weight" in by_name["self_attn.in_proj_weight"].reason
    with torch.no_grad():
        torch.testing.assert_close(fast(x), layer(x))


def test_multihead_attention_out_proj_stays_dense_and_attention_still_runs():
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(nn.Linear(32, 64)))
    model.attention = nn.MultiheadAttention(64, 4, batch_first=True)
    sparsify(model.attention)

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x):
            h = self.inner[0](x)
            return self.inner.attention(h, h, h, need_weights=False)[0]

    wrapper = Wrapper().eval()
    x = torch.randn(3, 7, 32)
    fast, report = convert_with_report(wrapper, x, **FORCE)
    by_name = decisions(report)
    assert by_name["inner.0"].sparse and isinstance(fast.inner[0], SparseLinear)
    assert not by_name["inner.attention.out_proj"].sparse
    assert "MultiheadAttention reads out_proj.weight" in by_name["inner.attention.out_proj"].reason
    with torch.no_grad():
        torch.testing.assert_close(fast(x), wrapper(x), rtol=1e-4, atol=1e-5)


def test_users_model_with_tied_head_converts_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    model = sparsify(UserModel())
    tokens = torch.randint(0, 200, (2, 9))
    with pytest.warns(UserWarning, match="MultiheadAttention"):
        fast, report = convert_with_report(model, tokens, **FORCE)
    by_name = decisions(report)
    assert not by_name["head"].sparse and "tied to embedding.weight" in by_name["head"].reason
    assert by_name["proj"].sparse and isinstance(fast.proj, SparseLinear)
    assert by_name["conv"].sparse and isinstance(fast.conv, SparseConv1d)
    assert "embedding table" in by_name["embedding"].reason
    assert "matches the original" in report.output_check
    with torch.no_grad():
        expected = model(tokens)
        torch.testing.assert_close(fast(tokens), expected, rtol=1e-4, atol=1e-5)
    path = tmp_path / "user.safetensors"
    save_sparse(fast, path)
    fresh = UserModel()
    loaded = load_sparse(path, fresh)
    assert loaded.head.weight is loaded.embedding.weight  # the tie survives the round trip
    assert isinstance(loaded.conv, SparseConv1d)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), expected, rtol=1e-4, atol=1e-5)


def test_resnet_block_with_batchnorm_matches_after_conversion():
    torch.manual_seed(0)
    block = sparsify(ResidualBlock())
    for module in block.modules():  # non-trivial running statistics, as after training
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 8, 8, 8)
    fast, report = convert_with_report(block, x, **FORCE)
    assert report.sparse_layers == ["conv1", "conv2", "fc", "out"]
    with torch.no_grad():
        torch.testing.assert_close(fast(x), block(x), rtol=1e-4, atol=1e-5)


def test_a_layer_whose_replacement_breaks_the_model_goes_back_to_dense():
    class ReadsChildWeight(nn.Module):  # a custom parent that uses its child's weight directly
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Linear(16, 16)
            self.tied_use = nn.Linear(16, 16)

        def forward(self, x):
            h = self.first(x)
            return self.tied_use(h) + h @ self.tied_use.weight

    model = sparsify(ReadsChildWeight())
    x = torch.randn(3, 16)
    fast, report = convert_with_report(model, x, **FORCE)
    by_name = decisions(report)
    assert by_name["first"].sparse
    assert not by_name["tied_use"].sparse and "AttributeError" in by_name["tied_use"].reason
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)


def scripted_timings(speedups):
    """A stand-in for `paired_speedup` that runs both sides once and reports the next scripted speed-up: the
    decision logic under test, without depending on this machine's timings."""
    queue = iter(speedups)

    def timing(baseline, candidate, *, threshold, rounds=5, **_):
        baseline()
        candidate()
        speedup = next(queue)
        return PairedTiming(1.0, 1.0 / speedup, speedup, 1.0, rounds, False)

    return timing


@pytest.mark.parametrize("together", [1.3, 1.02, 0.8])
def test_layers_close_alone_are_tried_together_in_the_whole_model(monkeypatch, together):
    model = sparsify(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)))
    x = torch.randn(5, 32)
    # alone: layer 0 0.9x and layer 2 0.8x (within NEAR_SPEEDUP of dense), layer 4 0.5x (not); then the two
    # together in the model; then the whole converted model against the original
    convert_module = importlib.import_module("sparsearch.runtime.convert")  # the package exports a function too
    monkeypatch.setattr(convert_module, "paired_speedup", scripted_timings([0.9, 0.8, 0.5, together, 1.1]))
    fast, report = convert_with_report(model, x, batch_sizes=(5,), repeats=1)
    by_name = decisions(report)
    promoted = together >= 1.05  # the whole model must gain min_speedup (default 1.05) from them, as a layer must
    for name in ("0", "2"):
        assert by_name[name].sparse == promoted
        assert isinstance(fast.get_submodule(name), SparseLinear) == promoted
        assert f"whole model ran {together:.2f}x" in by_name[name].reason
        assert by_name[name].reason.endswith(": sparse" if promoted else ": kept dense")
    assert not by_name["4"].sparse and "tried" not in by_name["4"].reason
    assert (report.model_timing is not None) == promoted
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("at_8", "promoted"), [(1.2, True), (0.9, False)])
def test_near_misses_are_also_timed_on_the_sample_tiled_to_a_larger_batch_size(monkeypatch, at_8, promoted):
    """The sample gives each layer 2 rows; batch size 8 is the sample tiled 4 times, so the whole model is timed there
    too, and layers that help at 2 rows but hurt at 8 stay dense. Batch size 3 is no multiple of 2: not tiled."""
    model = sparsify(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)))
    x = torch.randn(2, 32)
    seen = []

    def record_batch(module, args):
        seen.append(args[0].shape[0])

    model[0].register_forward_pre_hook(record_batch)
    convert_module = importlib.import_module("sparsearch.runtime.convert")
    # alone: layer 0 at 2, 3 and 8 rows, layer 2 likewise (all within NEAR_SPEEDUP); together on the sample 1.3x;
    # then on the sample tiled to 8 rows; then the whole converted model
    monkeypatch.setattr(convert_module, "paired_speedup",
                        scripted_timings([0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 1.3, at_8, 1.1]))
    fast, report = convert_with_report(model, x, batch_sizes=(2, 3, 8), repeats=1)
    by_name = decisions(report)
    assert 8 in seen and 3 * 2 not in seen and 12 not in seen  # tiled to 8 rows, never to a size that is no multiple
    for name in ("0", "2"):
        assert by_name[name].sparse == promoted
        if not promoted:
            assert f"but {at_8:.2f}x on it tiled to batch size 8" in by_name[name].reason
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)


def test_tiled_sample_inputs_repeat_every_tensor_along_the_batch():
    from sparsearch.runtime.convert import _tiled

    x, mask = torch.randn(2, 5), torch.ones(2, 5, dtype=torch.long)
    assert torch.equal(_tiled(x, 3), torch.cat([x, x, x]))
    tiled = _tiled({"input_ids": mask, "scale": 2.0, "empty": torch.tensor(1.0)}, 4)
    assert tiled["input_ids"].shape == (8, 5) and tiled["scale"] == 2.0 and tiled["empty"].shape == ()
    assert [t.shape for t in _tiled((x, mask), 2)] == [(4, 5), (4, 5)]


def test_without_sample_input_convert_warns_that_outputs_were_not_checked():
    model = sparsify(nn.Sequential(nn.Linear(16, 16)))
    with pytest.warns(UserWarning, match="not checked"):
        _, report = convert_with_report(model, **FORCE)
    assert report.output_check.startswith("not checked")


def test_report_gives_a_median_speedup_and_a_confidence():
    model = sparsify(nn.Sequential(nn.Linear(256, 256)), 0.95)
    _, report = convert_with_report(model, torch.randn(8, 256), batch_sizes=(8,), repeats=3)
    decision = report.layers[0]
    assert set(decision.speedup) == {8} and decision.speedup[8] > 0
    assert 0.0 <= decision.confidence <= 1.0
    assert "confidence" in report.to_markdown()
    if decision.sparse:  # the whole model was timed and was not slower, or it would have been reverted
        assert report.model_timing is not None and report.model_timing.speedup >= 1.0


def test_cli_convert_keeps_embeddings_dense_and_forced_file_loads_back(tmp_path):
    torch.manual_seed(0)
    model = sparsify(UserModel())
    source, target = tmp_path / "user.safetensors", tmp_path / "user.sparse.safetensors"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_file(state, str(source))
    result = CliRunner().invoke(app, ["convert", str(source), "-o", str(target), "--batch-sizes", "2",
                                      "--min-speedup", "1e-9", "--max-density", "1.0"])
    assert result.exit_code == 0, result.output
    assert "embedding table" in result.output
    with pytest.warns(UserWarning, match="self_attn.out_proj"):
        loaded = load_sparse(target, UserModel())
    assert isinstance(loaded.proj, SparseLinear) and isinstance(loaded.encoder.self_attn.out_proj, nn.Linear)
    tokens = torch.randint(0, 200, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), rtol=1e-4, atol=1e-5)
