"""The sparsifiers, the study's training loop and one-shot pruning on a CUDA device (skipped without one).

CI has no GPU; these run where one is (`pytest tests/test_cuda.py`). They check what a CPU run cannot: that masks,
scores and optimizer state live on the model's device, that no step silently moves a tensor to the CPU, and that
what a GPU run saves loads back.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsearch as sa

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

STEPS = 40


class ResidualNet(nn.Module):
    """Conv + BatchNorm + a residual add + attention + a Linear head: not one of the package's models."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        h = h + self.block(h)
        tokens = h.flatten(2).transpose(1, 2)
        tokens = tokens + self.attention(tokens, tokens, tokens, need_weights=False)[0]
        return self.head(tokens.mean(1))


def _train(sparsifier_factory) -> tuple[nn.Module, sa.Sparsifier, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = ResidualNet().cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    sparsifier = sparsifier_factory().attach(model, optimizer)
    generator = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(STEPS):
        x = torch.randn(32, 1, 8, 8, device="cuda", generator=generator)
        y = torch.randint(0, 10, (32,), device="cuda", generator=generator)
        F.cross_entropy(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return model, sparsifier, optimizer


SPARSIFIERS = {
    "static": lambda: sa.StaticRandom(0.9),
    "gmp": lambda: sa.GMP(0.9, update_every=5, total_steps=STEPS),
    "set": lambda: sa.SET(0.9, update_every=5, stop=30),
    "rigl": lambda: sa.RigL(0.9, update_every=5, total_steps=STEPS),
    "sr-ste": lambda: sa.SRSTE(2, 4, total_steps=STEPS, incompatible="dense"),  # the 1-channel stem stays dense
}


@pytest.mark.parametrize("name", SPARSIFIERS)
def test_sparse_training_on_cuda_keeps_masks_on_the_device_and_weights_at_zero(name, tmp_path):
    model, sparsifier, optimizer = _train(SPARSIFIERS[name])
    targets = {row.name: row.target_sparsity for row in sparsifier.report()}
    for mask_name, mask in sparsifier.masks.items():
        assert mask.device.type == "cuda", mask_name
        # regrown weights start at zero (SET, RigL), so the mask, not the values, carries the target
        assert 1 - mask.float().mean().item() == pytest.approx(targets[mask_name], abs=0.01), mask_name
    for parameter_name, parameter in model.named_parameters():
        mask = sparsifier.masks.get(parameter_name)
        if mask is not None:
            assert parameter.device.type == "cuda"
            assert torch.count_nonzero(parameter.detach()[~mask.bool()]) == 0, parameter_name
    path = tmp_path / "model.safetensors"
    sa.save(model, path, sparsifier=sparsifier, optimizer=optimizer)
    fresh = ResidualNet().cuda()
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3, fused=True)
    SPARSIFIERS[name]().attach(fresh, fresh_optimizer)
    sa.load(fresh, path, optimizer=fresh_optimizer)
    for (key, value), (_, loaded) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert loaded.device == value.device and torch.equal(loaded, value), key


def test_the_study_training_loop_trains_a_model_on_cuda():
    from sparsearch.data import load_dataset
    from sparsearch.training import TrainBudget, train

    data = load_dataset("digits", seed=0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).cuda()
    result = train(
        model,
        data,
        TrainBudget(epochs=3, batch_size=64, lr=0.1),
        seed=0,
        sparsifier_factory=lambda total_steps: sa.RigL(0.9, update_every=10, total_steps=total_steps),
    )
    assert next(model.parameters()).device.type == "cuda"
    assert result.final_test_accuracy > 0.5


def test_one_shot_pruning_runs_on_the_model_device(gpt2_dir, texts):
    from sparsearch.oneshot import OneShotConfig, calibration_windows, load_pretrained, prune_model
    from sparsearch.oneshot.sequential import prunable_layers, weight_matrix

    for setting in ({"method": "magnitude"}, {"method": "wanda"}, {"method": "sparsegpt"}, {"dsnot": True}):
        model, tokenizer = load_pretrained(gpt2_dir)
        model.cuda()
        windows = calibration_windows(tokenizer, texts, n_tokens=1024, seq_len=32, seed=0)
        prune_model(model, windows, OneShotConfig(sparsity=0.5, **setting))
        for name, layer in prunable_layers(model.transformer.h[0]):
            weight = weight_matrix(layer)
            assert weight.device.type == "cuda", (setting, name)
            assert (weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01), (setting, name)
