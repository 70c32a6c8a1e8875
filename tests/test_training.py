"""The shared training loop: determinism, exact step budgets, masks held, FLOP accounting, bad budgets."""

from __future__ import annotations

import dataclasses
import math

import pydantic
import pytest
import torch

from sparsearch.data import load_dataset
from sparsearch.engine import Sparsifier, StaticMaskSparsifier
from sparsearch.models import build_model, count_flops
from sparsearch.search import NodeSpace, WeightSpace, weight_sparsity
from sparsearch.training import EpochMetrics, TrainBudget, train

BUDGET = TrainBudget(epochs=2, batch_size=64, lr=0.1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def _model(data, seed: int = 0):
    return build_model("mlp", data.input_shape, data.num_classes, widths=(48, 32), seed=seed)


def _curve(result):
    return [(e.epoch, e.step, e.train_loss, e.val_accuracy, e.test_accuracy) for e in result.epochs]


def test_same_seed_gives_identical_metrics_and_another_seed_does_not(digits):
    masks = NodeSpace(_model(digits), 0.5).sample(torch.Generator().manual_seed(0))

    def run(seed: int):
        return train(
            _model(digits), digits, BUDGET, seed=seed, sparsifier_factory=lambda steps: StaticMaskSparsifier(masks)
        )

    first, again, other = run(0), run(0), run(1)
    assert _curve(first) == _curve(again)
    assert first.train_flops == again.train_flops
    assert _curve(first) != _curve(other)


def test_training_learns_digits(digits):
    result = train(_model(digits), digits, TrainBudget(epochs=4, batch_size=32, lr=0.05), seed=0)
    assert result.final_test_accuracy > 0.85
    assert result.epochs[-1].train_loss < result.epochs[0].train_loss
    assert result.final_val_accuracy == result.epochs[-1].val_accuracy


def test_step_budget_is_epochs_times_batches_and_reaches_the_sparsifier(digits):
    seen: dict[str, int] = {}
    streamed: list[EpochMetrics] = []

    def factory(total_steps: int) -> Sparsifier:
        seen["total_steps"] = total_steps
        return Sparsifier(0.5, distribution="uniform")

    budget = TrainBudget(epochs=3, batch_size=100)
    result = train(_model(digits), digits, budget, seed=0, sparsifier_factory=factory, on_epoch=streamed.append)
    steps_per_epoch = math.ceil(len(digits.y_train) / 100)
    assert seen["total_steps"] == 3 * steps_per_epoch == budget.total_steps(len(digits.y_train))
    assert [e.step for e in result.epochs] == [steps_per_epoch * k for k in (1, 2, 3)]
    assert streamed == result.epochs


def test_static_masks_hold_through_training_with_momentum_and_weight_decay(digits):
    model = _model(digits)
    masks = WeightSpace(model, 0.9, "erk").sample(torch.Generator().manual_seed(0))
    train(model, digits, BUDGET, seed=0, sparsifier_factory=lambda steps: StaticMaskSparsifier(masks))
    weights = dict(model.named_parameters())
    assert all(not weights[name][~mask].any() for name, mask in masks.items())
    assert weight_sparsity({name: weights[name] != 0 for name in masks}) == pytest.approx(0.9, abs=1e-3)


def test_training_flops_are_three_sparse_forward_passes_per_sample_seen(digits):
    dense = train(_model(digits), digits, BUDGET, seed=0)
    samples_seen = BUDGET.epochs * len(digits.y_train)
    forward = count_flops(_model(digits), digits.input_shape).dense
    assert dense.train_flops == 3 * forward * samples_seen
    assert dense.forward_flops is not None and dense.forward_flops.nonzero == forward

    masks = NodeSpace(_model(digits), 0.8).sample(torch.Generator().manual_seed(0))
    sparse = train(_model(digits), digits, BUDGET, seed=0, sparsifier_factory=lambda steps: StaticMaskSparsifier(masks))
    assert sparse.forward_flops is not None
    assert sparse.train_flops == 3 * sparse.forward_flops.nonzero * samples_seen
    assert sparse.train_flops < 0.3 * dense.train_flops


def test_adamw_with_a_constant_rate_trains_too(digits):
    budget = TrainBudget(epochs=2, optimizer="adamw", lr=1e-2, lr_schedule="constant", weight_decay=0.01)
    result = train(_model(digits), digits, budget, seed=0)
    assert result.final_test_accuracy > 0.8


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": -1}, "batch_size"),
        ({"optimizer": "adam"}, "optimizer"),
        ({"lr": 0}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"lr_schedule": "step"}, "lr_schedule"),
        ({"epoch": 3}, "epoch"),
    ],
)
def test_bad_budgets_name_the_field(settings, field):
    with pytest.raises(pydantic.ValidationError, match=field):
        TrainBudget(**settings)


def test_train_needs_a_budget_object(digits):
    with pytest.raises(TypeError, match="budget must be a TrainBudget, got dict"):
        train(_model(digits), digits, {"epochs": 1}, seed=0)


def test_sparse_kernels_train_a_static_mask_like_masked_training(digits):
    """`sparse_kernels=True` moves the masked layers onto the kernels for the run: the same curve to float rounding,
    the same FLOPs, and the model left as masked training leaves it (trained weights, masked ones zero, its own
    modules)."""
    model = build_model("mlp", digits.input_shape, digits.num_classes, widths=(256, 256), seed=0)
    masks = WeightSpace(model, 0.9, "uniform").sample(torch.Generator().manual_seed(0))
    budget = TrainBudget(epochs=2, batch_size=32, lr=0.05)

    def run(kernels: bool):
        net = build_model("mlp", digits.input_shape, digits.num_classes, widths=(256, 256), seed=0)
        modules = list(net.modules())
        result = train(net, digits, budget, seed=0, sparsifier_factory=lambda steps: StaticMaskSparsifier(masks),
                       sparse_kernels=kernels)
        assert list(net.modules()) == modules  # every module put back
        return net, result

    (masked_net, masked), (kernel_net, on_kernels) = run(False), run(True)
    assert kernel_layers_used(masks, build_model("mlp", digits.input_shape, digits.num_classes, widths=(256, 256)))
    for (epoch, step, loss, val, test), expected in zip(_curve(on_kernels), _curve(masked), strict=True):
        assert (epoch, step) == expected[:2]
        assert loss == pytest.approx(expected[2], rel=1e-4)
        assert val == pytest.approx(expected[3], abs=0.02) and test == pytest.approx(expected[4], abs=0.02)
    assert on_kernels.train_flops == masked.train_flops
    weights, reference = dict(kernel_net.named_parameters()), dict(masked_net.named_parameters())
    for name, mask in masks.items():
        assert not weights[name][~mask].any()
        torch.testing.assert_close(weights[name], reference[name], rtol=1e-3, atol=1e-4)


def kernel_layers_used(masks, model) -> bool:
    """Whether `kernel_layers` would take every masked layer of this model (so the test above is not vacuous)."""
    from sparsearch.training.loop import kernel_layers

    sparsifier = StaticMaskSparsifier(masks)
    sparsifier.attach(model)
    return set(kernel_layers(model, sparsifier)) == {name.rpartition(".")[0] for name in masks}


def test_sparse_kernels_fall_back_to_masked_training_where_a_layer_cannot_go(digits):
    """A node-space mask at 50% keeps layers half dense: no layer moves, and the run is bit-identical to masked."""
    masks = NodeSpace(_model(digits), 0.5).sample(torch.Generator().manual_seed(0))

    def run(kernels: bool):
        return train(_model(digits), digits, BUDGET, seed=0, sparse_kernels=kernels,
                     sparsifier_factory=lambda steps: StaticMaskSparsifier(masks))

    assert _curve(run(True)) == _curve(run(False))


def test_sparse_kernels_train_a_bare_layer_masked(digits):
    """A model that is itself one nn.Linear cannot be replaced in a parent: it trains masked, bit-identically
    (it used to fail with KeyError '.weight')."""
    flat = dataclasses.replace(digits, x_train=digits.x_train.flatten(1), x_val=digits.x_val.flatten(1),
                               x_test=digits.x_test.flatten(1), input_shape=(64,))
    mask = {"weight": torch.rand(10, 64, generator=torch.Generator().manual_seed(1)) < 0.2}

    def run(kernels: bool):
        torch.manual_seed(0)
        return train(torch.nn.Linear(64, 10), flat, BUDGET, seed=0, sparse_kernels=kernels,
                     sparsifier_factory=lambda steps: StaticMaskSparsifier(mask))

    assert _curve(run(True)) == _curve(run(False))


@pytest.mark.parametrize("algorithm", ["rigl", "set", "gmp"])
def test_sparse_kernels_train_dynamic_methods_between_their_updates(digits, algorithm, kernel_moves):
    """SET, RigL and GMP change their masks on update steps, which read dense weights (RigL dense gradients too):
    those steps run on the dense layers and the steps between on the kernels, moved there again with the new masks.
    Against masked training: the same masks after every update, the same losses to float rounding."""
    import sparsearch as sa

    budget = TrainBudget(epochs=2, batch_size=32, lr=0.05)
    steps_per_epoch = math.ceil(len(digits.y_train) / 32)

    def sparsifier(total_steps: int) -> Sparsifier:
        if algorithm == "rigl":
            return sa.RigL(0.9, update_every=10, total_steps=total_steps, distribution="uniform")
        if algorithm == "set":
            return sa.SET(0.9, update_every=10, distribution="uniform", seed=0)
        return sa.GMP(0.9, initial_sparsity=0.75, end=0.5, update_every=10, total_steps=total_steps,
                      distribution="uniform")

    def run(kernels: bool):
        net = build_model("mlp", digits.input_shape, digits.num_classes, widths=(256, 256), seed=0)
        seen: list[Sparsifier] = []
        result = train(net, digits, budget, seed=0, sparse_kernels=kernels,
                       sparsifier_factory=lambda steps: seen.append(sparsifier(steps)) or seen[-1])
        return result, seen[0].masks

    (masked, masked_masks), (on_kernels, kernel_masks) = run(False), run(True)
    # onto the kernels at the start and again after every update (RigL's stop at 75% of training; GMP prunes after
    # the steps that reach 10, 20, ..., its end, so it leaves before them)
    total = 2 * steps_per_epoch
    updates = [step for step in range(1, total) if step % 10 == 0 and (algorithm != "rigl" or step < 0.75 * total)]
    if algorithm != "gmp":
        assert len(kernel_moves) == 1 + len(updates)
    assert len(kernel_moves) > 2 and all(layers == ["layers.0", "layers.1", "layers.2"] for layers in kernel_moves)
    for name, mask in masked_masks.items():
        assert torch.equal(kernel_masks[name], mask), name
    for (epoch, step, loss, *_), expected in zip(_curve(on_kernels), _curve(masked), strict=True):
        assert (epoch, step) == expected[:2] and loss == pytest.approx(expected[2], rel=1e-4)
    assert on_kernels.train_flops == masked.train_flops


def test_sparse_kernels_train_pruning_at_initialisation_on_the_kernels(digits, kernel_moves):
    """A mask chosen at attach (the study's static-* arms: SNIP, GraSP, SynFlow, magnitude, random) is fixed from then
    on, so the whole run goes onto the kernels, as a given static mask does (it used to train masked)."""
    import sparsearch as sa

    def run(kernels: bool):
        net = build_model("mlp", digits.input_shape, digits.num_classes, widths=(256, 256), seed=0)
        return train(net, digits, BUDGET, seed=0, sparse_kernels=kernels,
                     sparsifier_factory=lambda steps: sa.StaticSparsifier(0.9, score="magnitude",
                                                                          distribution="uniform"))

    masked, on_kernels = run(False), run(True)
    assert kernel_moves == [["layers.0", "layers.1", "layers.2"]]
    for (epoch, step, loss, *_), expected in zip(_curve(on_kernels), _curve(masked), strict=True):
        assert (epoch, step) == expected[:2] and loss == pytest.approx(expected[2], rel=1e-4)
    assert on_kernels.train_flops == masked.train_flops
