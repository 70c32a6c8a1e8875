"""sparsearch.save / load: safetensors round trip, exact resume, and mismatches caught."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import sparsearch as sa


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))


def batches(start, stop):
    for index in range(start, stop):
        generator = torch.Generator().manual_seed(index)
        x = torch.randn(32, 12, generator=generator)
        yield x, x[:, :4].argmax(dim=1)


def train(model, optimizer, start, stop):
    for x, y in batches(start, stop):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_round_trip_keeps_weights_masks_and_metadata(tmp_path):
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = sa.SET(0.9, update_every=5).attach(model, optimizer)
    train(model, optimizer, 0, 12)
    path = sa.save(model, tmp_path / "model.safetensors", metadata={"dataset": "toy"})
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        info = json.loads(handle.metadata()["sparsearch"])
    assert {"model/0.weight", "model/0.bias", "mask/0.weight"} <= keys
    assert info["algorithm"] == "SET" and info["step"] == 12 and info["user"] == {"dataset": "toy"}
    assert info["config"]["sparsity"] == 0.9
    fresh = mlp(seed=1)
    checkpoint = sa.load(fresh, path)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)
    assert all(torch.equal(checkpoint.masks[k], v) for k, v in sparsifier.masks.items())
    assert checkpoint.step == 12
    # a plain dense model loads too: no sparsifier, no mask buffers, same state_dict keys
    static = sa.StaticMaskSparsifier(checkpoint.masks).attach(fresh)
    assert static.overall_sparsity() == pytest.approx(sparsifier.overall_sparsity())


@pytest.mark.parametrize(
    "make",
    [
        lambda p: (
            sa.RigL(0.8, total_steps=60, update_every=10),
            torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
        ),
        lambda p: (sa.GMP(0.8, total_steps=60, update_every=10), torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)),
        lambda p: (sa.SRSTE(2, 4), torch.optim.Adam(p, lr=1e-2)),
    ],
    ids=["rigl-sgd", "gmp-adamw", "srste-adam"],
)
def test_resume_from_checkpoint_continues_bit_identically(tmp_path, make):
    model = mlp()
    sparsifier, optimizer = make(model.parameters())
    sparsifier.attach(model, optimizer)
    train(model, optimizer, 0, 25)
    path = sa.save(model, tmp_path / "ckpt.safetensors", optimizer=optimizer)
    train(model, optimizer, 25, 60)

    resumed = mlp(seed=7)
    resumed_sparsifier, resumed_optimizer = make(resumed.parameters())
    resumed_sparsifier.attach(resumed, resumed_optimizer)
    sa.load(resumed, path, optimizer=resumed_optimizer)
    assert resumed_sparsifier.step == 25
    train(resumed, resumed_optimizer, 25, 60)
    for key, value in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert all(torch.equal(resumed_sparsifier.masks[k], v) for k, v in sparsifier.masks.items())
    assert resumed_sparsifier.dense_gradient_steps == sparsifier.dense_gradient_steps


def test_imp_arm_state_round_trips_its_rewind_point(tmp_path):
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    arm = sa.IterativeMagnitudePruning(0.8, phases=2, total_steps=30, rewind_step=2).attach(model, optimizer)
    train(model, optimizer, 0, 5)
    path = sa.save(model, tmp_path / "imp.safetensors", optimizer=optimizer)
    resumed = mlp()
    resumed_optimizer = torch.optim.SGD(resumed.parameters(), lr=0.1)
    resumed_arm = sa.IterativeMagnitudePruning(0.8, phases=2, total_steps=30, rewind_step=2)
    resumed_arm.attach(resumed, resumed_optimizer)
    sa.load(resumed, path, optimizer=resumed_optimizer)
    assert all(torch.equal(resumed_arm.rewind_weights[k], v) for k, v in arm.rewind_weights.items())


def test_shape_mismatch_is_rejected_with_the_key(tmp_path):
    path = sa.save(mlp(), tmp_path / "a.safetensors")
    other = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"'2\.(weight|bias)' has shape \(16(, 32)?,?\), the model has \(8"):
        sa.load(other, path)
    with pytest.raises(ValueError, match="missing keys"):
        sa.load(nn.Sequential(nn.Linear(12, 32)), path)


def test_mask_mismatch_is_rejected(tmp_path):
    model = mlp()
    sa.Sparsifier(0.5).attach(model)
    path = sa.save(model, tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = handle.metadata()
    tensors["model/0.weight"] = torch.ones(32, 12)  # weights alive where the mask is zero
    save_file(tensors, str(tmp_path / "revived.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match=r"weights of '0\.weight' are non-zero where its mask is zero"):
        sa.load(mlp(), tmp_path / "revived.safetensors")
    tensors = {k: v for k, v in tensors.items() if k != "model/0.weight"}
    tensors["model/0.weight"] = torch.zeros(32, 12)
    tensors["mask/0.weight"] = torch.ones(4, 4, dtype=torch.bool)
    save_file(tensors, str(tmp_path / "shape.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match=r"mask for '0\.weight' has shape \(4, 4\)"):
        sa.load(mlp(), tmp_path / "shape.safetensors")
    different = mlp()
    sa.Sparsifier(0.5, include=r"^0\.weight$").attach(different)
    with pytest.raises(ValueError, match="the sparsifier masks"):
        sa.load(different, path)


def test_bad_files_are_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        sa.load(mlp(), tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        sa.load(mlp(), tmp_path / "junk.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="no sparsearch metadata"):
        sa.load(mlp(), tmp_path / "foreign.safetensors")
    path = sa.save(mlp(), tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="holds no optimizer state"):
        sa.load(mlp(), path, optimizer=torch.optim.SGD(mlp().parameters(), lr=0.1))
    with pytest.raises(ValueError, match="JSON-serialisable"):
        sa.save(mlp(), tmp_path / "bad.safetensors", metadata={"when": object()})
