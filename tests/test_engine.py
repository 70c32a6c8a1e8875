"""The Sparsifier engine: invariants under real optimizers, state_dict keys, reporting, bad input."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsearch as sa
from sparsearch.engine import Sparsifier, StaticMaskSparsifier


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.embed = nn.Embedding(5, 4)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(self.conv(x)))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def _batches(steps: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randn(16, 2, 4, 4, generator=generator), torch.randint(0, 3, (16,), generator=generator)


def _train(model, optimizer, steps, seed=0, check=None, dtype=torch.float32):
    for x, y in _batches(steps, seed):
        loss = F.cross_entropy(model(x.to(dtype) if x.is_floating_point() else x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if check is not None:
            check()


OPTIMIZERS = {
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.1),
}


@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_invariants_hold_for_hundreds_of_steps(optimizer_name):
    torch.manual_seed(0)
    model = Net()
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    sparsifier = sa.RigL(0.8, total_steps=200, update_every=30, distribution="erk").attach(model, optimizer)
    masked_params = {name: dict(model.named_parameters())[name] for name in sparsifier.masks}

    def check():
        for name, mask in sparsifier.masks.items():
            param = masked_params[name]
            assert (param[~mask] == 0).all(), f"{name}: a pruned weight was revived"
            assert (param.grad[~mask] == 0).all(), f"{name}: gradient not masked"
            for key, value in optimizer.state[param].items():
                if torch.is_tensor(value) and value.shape == param.shape:
                    assert (value[~mask] == 0).all(), f"{name}: optimizer state {key} alive at a masked position"

    _train(model, optimizer, 200, check=check)
    assert sparsifier.updates == 4  # steps 30..120: masks really moved (stop at 75% = 150)
    assert sparsifier.overall_sparsity() >= 0.8
    report = {row.name: row for row in sparsifier.report()}
    assert set(report) == {"conv.weight", "fc1.weight", "fc2.weight"}  # not biases, norms or embeddings
    assert all(row.target_sparsity <= row.actual_sparsity for row in report.values())


def test_state_dict_keys_unchanged_and_masks_follow_device_moves():
    model = Net()
    keys = list(model.state_dict())
    sparsifier = Sparsifier(0.5).attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert list(model.state_dict()) == keys
    assert model.fc1.weight_mask.dtype == torch.bool
    model.to(torch.float64)
    assert sparsifier.masks["fc1.weight"].dtype == torch.bool
    fresh = Net()
    fresh.load_state_dict(model.to(torch.float32).state_dict())  # plain loading code still works, strict
    # a device move (the meta device stands in for an accelerator): the masks are buffers, they move along
    model.to("meta")
    assert {mask.device.type for mask in sparsifier.masks.values()} == {"meta"}
    assert model.fc1.weight_mask is sparsifier.masks["fc1.weight"]


def test_masked_training_goes_on_after_a_dtype_move():
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = Sparsifier(0.5).attach(model, optimizer)
    model.to(torch.float64)
    _train(model, optimizer, 3, dtype=torch.float64)
    for name, mask in sparsifier.masks.items():
        param = sparsifier.params[name]
        assert param.dtype == torch.float64 and not param[~mask].any(), name


@pytest.mark.parametrize("distribution", ["uniform", "er", "erk", "global"])
def test_distributions_reach_exact_target(distribution):
    model = Net()
    sparsifier = Sparsifier(0.9, distribution=distribution).attach(model)
    total = sum(m.numel() for m in sparsifier.masks.values())
    kept = sum(int(m.sum()) for m in sparsifier.masks.values())
    assert kept == round(0.1 * total)
    assert sparsifier.overall_sparsity() == pytest.approx(1 - kept / total)


def test_custom_distribution_and_include_pattern():
    model = Net()
    sparsifier = Sparsifier(distribution={"fc1.weight": 0.75}, include=r"^fc\d\.weight$").attach(model)
    rows = {row.name: row for row in sparsifier.report()}
    assert rows["fc1.weight"].target_sparsity == pytest.approx(0.75) and rows["fc2.weight"].target_sparsity == 0
    embedding = Sparsifier(0.5, include="embed").attach(Net())
    assert list(embedding.masks) == ["embed.weight"]


def test_structures_through_the_engine():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    Sparsifier(structure="2:4").attach(model)
    assert (model[0].weight_mask.reshape(-1, 4).sum(dim=1) == 2).all()
    assert (model[2].weight_mask.reshape(-1, 4).sum(dim=1) == 2).all()
    with pytest.raises(ValueError, match=r"input dimension of 'conv\.weight' to be divisible by M=4"):
        Sparsifier(structure="2:4").attach(Net())
    with pytest.raises(ValueError, match="contradicts the 2:4 structure"):
        Sparsifier(0.9, structure="2:4")
    skipped = Sparsifier(structure="2:4", incompatible="dense").attach(nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 2)))
    assert list(skipped.masks) == ["1.weight"]


def test_skip_optimizer_step_restores_weights_and_state():
    class Skipper(Sparsifier):
        def before_step(self):
            if self.step == 3:
                self.skip_optimizer_step()

    model = Net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    Skipper(0.5).attach(model, optimizer)
    _train(model, optimizer, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state_before = {k: v.clone() for k, v in optimizer.state[model.fc1.weight].items()}
    _train(model, optimizer, 1, seed=1)
    for key, value in model.state_dict().items():
        if "running" not in key and "num_batches" not in key:
            assert torch.equal(value, before[key]), key
    assert all(torch.equal(v, state_before[k]) for k, v in optimizer.state[model.fc1.weight].items())


def test_report_and_summary_name_every_layer():
    sparsifier = Sparsifier(0.75).attach(Net())
    text = sparsifier.summary()
    assert "fc1.weight" in text and "overall" in text and "75.00%" in text


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5, float("nan"), "high"])
def test_sparsity_outside_range_is_rejected(sparsity):
    with pytest.raises(ValueError, match="sparsity"):
        Sparsifier(sparsity)


def test_attaching_twice_is_rejected():
    model = Net()
    sparsifier = Sparsifier(0.5).attach(model)
    with pytest.raises(RuntimeError, match="already attached"):
        sparsifier.attach(Net())
    with pytest.raises(RuntimeError, match="model already has a Sparsifier attached"):
        Sparsifier(0.5).attach(model)
    sparsifier.detach()
    Sparsifier(0.5).attach(model)  # fine after detach


def test_pattern_matching_nothing_is_rejected():
    with pytest.raises(ValueError, match=r"pattern 'decoder' matches no parameter; the model has: conv.weight"):
        Sparsifier(0.5, include="decoder").attach(Net())


def test_optimizer_without_the_models_parameters_is_rejected():
    model = Net()
    other = torch.optim.SGD(Net().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="optimizer does not hold the model's parameters"):
        Sparsifier(0.5).attach(model, other)
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer"):
        Sparsifier(0.5).attach(Net(), "sgd")


def test_bad_distribution_and_layer_names():
    with pytest.raises(ValueError, match="unknown distribution 'gaussian'"):
        Sparsifier(0.5, distribution="gaussian")
    with pytest.raises(ValueError, match=r"dense_layers names unknown parameters \['fc9.weight'\]"):
        Sparsifier(0.5, dense_layers=("fc9.weight",)).attach(Net())
    with pytest.raises(ValueError, match=r"custom distribution names unknown parameters \['fc9.weight'\]"):
        Sparsifier(distribution={"fc9.weight": 0.5}).attach(Net())


def test_loading_mismatched_sparsifier_state_is_rejected():
    model = Net()
    sparsifier = Sparsifier(0.5).attach(model)
    state = sparsifier.state_dict()
    state["masks"]["fc1.weight"] = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"mask for 'fc1.weight' has shape \(3, 3\), parameter has \(32, 128\)"):
        sparsifier.load_state_dict(state)
    del state["masks"]["fc1.weight"]
    with pytest.raises(ValueError, match="checkpoint masks name parameters"):
        sparsifier.load_state_dict(state)


def test_static_mask_sparsifier_keeps_given_masks():
    model = Net()
    mask = torch.rand(32, 128) > 0.7
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    StaticMaskSparsifier({"fc1.weight": mask}).attach(model, optimizer)
    _train(model, optimizer, 20)
    assert torch.equal(model.fc1.weight != 0, mask)


def test_unknown_optimizers_are_remasked_after_every_step():
    class NoisySGD(torch.optim.SGD):
        """An optimizer that touches every weight (like a non-elementwise preconditioner would)."""

        @torch.no_grad()
        def step(self, closure=None):
            super().step(closure)
            for group in self.param_groups:
                for p in group["params"]:
                    p.add_(0.01)

    model = Net()
    optimizer = NoisySGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = Sparsifier(0.7).attach(model, optimizer)
    _train(model, optimizer, 5)
    assert sparsifier.overall_sparsity() == pytest.approx(0.7, abs=1e-3)


def test_state_from_dense_training_is_masked_at_attach():
    model = Net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, optimizer, 5)  # dense warm-up fills the Adam moments everywhere
    sparsifier = Sparsifier(0.8).attach(model, optimizer)
    _train(model, optimizer, 20, seed=1)
    for name, mask in sparsifier.masks.items():
        param = dict(model.named_parameters())[name]
        assert (param[~mask] == 0).all()
        assert (optimizer.state[param]["exp_avg"][~mask] == 0).all()
        assert (optimizer.state[param]["exp_avg_sq"][~mask] == 0).all()
