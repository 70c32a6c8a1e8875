"""OWL: per-block sparsity from outlier ratios, same overall sparsity, bounded to a band around the target."""

from __future__ import annotations

import pytest
import torch
from oneshot_support import capture_layer_inputs, single_torch_thread
from typer.testing import CliRunner

from sparsearch.cli import app
from sparsearch.oneshot import (
    OneShotConfig,
    calibration_windows,
    find_blocks,
    load_pretrained,
    outlier_ratio,
    owl_sparsities,
    prune_model,
)
from sparsearch.oneshot.sequential import prunable_layers, weight_matrix

one_torch_thread = pytest.fixture(autouse=True, scope="module")(single_torch_thread)


def test_outlier_ratio_counts_scores_above_m_times_the_common_mean():
    # Mean of all eight scores is 2.0; with M=2 only the 10 is above 4.0; with M=0.5 the four 1s are not above 1.
    scores = [torch.tensor([[1.0, 1.0], [1.0, 1.0]]), torch.tensor([1.0, 1.0, 10.0, 0.0])]
    assert outlier_ratio(scores, 2.0) == pytest.approx(1 / 8)
    assert outlier_ratio(scores, 0.5) == pytest.approx(1 / 8)
    assert outlier_ratio(scores, 0.4) == pytest.approx(7 / 8)


@pytest.mark.parametrize(
    ("ratios", "sizes"),
    [([0.01, 0.03, 0.02, 0.05], None), ([0.01, 0.011, 0.012, 0.2], None), ([0.2, 0.01, 0.05], [100, 300, 50])],
)
def test_owl_sparsities_average_to_the_target_stay_in_the_band_and_fall_as_outliers_rise(ratios, sizes):
    target, band = 0.7, 0.08
    sparsities = owl_sparsities(ratios, target, band, sizes)
    weights = sizes or [1] * len(ratios)
    assert sum(s * w for s, w in zip(sparsities, weights, strict=True)) / sum(weights) == pytest.approx(target)
    assert all(target - band - 1e-12 <= s <= target + band + 1e-12 for s in sparsities)
    order_by_ratio = sorted(range(len(ratios)), key=lambda i: ratios[i])
    by_sparsity = [sparsities[i] for i in order_by_ratio]
    assert by_sparsity == sorted(by_sparsity, reverse=True)
    # The map is affine in the ratios: equal steps in ratio give equal steps in sparsity.
    slopes = {
        round((sparsities[i] - sparsities[j]) / (ratios[i] - ratios[j]), 9)
        for i in range(len(ratios)) for j in range(i) if ratios[i] != ratios[j]
    }
    assert len(slopes) == 1 and next(iter(slopes)) < 0


def test_owl_sparsities_use_the_whole_band_when_the_ratios_are_symmetric_and_are_uniform_when_all_equal():
    assert owl_sparsities([0.01, 0.02, 0.03], 0.6, 0.1) == pytest.approx([0.7, 0.6, 0.5])
    assert owl_sparsities([0.02, 0.02], 0.6, 0.1) == [0.6, 0.6]


def _block_ratios_from_a_dense_forward(model, windows, m):
    """Outlier ratios computed independently: every layer's input captured in one forward of the dense model."""
    blocks_name, blocks = find_blocks(model)
    ratios = []
    for index, block in enumerate(blocks):
        layers = {f"{blocks_name}.{index}.{name}": layer for name, layer in prunable_layers(block)}
        inputs = capture_layer_inputs(model, list(layers), windows)
        scores = [weight_matrix(layer).abs() * inputs[name].norm(dim=0) for name, layer in layers.items()]
        flat = torch.cat([score.flatten() for score in scores])
        ratios.append(float((flat > m * flat.mean()).float().mean()))
    return ratios


@pytest.mark.parametrize(("model_name", "method"), [("gpt2", "wanda"), ("bert", "sparsegpt")])
def test_owl_prunes_blocks_non_uniformly_by_their_dense_outlier_ratios_at_the_same_overall_sparsity(
    model_name, method, gpt2_dir, bert_dir, texts
):
    model, tokenizer = load_pretrained(gpt2_dir if model_name == "gpt2" else bert_dir)
    windows = calibration_windows(tokenizer, texts, n_tokens=1024, seq_len=32, seed=0)
    m = 3.0
    expected_ratios = _block_ratios_from_a_dense_forward(model, windows, m)
    assert expected_ratios[0] != expected_ratios[1]
    report = prune_model(model, windows, OneShotConfig(method=method, sparsity=0.6, owl=True, owl_m=m, owl_lambda=0.1))
    assert report.owl_outlier_ratios == pytest.approx(expected_ratios, rel=1e-4, abs=1e-6)
    # Two blocks of equal size: the one with more outliers gets target - lambda, the other target + lambda.
    more = 0 if expected_ratios[0] > expected_ratios[1] else 1
    blocks_name, _ = find_blocks(model)
    for layer in report.layers:
        block = int(layer.name.removeprefix(f"{blocks_name}.").split(".")[0])
        assert layer.target_sparsity == pytest.approx(0.5 if block == more else 0.7)
        assert layer.actual_sparsity == pytest.approx(layer.target_sparsity, abs=0.02)
    assert report.actual_sparsity == pytest.approx(0.6, abs=0.005)
    assert report.target_sparsity == 0.6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pattern": "2:4", "owl": True}, "cannot be combined with the N:M pattern 2:4"),
        ({"sparsity": 0.95, "owl": True, "owl_lambda": 0.08}, "lambda=0.08 around sparsity 0.95"),
        ({"sparsity": 0.05, "owl": True, "owl_lambda": 0.08}, "outside [0, 1)"),
        ({"sparsity": 0.5, "owl": True, "owl_m": 0.0}, "outlier threshold M=0.0 must be > 0"),
        ({"sparsity": 0.5, "owl": True, "owl_lambda": -0.1}, "lambda=-0.1 must be >= 0"),
    ],
)
def test_bad_owl_settings_are_rejected_naming_the_value(kwargs, message):
    with pytest.raises(ValueError, match="OWL") as error:
        OneShotConfig(method="wanda", **kwargs)
    assert message in str(error.value)


def test_prune_command_with_owl_reports_per_block_targets_and_rejects_a_bad_band(gpt2_dir, texts, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(texts))
    runner = CliRunner()
    out = tmp_path / "pruned"
    common = ["prune", str(gpt2_dir), "--calib", str(calib), "--calib-tokens", "512", "--seq-len", "32"]
    result = runner.invoke(app, [*common, "--out", str(out), "--sparsity", "0.6", "--owl", "--owl-lambda", "0.05"])
    assert result.exit_code == 0, result.output
    report = (out / "sparsearch_prune_report.json").read_text()
    assert '"owl_outlier_ratios": [' in report
    assert "0.550" in result.output and "0.650" in result.output
    bad_band = ["--sparsity", "0.6", "--owl", "--owl-lambda", "0.5"]
    bad = runner.invoke(app, [*common, "--out", str(tmp_path / "bad"), *bad_band])
    assert bad.exit_code == 2
    assert "lambda=0.5 around sparsity 0.6" in bad.output
    assert not (tmp_path / "bad").exists()
