"""Search spaces (exact weight budgets, whole-neuron node budgets), scorers and Random Search."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from sparsearch.data import load_dataset
from sparsearch.engine.sparsifier import default_sparsifiable_parameters
from sparsearch.models import build_model
from sparsearch.search import (
    NodeSpace,
    WeightSpace,
    make_space,
    node_sparsity,
    random_search,
    rescale_to_fan_in,
    snip_score,
    synflow_score,
    weight_sparsity,
)
from sparsearch.training import TrainBudget

SPARSITIES = [0.0, 0.3, 0.5, 0.8, 0.9, 0.95, 0.99]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _mlp(seed: int = 0) -> nn.Module:
    return build_model("mlp", (40,), 10, widths=(96, 64, 48), seed=seed)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


# ------------------------------------------------------------------------------------------- weight space
@pytest.mark.parametrize("distribution", ["uniform", "er", "erk"])
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_weight_space_keeps_exactly_the_target_number_of_weights(distribution, sparsity):
    model = _mlp()
    total = sum(p.numel() for p in default_sparsifiable_parameters(model).values())
    space = WeightSpace(model, sparsity, distribution)
    masks = space.sample(torch.Generator().manual_seed(1))
    assert sum(int(m.sum()) for m in masks.values()) == round((1 - sparsity) * total)
    assert weight_sparsity(masks) == pytest.approx(sparsity, abs=1 / total)
    for name, mask in masks.items():
        assert int(mask.sum()) == space.keep_counts[name] <= mask.numel()  # no layer above density 1


def test_erk_gives_small_layers_more_density_and_saturates_at_one():
    model = _mlp()
    masks = WeightSpace(model, 0.5, "erk").sample(torch.Generator().manual_seed(0))
    densities = {name: float(mask.float().mean()) for name, mask in masks.items()}
    # the 48 -> 10 output layer is tiny: ERK would give it density > 1, so it is capped at exactly 1
    assert densities["layers.3.weight"] == 1.0
    assert densities["layers.1.weight"] < densities["layers.0.weight"]


def test_weight_space_samples_differ_by_generator_and_repeat_by_seed():
    space = WeightSpace(_mlp(), 0.9, "erk")
    first = space.sample(torch.Generator().manual_seed(0))
    again = space.sample(torch.Generator().manual_seed(0))
    other = space.sample(torch.Generator().manual_seed(1))
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


# --------------------------------------------------------------------------------------------- node space
def _best_error_on_a_grid(space: NodeSpace, model: nn.Module) -> float:
    """Independent check: the best budget error any common keep fraction on a fine grid reaches."""
    total = sum(p.numel() for p in default_sparsifiable_parameters(model).values())
    target = (1 - space.sparsity) * total
    best = math.inf
    for step in range(1, 20001):
        units = {group.name: max(1, round(step / 20000 * group.units)) for group in space.groups}
        best = min(best, abs(space._kept_weights(units) - target))
    return best / total


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_node_space_hits_the_weight_budget_as_closely_as_whole_neurons_allow(sparsity):
    model = _mlp()
    space = NodeSpace(model, sparsity)
    masks = space.sample(torch.Generator().manual_seed(0))
    achieved = weight_sparsity(masks)
    assert achieved == pytest.approx(space.achieved_sparsity, abs=1e-12)
    assert abs(achieved - sparsity) <= _best_error_on_a_grid(space, model) + 1e-12
    assert abs(achieved - sparsity) < 0.01
    # the same fraction of units in every hidden layer (up to rounding)
    for group in space.groups:
        assert space.kept_units[group.name] == max(1, round(space.keep_fraction * group.units))
    assert node_sparsity(model, masks) == pytest.approx(space.achieved_node_sparsity)


def test_node_space_removes_whole_neurons_so_their_biases_no_longer_matter():
    model = _mlp()
    masks = NodeSpace(model, 0.8).sample(torch.Generator().manual_seed(3))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in masks:
                parameter.mul_(masks[name])
    x = torch.randn(16, 40)
    before = model(x)
    removed = ~masks["layers.0.weight"].any(dim=1)
    assert 0 < int(removed.sum()) < 96
    assert torch.equal(~masks["layers.1.weight"].any(dim=0), removed)  # their outgoing columns are gone too
    with torch.no_grad():
        model.layers[0].bias[removed] += 100.0
    assert torch.equal(model(x), before)


@pytest.mark.parametrize("input_shape", [(40,), (1, 8, 8)])
def test_cnn_node_space_removes_channels_including_their_classifier_columns(input_shape):
    model = build_model("cnn", input_shape, 10, widths=(8, 12), seed=0)
    space = NodeSpace(model, 0.7)
    masks = space.sample(torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in masks:
                parameter.mul_(masks[name])
    removed = ~masks["convs.1.weight"].reshape(12, -1).any(dim=1)
    assert int(removed.sum()) == 12 - space.kept_units["convs.1.weight"]
    x = torch.randn(4, *input_shape)
    before = model(x)
    with torch.no_grad():
        model.convs[1].bias[removed] += 50.0
    assert torch.equal(model(x), before)
    assert node_sparsity(model, masks) == pytest.approx(space.achieved_node_sparsity)


def test_node_space_works_on_a_plain_sequential_mlp():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 3))
    space = NodeSpace(model, 0.5)
    masks = space.sample(torch.Generator().manual_seed(0))
    assert set(masks) == {"0.weight", "2.weight", "4.weight"}
    assert weight_sparsity(masks) == pytest.approx(0.5, abs=0.05)


def test_node_space_refuses_a_model_whose_wiring_it_cannot_know():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Conv1d(1, 2, 3)

    with pytest.raises(ValueError, match=r"no unit of Branchy can be removed.*torch.fx cannot trace Branchy"):
        NodeSpace(Branchy(), 0.5)


def test_node_sparsity_counts_units_cut_off_by_unstructured_masks():
    model = build_model("mlp", (6,), 2, widths=(4,), seed=0)
    masks = {
        "layers.0.weight": torch.ones(4, 6, dtype=torch.bool),
        "layers.1.weight": torch.ones(2, 4, dtype=torch.bool),
    }
    assert node_sparsity(model, masks) == 0.0
    masks["layers.0.weight"][1] = False  # unit 1 has no inputs
    masks["layers.1.weight"][:, 3] = False  # unit 3 has no outputs
    assert node_sparsity(model, masks) == 0.5


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan"), "dense"])
@pytest.mark.parametrize("space", ["node", "weight"])
def test_sparsity_outside_zero_one_is_rejected(space, bad):
    with pytest.raises(ValueError, match=r"sparsity must be (a number )?in \[0, 1\)"):
        make_space(space, _mlp(), bad)


def test_unknown_space_and_distribution_are_named():
    with pytest.raises(ValueError, match="unknown search space 'edge'; allowed: node, weight"):
        make_space("edge", _mlp(), 0.5)
    with pytest.raises(ValueError, match="unknown distribution 'gaussian'; allowed: uniform, er, erk"):
        WeightSpace(_mlp(), 0.5, "gaussian")


def test_rescaling_restores_each_units_initial_signal_to_the_dense_scale():
    model = _mlp()
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    masks = NodeSpace(model, 0.9).sample(torch.Generator().manual_seed(0))
    masks["layers.0.weight"][0] = False  # a unit with no kept input is left alone
    rescale_to_fan_in(model, masks)
    weights = dict(model.named_parameters())
    kept_inputs = int(masks["layers.1.weight"][masks["layers.1.weight"].any(dim=1)][0].sum())
    row = int(masks["layers.1.weight"].any(dim=1).nonzero()[0])
    assert torch.allclose(
        weights["layers.1.weight"][row], original["layers.1.weight"][row] * math.sqrt(96 / kept_inputs)
    )
    assert torch.equal(weights["layers.0.weight"][0], original["layers.0.weight"][0])
    assert torch.equal(weights["layers.0.bias"], original["layers.0.bias"])
    # pre-activations of kept units keep the dense parent's scale on random inputs
    kept_rows = masks["layers.1.weight"].any(dim=1)
    h = torch.randn(4096, 96)
    with torch.no_grad():
        dense_std = (h @ original["layers.1.weight"].T).std()
        sparse_std = (h @ (weights["layers.1.weight"] * masks["layers.1.weight"])[kept_rows].T).std()
    assert float(sparse_std / dense_std) == pytest.approx(1.0, abs=0.1)


# ------------------------------------------------------------------------------------------------ scorers
def test_synflow_scores_zero_for_a_candidate_that_cuts_every_path_and_more_for_supersets():
    model = _mlp()
    space = WeightSpace(model, 0.9, "uniform")
    masks = space.sample(torch.Generator().manual_seed(0))
    superset = {
        name: mask | WeightSpace(model, 0.9, "uniform").sample(torch.Generator().manual_seed(1))[name]
        for name, mask in masks.items()
    }
    cut = {name: mask.clone() for name, mask in masks.items()}
    cut["layers.2.weight"][:] = False
    before = [p.clone() for p in model.parameters()]
    assert synflow_score(model, cut, (40,)) == 0.0
    assert synflow_score(model, superset, (40,)) > synflow_score(model, masks, (40,)) > 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # model untouched


def test_snip_ignores_the_values_of_masked_weights(digits):
    model = build_model("mlp", digits.input_shape, 10, widths=(32,), seed=0)
    masks = WeightSpace(model, 0.7, "uniform").sample(torch.Generator().manual_seed(0))
    batch = (digits.x_train[:64], digits.y_train[:64])
    score = snip_score(model, masks, batch)
    with torch.no_grad():
        model.layers[0].weight[~masks["layers.0.weight"]] = 3.0
    assert snip_score(model, masks, batch) == pytest.approx(score, rel=1e-6)
    assert score > 0


# ------------------------------------------------------------------------------------------ random search
def _search(data, scorer: str, seed: int = 0, space: str = "weight"):
    def factory() -> nn.Module:
        return build_model("mlp", data.input_shape, 10, widths=(32, 32), seed=0)

    return random_search(
        make_space(space, factory(), 0.8),
        factory,
        data,
        scorer=scorer,
        n_candidates=4,
        seed=seed,
        short_train_steps=5,
        batch_size=32,
        budget=TrainBudget(lr=0.1),
    )


@pytest.mark.parametrize("scorer", ["synflow", "snip", "short-train"])
def test_random_search_keeps_the_best_scored_candidate_deterministically(digits, scorer):
    result = _search(digits, scorer)
    again = _search(digits, scorer)
    assert len(result.scores) == 4
    assert result.scores == again.scores and result.best_index == again.best_index
    assert all(torch.equal(result.best_masks[n], again.best_masks[n]) for n in result.best_masks)
    assert result.scores[result.best_index] == max(result.scores)
    assert weight_sparsity(result.best_masks) == pytest.approx(0.8, abs=1e-3)
    if scorer == "short-train":
        tied = [i for i, s in enumerate(result.scores) if s == max(result.scores)]
        assert result.best_index == min(tied, key=lambda i: result.val_losses[i])


def test_short_train_search_never_looks_at_the_test_split(digits):
    scrambled = dataclasses.replace(digits, x_test=torch.zeros_like(digits.x_test), y_test=digits.y_test.flip(0))
    original, blind = _search(digits, "short-train", space="node"), _search(scrambled, "short-train", space="node")
    assert original.scores == blind.scores and original.best_index == blind.best_index


def test_random_search_rejects_bad_settings(digits):
    space = WeightSpace(_mlp(), 0.5)
    with pytest.raises(ValueError, match="unknown scorer 'grasp'; allowed: synflow, snip, short-train"):
        random_search(space, _mlp, digits, scorer="grasp", n_candidates=2, seed=0)
    with pytest.raises(ValueError, match="n_candidates must be a positive integer, got 0"):
        random_search(space, _mlp, digits, scorer="snip", n_candidates=0, seed=0)
    with pytest.raises(ValueError, match="short_train_steps must be a positive integer, got 0"):
        random_search(space, _mlp, digits, scorer="short-train", n_candidates=1, seed=0, short_train_steps=0)


@pytest.mark.parametrize("scorer", ["synflow", "snip", "short-train"])
def test_search_flops_count_every_candidates_scoring(digits, scorer):
    result = _search(digits, scorer)
    model = build_model("mlp", digits.input_shape, 10, widths=(32, 32), seed=0)
    weights = {name: p for name, p in model.named_parameters() if name.endswith("weight")}
    masks = result.best_masks  # every weight-space sample keeps the same number of weights per layer
    forward_nonzero = sum(2 * int(masks[name].sum()) for name in weights)
    forward_dense = sum(2 * w.numel() for w in weights.values())
    per_candidate = {
        "synflow": 2 * forward_nonzero + forward_dense,  # one sample of ones
        "snip": 32 * (2 * forward_nonzero + forward_dense),  # one batch, dense weight gradients
        "short-train": 5 * 32 * 3 * forward_nonzero + len(digits.y_val) * forward_nonzero,  # steps + validation
    }[scorer]
    assert result.flops == 4 * per_candidate
