"""Reference networks: shapes, seeded initialisation, FLOP and parameter counts, bad inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsearch.models import (
    DEFAULT_MLP_WIDTHS,
    FlopCount,
    build_model,
    count_flops,
    parameter_counts,
    weight_positions,
)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("input_shape", [(40,), (1, 28, 28), (1, 8, 8)])
def test_models_map_a_batch_to_class_logits(arch, input_shape):
    model = build_model(arch, input_shape, 10, widths=(8, 16), seed=0)
    assert model(torch.randn(5, *input_shape)).shape == (5, 10)


def test_cnn_uses_1d_convolutions_for_sequences_and_2d_for_images():
    sequence_cnn = build_model("cnn", (40,), 10, seed=0)
    image_cnn = build_model("cnn", (1, 28, 28), 10, seed=0)
    assert all(isinstance(conv, nn.Conv1d) for conv in sequence_cnn.convs)
    assert all(isinstance(conv, nn.Conv2d) for conv in image_cnn.convs)


def test_default_mlp_parent_is_clearly_over_parameterised():
    model = build_model("mlp", (40,), 10)
    widths = [layer.out_features for layer in model.layers[:-1]]
    assert tuple(widths) == DEFAULT_MLP_WIDTHS
    assert parameter_counts(model)[0] > 400_000  # a 100-unit MLP (~5k weights) already fits MNIST-1D


def test_same_seed_gives_the_same_weights_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = build_model("mlp", (40,), 10, widths=(32,), seed=7)
    assert torch.equal(torch.rand(1), expected_next)
    second = build_model("mlp", (40,), 10, widths=(32,), seed=7)
    other = build_model("mlp", (40,), 10, widths=(32,), seed=8)
    for a, b, c in zip(first.parameters(), second.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_mlp_flops_are_two_per_multiply_accumulate_and_count_only_nonzero_weights():
    model = build_model("mlp", (40,), 10, widths=(64, 32), seed=0)
    dense = 2 * (40 * 64 + 64 * 32 + 32 * 10)
    assert count_flops(model, (40,)).dense == dense
    assert count_flops(model, (40,)).nonzero == dense
    with torch.no_grad():
        model.layers[1].weight[:16] = 0  # 16 rows of 64 inputs
    flops = count_flops(model, (40,))
    assert flops.dense == dense and flops.nonzero == dense - 2 * 16 * 64


def test_cnn_flops_count_every_output_position():
    model = build_model("cnn", (40,), 10, widths=(4, 8), seed=0)
    # conv0 at length 40 (same padding), pool -> 20; conv1 at 20, pool -> 10; classifier reads 8 * 10
    assert weight_positions(model, (40,)) == {"convs.0.weight": 40, "convs.1.weight": 20, "classifier.weight": 1}
    expected = 2 * (40 * 4 * 1 * 5 + 20 * 8 * 4 * 5 + 8 * 10 * 10)
    assert count_flops(model, (40,)) == FlopCount(dense=expected, nonzero=expected)


def test_parameter_counts_report_total_and_nonzero():
    model = build_model("mlp", (4,), 2, widths=(3,), seed=0)
    total = 4 * 3 + 3 + 3 * 2 + 2
    with torch.no_grad():
        model.layers[0].weight[0] = 0
    assert parameter_counts(model) == (total, total - 4)


def test_small_images_stop_pooling_before_the_size_reaches_zero():
    model = build_model("cnn", (1, 8, 8), 10, widths=(4, 4, 4, 4), seed=0)
    assert model.spatial_after_convs == 1
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "resnet"}, "unknown model 'resnet'; allowed: mlp, cnn"),
        ({"widths": ()}, "mlp widths must be a non-empty sequence of positive integers"),
        ({"widths": (16, 0)}, "mlp widths must be a non-empty sequence of positive integers"),
        ({"arch": "cnn", "widths": (4, -1)}, "cnn channels must be a non-empty sequence"),
        ({"num_classes": 1}, "num_classes must be an integer >= 2, got 1"),
        ({"input_shape": (0,)}, "input_shape must be a non-empty tuple of positive integers"),
        ({"arch": "cnn", "input_shape": (1, 2, 3, 4)}, "cnn needs input_shape"),
    ],
)
def test_bad_model_arguments_are_named(kwargs, message):
    arguments = {"arch": "mlp", "input_shape": (40,), "num_classes": 10, "widths": None} | kwargs
    with pytest.raises(ValueError, match=message):
        build_model(arguments["arch"], arguments["input_shape"], arguments["num_classes"], widths=arguments["widths"])
