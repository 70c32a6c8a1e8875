"""Sparse-IFT: each family spends the dense layer's FLOPs, trains under RigL with fixed counts, works as an arm."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsearch as sa
from sparsearch.algorithms import ARMS, ArmSetting, SparseDoped, SparseFactorized, SparseParallel
from sparsearch.models import build_model, count_flops


class ResidualNet(nn.Module):
    """Not one of the package's models: conv stem, a residual block with BatchNorm, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.conv_a = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(8)
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1)
        self.hidden = nn.Linear(8 * 16, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x.reshape(len(x), 1, 4, 4)))
        x = x + self.conv_b(torch.relu(self.norm(self.conv_a(x))))
        return self.head(torch.relu(self.hidden(x.flatten(1))))


def _models():
    return {
        "mlp": (build_model("mlp", (1, 8, 8), 10, widths=(48, 40, 32), seed=0), (1, 8, 8)),
        "cnn": (build_model("cnn", (1, 8, 8), 10, widths=(6, 8, 8), seed=0), (1, 8, 8)),
        "residual": (ResidualNet(), (16,)),
    }


@pytest.mark.parametrize("family", ["wide", "parallel", "factorized", "doped"])
@pytest.mark.parametrize("sparsity", [0.5, 0.75, 0.9])
@pytest.mark.parametrize("model_name", ["mlp", "cnn", "residual"])
def test_the_transformed_model_spends_the_dense_models_flops_and_is_larger(family, sparsity, model_name):
    model, shape = _models()[model_name]
    if family == "wide" and model_name == "residual":
        pytest.skip("Sparse Wide needs hidden_layers(); the residual net is covered by the error test")
    dense = count_flops(model, shape).dense
    dense_weights = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight") and p.ndim > 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = sa.SparseIFT(family, sparsity, total_steps=20, update_every=5).attach(model, optimizer)
    flops = count_flops(model, shape)
    # Within rounding: at most one weight per sparse factor, applied at every position of a conv.
    rounding = 2 * len(sparsifier.plan.layer_sparsities) * 16
    assert abs(flops.nonzero - dense) <= rounding, (flops.nonzero, dense)
    weights = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight") and p.ndim > 1)
    assert weights > dense_weights  # more capacity for the same FLOPs
    expected_kinds = {"parallel": SparseParallel, "factorized": SparseFactorized, "doped": SparseDoped}
    if family in expected_kinds:
        assert sum(isinstance(m, expected_kinds[family]) for m in model.modules()) == len(sparsifier.plan.replaced)
    assert model(torch.randn(5, *shape)).shape[1] in (3, 10)


def test_each_replaced_layer_matches_its_own_dense_flops_not_only_the_total():
    model = build_model("mlp", (1, 8, 8), 10, widths=(48, 40, 32), seed=0)
    plan = sa.sparse_ift(model, "factorized", 0.75)
    assert plan.replaced == ("layers.1", "layers.2")  # first and last stay dense, as in the paper
    for name, dense_weights in (("layers.1", 48 * 40), ("layers.2", 40 * 32)):
        first, second = model.get_submodule(f"{name}.first").weight, model.get_submodule(f"{name}.second").weight
        kept = sum(round((1 - plan.layer_sparsities[f"{name}.{leaf}.weight"]) * w.numel())
                   for leaf, w in (("first", first), ("second", second)))
        assert abs(kept - dense_weights) <= 1
        hidden = first.shape[0]
        assert hidden == round(dense_weights / (0.25 * (first.shape[1] + second.shape[0])))


def test_rigl_moves_the_sparse_weights_but_keeps_every_layers_count_and_leaves_the_low_rank_path_dense():
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 4, widths=(32, 32, 16), seed=0)
    x = torch.randn(64, 1, 8, 8)
    y = (x.flatten(1)[:, :4].argmax(1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = sa.SparseIFT("doped", 0.75, total_steps=40, update_every=5).attach(model, optimizer)
    start_masks = {name: mask.clone() for name, mask in sparsifier.masks.items()}
    assert set(start_masks) == {"layers.1.sparse.weight", "layers.2.sparse.weight"}
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    for name, mask in sparsifier.masks.items():
        assert int(mask.sum()) == int(start_masks[name].sum())
        assert not torch.equal(mask, start_masks[name])  # RigL changed the connectivity
        assert int((model.get_parameter(name) != 0).sum()) <= int(mask.sum())
    low_rank = model.get_submodule("layers.1.low_rank")[0].weight
    assert int((low_rank != 0).sum()) == low_rank.numel()


@pytest.mark.parametrize("family", ["wide", "parallel"])
def test_the_study_arm_transforms_the_study_model_and_trains_it(family):
    from sparsearch.data import load_dataset
    from sparsearch.training import TrainBudget, train

    data = load_dataset("digits", seed=0)
    model = build_model("mlp", data.input_shape, data.num_classes, widths=(32, 32, 32), seed=0)
    dense_flops = count_flops(model, data.input_shape).dense
    factory = ARMS.get(f"sift-{family}")
    budget = TrainBudget(epochs=3, batch_size=32, lr=0.05)

    def build(total_steps: int) -> sa.Sparsifier:
        return factory(ArmSetting(sparsity=0.75, total_steps=total_steps, steps_per_epoch=41, seed=0,
                                  distribution="erk"))

    result = train(model, data, budget, seed=0, sparsifier_factory=build)
    assert result.final_test_accuracy > 0.5
    assert result.forward_flops.nonzero == pytest.approx(dense_flops, abs=64)
    assert result.forward_flops.dense > 2 * dense_flops


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: sa.sparse_ift(m, "wide", 0.2), "k = round(1/(1-s)) = 1"),
        (lambda m: sa.sparse_ift(m, "tall", 0.5), "unknown Sparse-IFT family 'tall'"),
        (lambda m: sa.sparse_ift(m, "wide", 0.75, width=0.8), "width factor 0.8 is below 1"),
        (lambda m: sa.sparse_ift(m, "parallel", 0.75, width=2.0), "width=2.0 applies to the 'wide' family only"),
        (lambda m: sa.sparse_ift(nn.Sequential(nn.Linear(4, 4)), "parallel", 0.5), "no Linear/Conv layer between"),
        (lambda m: sa.sparse_ift(ResidualNet(), "wide", 0.5), "ResidualNet has no hidden_layers()"),
        (
            lambda m: sa.sparse_ift(nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 1), nn.Linear(1, 3)), "doped", 0.5),
            "low-rank path of rank 0",
        ),
    ],
)
def test_bad_settings_are_refused_before_the_model_changes(call, message):
    model = build_model("mlp", (1, 8, 8), 10, widths=(48, 40, 32), seed=0)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    with pytest.raises(ValueError) as error:
        call(model)
    assert message in str(error.value)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_attaching_after_training_started_is_refused():
    model = build_model("mlp", (1, 8, 8), 10, widths=(16, 16, 16), seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    F.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.zeros(4, dtype=torch.long)).backward()
    optimizer.step()
    with pytest.raises(RuntimeError, match="already taken steps"):
        sa.SparseIFT("parallel", 0.5, total_steps=10, update_every=2).attach(model, optimizer)
    assert math.isfinite(float(model.layers[1].weight.sum()))
