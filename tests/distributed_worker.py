"""One rank of the data-parallel tests in test_distributed.py (launched there as real processes, gloo backend).

Usage: RANK=r WORLD_SIZE=n MASTER_ADDR=... MASTER_PORT=... python distributed_worker.py SCENARIO OUTDIR [CKPT]
Each rank writes OUTDIR/<scenario>_rank<r>.json (what happened) and the masks it ended with as safetensors.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import sparsearch as sa
from sparsearch.engine.distributed import MaskMismatchError, synchronize, verify


class ResidualAttentionNet(nn.Module):
    """Not the package's own model: BatchNorm, a residual block and multi-head attention."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(16, 32)
        self.norm = nn.BatchNorm1d(32)
        self.block = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm(self.stem(x)))
        h = h + self.block(h)
        tokens = h.view(-1, 4, 8)
        attended, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return self.head((tokens + attended).flatten(1))


def batch(seed: int, size: int = 16, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 16, generator=generator, dtype=dtype)
    return x, (x[:, :4].sum(dim=1) > 0).long() + 2 * (x[:, 4:8].sum(dim=1) > 0).long()


def masks_of(sparsifier: sa.Sparsifier) -> dict[str, torch.Tensor]:
    return {name: mask.clone().contiguous() for name, mask in sparsifier.masks.items()}


def train(model: nn.Module, optimizer: torch.optim.Optimizer, seeds: range, rank: int) -> None:
    for seed in seeds:
        x, y = batch(1000 * rank + seed)  # every rank sees different data
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def ddp_rigl(
    rank: int, seed: int, sparsity: float = 0.8, update_every: int = 3
) -> tuple[DistributedDataParallel, torch.optim.Optimizer]:
    torch.manual_seed(100 + rank)  # different initial weights per rank: DDP must broadcast rank 0's
    ddp = DistributedDataParallel(ResidualAttentionNet())
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    sparsifier = sa.RigL(sparsity, update_every=update_every, stop=None, seed=seed)
    synchronize(sparsifier, ddp).attach(ddp.module, optimizer)
    return ddp, optimizer


def scenario_masks(rank: int, world: int, out: Path) -> dict:
    """RigL, SET, GMP and SR-STE with per-rank data *and* per-rank seeds; then real and injected divergence."""
    result: dict = {}
    for name, make in {
        "rigl": lambda seed: sa.RigL(0.8, update_every=3, stop=None, seed=seed),
        "set": lambda seed: sa.SET(0.8, update_every=3, seed=seed),
        "gmp": lambda seed: sa.GMP(0.8, end=12, update_every=3, seed=seed),
        "srste": lambda seed: sa.SRSTE(2, 4, seed=seed),
    }.items():
        torch.manual_seed(100 + rank)
        ddp = DistributedDataParallel(ResidualAttentionNet())
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        sparsifier = synchronize(make(seed=rank), ddp).attach(ddp.module, optimizer)  # seed differs per rank
        initial = masks_of(sparsifier)
        train(ddp, optimizer, range(13), rank)
        verify(sparsifier)
        final = masks_of(sparsifier)
        result[name] = {
            "updates": getattr(sparsifier, "updates", None),
            "changed": sum(int((initial[k] != final[k]).sum()) for k in final),
            "seed": sparsifier.seed,
            "mask_sparsity": 1 - sparsifier.density(),
        }
        save_file(final, str(out / f"{name}_masks_rank{rank}.safetensors"))
        if name == "rigl" and rank == 0:
            sa.save(ddp.module, out / "rigl_world2.safetensors", sparsifier=sparsifier)
        dist.barrier()

    # injected: one flipped bit on rank 1 is found at the next step, on every rank, with layer and ranks named
    ddp, optimizer = ddp_rigl(rank, seed=0, update_every=100)
    train(ddp, optimizer, range(2), rank)
    if rank == 1:
        sparsifier = ddp.module._sparsearch_sparsifier
        corrupted = sparsifier.masks["block.0.weight"].clone()
        corrupted.view(-1)[5] ^= True
        sparsifier.set_masks({"block.0.weight": corrupted})
    try:
        train(ddp, optimizer, range(2, 4), rank)  # step 3 is checked during step 4
        result["corrupted"] = None
    except MaskMismatchError as error:
        result["corrupted"] = str(error)

    # real divergence: optimizer steps inside no_sync read per-rank gradients, so RigL grows differently
    ddp, optimizer = ddp_rigl(rank, seed=0, update_every=2)
    try:
        with ddp.no_sync():
            train(ddp, optimizer, range(4), rank)
        result["unsynced_steps"] = None
    except MaskMismatchError as error:
        result["unsynced_steps"] = str(error)

    # refused: the DDP wrapper itself, settings that differ across ranks, FSDP-sharded parameters
    refused = {}
    torch.manual_seed(0)
    ddp = DistributedDataParallel(ResidualAttentionNet())
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for case, attach in {
        "wrapper": lambda: synchronize(sa.RigL(0.8, stop=None)).attach(ddp, optimizer),
        "settings": lambda: synchronize(sa.RigL(0.8 if rank == 0 else 0.7, stop=None), ddp).attach(
            ddp.module, optimizer
        ),
    }.items():
        try:
            attach()
            refused[case] = None
        except ValueError as error:
            refused[case] = str(error)
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    flat = FullyShardedDataParallel(ResidualAttentionNet(), device_id=torch.device("cpu"))
    try:
        synchronize(sa.RigL(0.8, stop=None)).attach(flat, torch.optim.SGD(flat.parameters(), lr=0.1))
        refused["fsdp1"] = None
    except TypeError as error:
        refused["fsdp1"] = str(error)

    sharded = ResidualAttentionNet()
    fully_shard(sharded)
    try:
        synchronize(sa.RigL(0.8, stop=None)).attach(sharded, torch.optim.SGD(sharded.parameters(), lr=0.1))
        refused["fsdp2"] = None
    except TypeError as error:
        refused["fsdp2"] = str(error)
    # sharded after attach: the masked parameters are replaced; the first step says so instead of doing nothing
    model = ResidualAttentionNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    synchronize(sa.RigL(0.8, stop=None)).attach(model, optimizer)
    fully_shard(model)
    try:
        optimizer.step()
        refused["fsdp2_after_attach"] = None
    except RuntimeError as error:
        refused["fsdp2_after_attach"] = str(error)
    result["refused"] = refused
    return result


def scenario_accumulation(rank: int, world: int, out: Path) -> dict:
    """no_sync + 2 micro-batches per step vs one batch of twice the size: the same masks (float64, no ties)."""
    runs = {}
    for mode in ("accumulate", "large_batch"):
        torch.manual_seed(0)
        ddp = DistributedDataParallel(ResidualAttentionNet().double())
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        sparsifier = synchronize(sa.RigL(0.8, update_every=2, stop=None), ddp).attach(ddp.module, optimizer)
        ddp.module.norm.eval()  # BatchNorm statistics over half batches would differ from the full batch
        for step in range(7):
            x, y = batch(1000 * rank + step, size=16, dtype=torch.float64)
            optimizer.zero_grad()
            if mode == "accumulate":
                with ddp.no_sync():
                    (F.cross_entropy(ddp(x[:8]), y[:8]) / 2).backward()
                (F.cross_entropy(ddp(x[8:]), y[8:]) / 2).backward()
            else:
                F.cross_entropy(ddp(x), y).backward()
            optimizer.step()
        verify(sparsifier)
        runs[mode] = masks_of(sparsifier)
        runs[mode + "_updates"] = sparsifier.updates
        runs[mode + "_steps"] = sparsifier.step
    differing = sum(int((runs["accumulate"][k] != runs["large_batch"][k]).sum()) for k in runs["accumulate"])
    return {
        "differing_mask_entries": differing,
        "updates": [runs["accumulate_updates"], runs["large_batch_updates"]],
        "steps": [runs["accumulate_steps"], runs["large_batch_steps"]],
    }


def scenario_resume(rank: int, world: int, out: Path, checkpoint: Path) -> dict:
    """Load a checkpoint written by another world size on every rank, then keep training."""
    ddp, optimizer = ddp_rigl(rank, seed=rank, update_every=3)
    sparsifier = ddp.module._sparsearch_sparsifier
    loaded = sa.load(ddp.module, checkpoint)
    same_as_file = all(torch.equal(sparsifier.masks[k], loaded.masks[k]) for k in loaded.masks)
    train(ddp, optimizer, range(4), rank)
    verify(sparsifier)
    save_file(masks_of(sparsifier), str(out / f"resume_masks_rank{rank}.safetensors"))
    return {"same_as_file": same_as_file, "step": sparsifier.step, "updates": sparsifier.updates}


def scenario_die(rank: int, world: int, out: Path) -> dict:
    """Rank 1 dies (or stalls, with STALL=1) after 2 steps; the others must fail with an error, not hang."""
    ddp, optimizer = ddp_rigl(rank, seed=0, update_every=2)
    train(ddp, optimizer, range(2), rank)
    if rank == 1:
        if os.environ.get("STALL") == "1":
            time.sleep(20)  # longer than the test's 8 s process-group timeout
        os._exit(3)
    started = time.monotonic()
    try:
        train(ddp, optimizer, range(2, 50), rank)
        return {"error": None}
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}", "seconds": time.monotonic() - started}


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=float(os.environ.get("DIST_TIMEOUT", "30"))))
    rank, world = dist.get_rank(), dist.get_world_size()
    if scenario == "resume":
        result = scenario_resume(rank, world, out, Path(sys.argv[3]))
    else:
        result = {"masks": scenario_masks, "accumulation": scenario_accumulation, "die": scenario_die}[scenario](
            rank, world, out
        )
    (out / f"{scenario}_rank{rank}.json").write_text(json.dumps(result))
    if scenario == "die":
        os._exit(1)  # as if the error had propagated; no teardown of a broken process group
    # every rank done with its collectives, then out without the process group's teardown: in one of five CI runs a
    # rank ended with SIGABRT and nothing on its output but a warning, most likely gloo's teardown racing its peer's
    # exit; the results are written by now, and no collective follows
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
