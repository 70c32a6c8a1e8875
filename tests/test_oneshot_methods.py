"""Defining properties of the one-shot methods, checked on tiny randomly initialised GPT-2 and BERT models."""

from __future__ import annotations

import copy

import pytest
import torch
from oneshot_support import (
    capture_layer_inputs,
    single_torch_thread,
)

from sparsearch.oneshot import (
    InputStatistics,
    OneShotConfig,
    calibration_windows,
    find_blocks,
    load_pretrained,
    prune_model,
    relative_reconstruction_error,
)
from sparsearch.oneshot.methods import dsnot, lowest_score_mask, sparsegpt, wanda_score
from sparsearch.oneshot.sequential import prunable_layers, weight_matrix

one_torch_thread = pytest.fixture(autouse=True, scope="module")(single_torch_thread)


def _loaded(model_dir, texts, n_tokens=1024, seq_len=32):
    model, tokenizer = load_pretrained(model_dir)
    return model, calibration_windows(tokenizer, texts, n_tokens=n_tokens, seq_len=seq_len, seed=0)


def _block_layers(model, block_index):
    blocks_name, blocks = find_blocks(model)
    return {f"{blocks_name}.{block_index}.{name}": layer for name, layer in prunable_layers(blocks[block_index])}


def _statistics(inputs: torch.Tensor) -> InputStatistics:
    statistics = InputStatistics(inputs.shape[-1])
    statistics.update(inputs.unsqueeze(0))
    return statistics


def _first_block_statistics(model_dir, texts):
    """Dense weights and input statistics of every layer of block 0 (whose inputs pruning cannot change)."""
    model, windows = _loaded(model_dir, texts)
    layers = _block_layers(model, 0)
    inputs = capture_layer_inputs(model, list(layers), windows)
    return {
        name: (weight_matrix(layer).float().contiguous(), _statistics(inputs[name])) for name, layer in layers.items()
    }


def _expected_row_keep(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    kept_per_row = score.shape[1] - round(score.shape[1] * sparsity)
    keep = torch.zeros_like(score, dtype=torch.bool)
    keep.scatter_(1, score.topk(kept_per_row, dim=1).indices, True)
    return keep


@pytest.mark.parametrize("model_name", ["gpt2", "bert"])
def test_wanda_keeps_the_largest_weight_times_input_norm_in_every_row(model_name, gpt2_dir, bert_dir, texts):
    model_dir = gpt2_dir if model_name == "gpt2" else bert_dir
    model, windows = _loaded(model_dir, texts)
    dense = copy.deepcopy(model)
    first_layers = _block_layers(dense, 0)
    inputs = capture_layer_inputs(dense, list(first_layers), windows)
    prune_model(model, windows, OneShotConfig(method="wanda", sparsity=0.5))
    pruned_layers = _block_layers(model, 0)
    for name, layer in first_layers.items():
        weight = weight_matrix(layer)
        score = weight.abs() * inputs[name].norm(dim=0).unsqueeze(0)
        assert torch.equal(weight_matrix(pruned_layers[name]) != 0, _expected_row_keep(score, 0.5)), name


def test_later_blocks_are_calibrated_on_the_outputs_of_pruned_blocks(gpt2_dir, texts):
    model, windows = _loaded(gpt2_dir, texts)
    dense = copy.deepcopy(model)
    prune_model(model, windows, OneShotConfig(method="wanda", sparsity=0.6))
    name = "transformer.h.1.attn.c_attn"  # the first layer of block 1: its input comes from block 0 alone
    inputs_after_pruned_block = capture_layer_inputs(model, [name], windows)[name]
    inputs_after_dense_block = capture_layer_inputs(dense, [name], windows)[name]
    assert not torch.allclose(inputs_after_pruned_block, inputs_after_dense_block, atol=1e-4)
    dense_weight = weight_matrix(dict(dense.named_modules())[name])
    score = dense_weight.abs() * inputs_after_pruned_block.norm(dim=0).unsqueeze(0)
    pruned_weight = weight_matrix(dict(model.named_modules())[name])
    assert torch.equal(pruned_weight != 0, _expected_row_keep(score, 0.6))


def test_magnitude_with_a_layer_budget_removes_the_smallest_weights_of_the_layer(bert_dir, texts):
    model, windows = _loaded(bert_dir, texts)
    dense = copy.deepcopy(model)
    report = prune_model(model, windows, OneShotConfig(method="magnitude", sparsity=0.7))
    assert report.budget == "layer"
    dense_layers = _block_layers(dense, 1)
    for name, layer in _block_layers(model, 1).items():
        pruned, original = weight_matrix(layer), weight_matrix(dense_layers[name])
        keep = pruned != 0
        assert keep.float().mean().item() == pytest.approx(0.3, abs=1 / keep.numel())
        assert original[keep].abs().min() >= original[~keep].abs().max(), name
        assert torch.equal(pruned[keep], original[keep])


@pytest.mark.parametrize("setting", [{"sparsity": 0.5}, {"sparsity": 0.7, "budget": "row"}, {"pattern": "2:4"}])
def test_sparsegpt_weight_update_lowers_reconstruction_error_against_the_same_mask_without_update(
    setting, gpt2_dir, texts
):
    config = OneShotConfig(method="sparsegpt", **setting)
    for name, (weight, statistics) in _first_block_statistics(gpt2_dir, texts).items():
        updated, keep = sparsegpt(weight, statistics, config)
        assert torch.equal(updated != 0, keep)
        assert keep.float().mean().item() == pytest.approx(1 - config.target_sparsity, abs=0.01)
        with_update = relative_reconstruction_error(weight, updated, statistics)
        without_update = relative_reconstruction_error(weight, weight * keep, statistics)
        assert with_update < 0.9 * without_update, name


def test_reconstruction_error_from_the_gram_matrix_matches_the_direct_computation(gpt2_dir, texts):
    model, windows = _loaded(gpt2_dir, texts)
    name = "transformer.h.0.mlp.c_fc"
    inputs = capture_layer_inputs(model, [name], windows)[name].double()
    weight = weight_matrix(dict(model.named_modules())[name]).double()
    pruned = weight * lowest_score_mask(weight.abs(), 0.5, "row", None)
    direct = ((inputs @ (weight - pruned).T) ** 2).sum() / ((inputs @ weight.T) ** 2).sum()
    from_gram = relative_reconstruction_error(weight, pruned, _statistics(inputs.float()))
    assert from_gram == pytest.approx(direct.item(), rel=1e-4)


@pytest.mark.parametrize(("start", "setting"), [("wanda", {"sparsity": 0.7}), ("magnitude", {"sparsity": 0.7}),
                                                 ("wanda", {"pattern": "2:4"})])
def test_dsnot_lowers_reconstruction_error_against_its_starting_mask(start, setting, bert_dir, texts):
    config = OneShotConfig(method=start, dsnot=True, budget="row", **setting)
    total_swaps, before_total, after_total = 0, 0.0, 0.0
    for name, (weight, statistics) in _first_block_statistics(bert_dir, texts).items():
        score = weight.abs() if start == "magnitude" else wanda_score(weight, statistics)
        keep = lowest_score_mask(score, config.target_sparsity, "row", config.n_m)
        refined, refined_keep, swaps = dsnot(weight, weight * keep, keep, statistics, config)
        before = relative_reconstruction_error(weight, weight * keep, statistics)
        after = relative_reconstruction_error(weight, refined, statistics)
        assert after <= before + 1e-12, name
        assert torch.equal(refined_keep.sum(1), keep.sum(1)), "DSnoT swaps must keep every row's budget"
        assert torch.equal(refined != 0, refined_keep)
        assert torch.equal(refined[refined_keep], weight[refined_keep])
        total_swaps += swaps
        before_total += before
        after_total += after
    assert total_swaps > 0
    assert after_total < 0.97 * before_total


METHOD_SETTINGS = [
    {"method": "magnitude"}, {"method": "wanda"}, {"method": "sparsegpt"},
    {"method": "wanda", "dsnot": True}, {"method": "sparsegpt", "dsnot": True},
]


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("setting", METHOD_SETTINGS, ids=lambda s: s["method"] + ("+dsnot" if s.get("dsnot") else ""))
def test_n_m_pattern_holds_in_every_group_of_every_layer(pattern, setting, gpt2_dir, bert_dir, texts):
    kept, group = (int(part) for part in pattern.split(":"))
    for model_dir in (gpt2_dir, bert_dir):
        model, windows = _loaded(model_dir, texts, n_tokens=512)
        report = prune_model(model, windows, OneShotConfig(pattern=pattern, **setting))
        assert report.actual_sparsity == pytest.approx(1 - kept / group, abs=1e-3)
        _, blocks = find_blocks(model)
        for block in blocks:
            for name, layer in prunable_layers(block):
                weight = weight_matrix(layer)
                nonzero_per_group = (weight != 0).reshape(weight.shape[0], -1, group).sum(-1)
                assert nonzero_per_group.max() <= kept, name


def test_row_budget_gives_every_row_the_same_sparsity_and_the_report_says_so(gpt2_dir, texts):
    model, windows = _loaded(gpt2_dir, texts)
    report = prune_model(model, windows, OneShotConfig(method="sparsegpt", sparsity=0.6, budget="row"))
    assert len(report.layers) == 8  # 4 Conv1D layers in each of 2 blocks
    _, blocks = find_blocks(model)
    for block in blocks:
        for _, layer in prunable_layers(block):
            weight = weight_matrix(layer)
            zeros_per_row = (weight == 0).float().mean(1)
            assert zeros_per_row.min() >= 0.58 and zeros_per_row.max() <= 0.62
    for layer in report.layers:
        assert layer.target_sparsity == 0.6
        assert layer.actual_sparsity == pytest.approx(0.6, abs=0.02)
        assert 0 < layer.reconstruction_error < 1


def test_calibration_windows_are_seeded_and_carry_the_tokenizer_special_tokens(bert_dir, texts):
    _, tokenizer = load_pretrained(bert_dir)
    first = calibration_windows(tokenizer, texts, n_tokens=300, seq_len=32, seed=1)
    assert first.shape == (10, 32)
    assert torch.equal(first, calibration_windows(tokenizer, texts, n_tokens=300, seq_len=32, seed=1))
    assert not torch.equal(first, calibration_windows(tokenizer, texts, n_tokens=300, seq_len=32, seed=2))
    assert (first[:, 0] == tokenizer.cls_token_id).all() and (first[:, -1] == tokenizer.sep_token_id).all()


@pytest.mark.parametrize(
    ("texts_given", "n_tokens", "message"),
    [([], 64, "calibration data is empty"), (["  \n "], 64, "calibration data is empty"),
     (["a short text"], 640, "640 calibration tokens were asked for"), (["text"], 0, "budget 0")],
)
def test_calibration_rejects_empty_or_too_little_text(texts_given, n_tokens, message, gpt2_dir):
    _, tokenizer = load_pretrained(gpt2_dir)
    with pytest.raises(ValueError, match=message):
        calibration_windows(tokenizer, texts_given, n_tokens=n_tokens, seq_len=32)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"sparsity": 1.0}, r"sparsity 1.0 is outside the allowed range \[0, 1\)"),
     ({"sparsity": -0.1}, "sparsity -0.1 is outside"), ({}, "give a sparsity"),
     ({"pattern": "4:4"}, "needs 0 < N < M"), ({"pattern": "2-4"}, "is not N:M"),
     ({"pattern": "2:4", "sparsity": 0.7}, "contradicts pattern 2:4"),
     ({"method": "obs", "sparsity": 0.5}, "method 'obs' is unknown")],
)
def test_bad_settings_are_rejected_with_the_value_and_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OneShotConfig(**kwargs)


def test_pattern_that_does_not_divide_a_layer_is_rejected_before_any_weight_changes(gpt2_dir, texts):
    model, windows = _loaded(gpt2_dir, texts)
    before = {name: parameter.clone() for name, parameter in model.named_parameters()}
    with pytest.raises(ValueError, match=r"pattern 2:6 does not divide layer .*input dimension 64"):
        prune_model(model, windows, OneShotConfig(pattern="2:6"))
    assert all(torch.equal(before[name], parameter) for name, parameter in model.named_parameters())
