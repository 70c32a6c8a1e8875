"""Data-parallel sparse training on 2 real processes (gloo): masks identical by construction, divergence caught,
gradient accumulation, a dying rank, checkpoints across world sizes, and the torchrun example."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import sparsearch as sa
from sparsearch.engine.distributed import MaskSync, mask_checksum, synchronize, verify

TESTS = Path(__file__).parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))
from distributed_worker import ResidualAttentionNet, batch  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(
    scenario: str,
    out: Path,
    *extra: str,
    world: int = 2,
    timeout: float = 300,
    dist_timeout: int = 30,
    env: dict[str, str] | None = None,
):
    """Start ``world`` worker processes and wait for all; returns their exit codes and outputs."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(world),
        "DIST_TIMEOUT": str(dist_timeout),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        **(env or {}),
    }
    command = [sys.executable, str(TESTS / "distributed_worker.py"), scenario, str(out), *extra]
    processes = [
        subprocess.Popen(command, env={**env, "RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for rank in range(world)
    ]
    codes, outputs = [], []
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            output, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            raise AssertionError(f"{scenario}: a rank still ran after {timeout} s (hang)") from None
        codes.append(process.returncode)
        outputs.append(output.decode(errors="replace"))
    return codes, outputs


def results(out: Path, scenario: str, world: int = 2) -> list[dict]:
    return [json.loads((out / f"{scenario}_rank{rank}.json").read_text()) for rank in range(world)]


@pytest.fixture(scope="module")
def masks_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_masks")
    codes, outputs = launch("masks", out)
    assert codes == [0, 0], outputs
    return out, results(out, "masks")


@pytest.mark.parametrize("algorithm", ["rigl", "set", "gmp", "srste"])
def test_masks_identical_across_ranks_with_different_data_and_seeds(masks_run, algorithm):
    out, ranks = masks_run
    masks = [load_file(str(out / f"{algorithm}_masks_rank{rank}.safetensors")) for rank in range(2)]
    assert masks[0].keys() == masks[1].keys()
    # forward-masking algorithms (SR-STE) leave attention alone: nn.MultiheadAttention reads out_proj.weight itself
    assert ("attention.out_proj.weight" in masks[0]) == (algorithm != "srste")
    for name in masks[0]:
        assert torch.equal(masks[0][name], masks[1][name]), name
    # the masks really moved and every rank took rank 0's seed
    assert all(r[algorithm]["changed"] > 0 for r in ranks)
    assert [r[algorithm]["seed"] for r in ranks] == [0, 0]
    if algorithm in ("rigl", "set"):
        assert [r[algorithm]["updates"] for r in ranks] == [4, 4]  # steps 3, 6, 9, 12
    target = 0.5 if algorithm == "srste" else 0.8
    assert ranks[0][algorithm]["mask_sparsity"] == pytest.approx(target, abs=0.01)


def test_corrupted_mask_on_one_rank_is_named_on_every_rank(masks_run):
    _, ranks = masks_run
    for result in ranks:
        message = result["corrupted"]
        assert message is not None
        assert "layer 'block.0.weight'" in message and "rank 0:" in message and "rank 1:" in message
        assert "optimizer step 3" in message
        assert "stem.weight" not in message  # only the corrupted layer is named


def test_optimizer_steps_inside_no_sync_are_caught(masks_run):
    # per-rank gradients make RigL grow different weights on each rank: the next check fails loudly
    _, ranks = masks_run
    for result in ranks:
        assert result["unsynced_steps"] is not None and "masks differ across ranks" in result["unsynced_steps"]


def test_refused_set_ups_say_what_to_do(masks_run):
    _, ranks = masks_run
    for result in ranks:
        refused = result["refused"]
        assert "ddp_model.module" in refused["wrapper"]
        assert "rank 1 has sparsity=0.7 where rank 0 has 0.8" in refused["settings"]
        assert "parameters" not in refused["settings"]  # only what differs is named
        for fsdp in ("fsdp1", "fsdp2"):
            assert "sharded by FSDP" in refused[fsdp] and "DistributedDataParallel" in refused[fsdp]
        assert "was replaced after the sparsifier was attached" in refused["fsdp2_after_attach"]


def test_no_sync_accumulation_gives_the_masks_of_the_large_batch(tmp_path):
    codes, outputs = launch("accumulation", tmp_path)
    assert codes == [0, 0], outputs
    for result in results(tmp_path, "accumulation"):
        assert result["steps"] == [7, 7]  # the micro-batches inside no_sync are not optimizer steps
        assert result["updates"] == [3, 3]
        assert result["differing_mask_entries"] == 0


@pytest.mark.parametrize("fault", ["dies", "stalls"])
def test_a_lost_rank_makes_the_others_fail_instead_of_hanging(tmp_path, fault):
    # a dead peer resets the connection at once; a stalled one is given up after init_process_group's timeout
    started = time.monotonic()
    env = {"STALL": "1" if fault == "stalls" else "0"}
    codes, outputs = launch("die", tmp_path, dist_timeout=8, timeout=150, env=env)
    assert codes[0] != 0 and codes[1] == 3
    survivor = json.loads((tmp_path / "die_rank0.json").read_text())
    assert survivor["error"] is not None, outputs[0]
    # gloo: "Connection reset/closed by peer"; "Timed out ..." or "Application timeout caused pair closure"
    expected = r"by peer" if fault == "dies" else r"(?i)time(d )?out"
    assert re.search(expected, survivor["error"]), survivor["error"]
    assert survivor["seconds"] < 20 and time.monotonic() - started < 150


def test_checkpoint_of_two_ranks_loads_on_one_and_back(masks_run, tmp_path):
    out, _ = masks_run
    rank0 = load_file(str(out / "rigl_masks_rank0.safetensors"))
    # world size 2 -> 1: a plain model, no process group, no 'module.' prefix
    model = ResidualAttentionNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = sa.RigL(0.8, update_every=3, stop=None).attach(model, optimizer)
    checkpoint = sa.load(model, out / "rigl_world2.safetensors")
    assert checkpoint.step == 13
    assert all(torch.equal(sparsifier.masks[name], rank0[name]) for name in rank0)
    for seed in range(3):
        x, y = batch(seed)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert sparsifier.updates >= 1
    single = sa.save(model, tmp_path / "world1.safetensors", sparsifier=sparsifier)
    # world size 1 -> 2: every rank loads the same file and the masks stay identical while training goes on
    codes, outputs = launch("resume", tmp_path, str(single))
    assert codes == [0, 0], outputs
    ranks = results(tmp_path, "resume")
    assert all(r["same_as_file"] and r["step"] == 20 for r in ranks)
    final = [load_file(str(tmp_path / f"resume_masks_rank{rank}.safetensors")) for rank in range(2)]
    assert all(torch.equal(final[0][name], final[1][name]) for name in final[0])


def test_torchrun_example_trains_rigl_on_two_processes(tmp_path):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(ROOT / "examples" / "ddp_rigl.py"), "--epochs", "3", "--out", str(tmp_path / "rigl.safetensors"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    updates = re.search(r"masks identical on 2 ranks after 60 steps and (\d+) RigL updates", done.stdout)
    assert updates and int(updates.group(1)) == 2, done.stdout  # at steps 20 and 40 (RigL stops at 75%)
    checkpoint = load_file(str(tmp_path / "rigl.safetensors"))
    masks = {k: v for k, v in checkpoint.items() if k.startswith("mask/")}
    kept = sum(int(v.sum()) for v in masks.values()) / sum(v.numel() for v in masks.values())
    assert kept == pytest.approx(0.1, abs=0.01)


def test_synchronize_refuses_bad_use_without_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        synchronize(sa.RigL(0.9, stop=None))
    with pytest.raises(RuntimeError, match="init_process_group"):
        MaskSync(check_every=1)
    model = ResidualAttentionNet()
    sparsifier = sa.RigL(0.9, stop=None).attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="before attach"):
        synchronize(sparsifier)
    with pytest.raises(RuntimeError, match="not synchronized"):
        verify(sparsifier)


def test_mask_checksum_sees_one_flipped_bit():
    mask = torch.rand(64, 33, generator=torch.Generator().manual_seed(0)) > 0.7
    flipped = mask.clone()
    flipped[10, 3] = ~flipped[10, 3]
    moved = mask.clone()  # same count, one kept weight moved
    first_kept, first_dropped = mask.view(-1).nonzero()[0], (~mask.view(-1)).nonzero()[0]
    moved.view(-1)[first_kept], moved.view(-1)[first_dropped] = False, True
    assert mask_checksum(mask) == mask_checksum(mask.clone())
    assert mask_checksum(mask) != mask_checksum(flipped)
    assert mask_checksum(mask)[0] == mask_checksum(moved)[0] and mask_checksum(mask) != mask_checksum(moved)
