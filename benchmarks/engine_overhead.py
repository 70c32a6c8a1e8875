"""Mask overhead: time per training step of a masked model vs the same dense model, on the CPU.

For an MLP (784-300-100-10, batch 100) and a small CNN (Fashion-MNIST shape, batch 64), each step being
forward + backward + optimizer step (SGD with Nesterov momentum and weight decay, and AdamW). The masked
model carries a 90%-sparse StaticRandom sparsifier (hooks mask gradients, weights and optimizer state every
step); RigL is timed too (its mask update every 100 steps included). AdamW is timed in PyTorch's default
(foreach) form and with ``fused=True``: the default form's ``torch.sqrt`` of the second moment is several times
slower on exact zeros (masked Adam state is zero by design) on some CPU builds, which the script measures too.
Dense and masked steps are timed in interleaved blocks in the same process so that background load hits both
alike. Two overheads: the median over blocks of (masked block time / dense block time) - 1, robust to load
spikes, and total masked time / total dense time - 1 over all blocks, which spreads RigL's mask updates over
the steps between them.

    python benchmarks/engine_overhead.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sparsearch.algorithms import RigL, StaticRandom

RESULTS = Path(__file__).parent / "results"


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )


OPTIMIZERS = ("sgd", "adamw", "adamw fused")


def make_optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2, fused=kind == "adamw fused")


def sqrt_microseconds(values: torch.Tensor, repeats: int = 200) -> float:
    """Median time of ``torch.sqrt(values)`` in microseconds."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        torch.sqrt(values)
        times.append(time.perf_counter() - started)
    return 1e6 * statistics.median(times)


class Trainer:
    def __init__(self, build, optimizer_kind: str, sparsifier, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        torch.manual_seed(0)
        self.model = build()
        self.optimizer = make_optimizer(optimizer_kind, self.model)
        if sparsifier is not None:
            sparsifier.attach(self.model, self.optimizer)
        self.x, self.y = batch

    def steps(self, count: int) -> float:
        started = time.perf_counter()
        for _ in range(count):
            loss = F.cross_entropy(self.model(self.x), self.y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return time.perf_counter() - started


def measure(name: str, build, batch, optimizer_kind: str, blocks: int, block_steps: int) -> list[dict]:
    trainers = {
        "dense": Trainer(build, optimizer_kind, None, batch),
        "static 90%": Trainer(build, optimizer_kind, StaticRandom(0.9), batch),
        "rigl 90%": Trainer(build, optimizer_kind, RigL(0.9, total_steps=10**9, update_every=100), batch),
    }
    for trainer in trainers.values():
        trainer.steps(5)  # warm-up: allocator, optimizer state
    times: dict[str, list[float]] = {key: [] for key in trainers}
    for _ in range(blocks):
        for key, trainer in trainers.items():
            times[key].append(trainer.steps(block_steps) / block_steps)
    rows = []
    for key in ("static 90%", "rigl 90%"):
        ratios = [masked / dense for masked, dense in zip(times[key], times["dense"], strict=True)]
        rows.append(
            {
                "model": name,
                "optimizer": optimizer_kind,
                "sparsifier": key,
                "dense_ms": 1e3 * statistics.median(times["dense"]),
                "masked_ms": 1e3 * statistics.median(times[key]),
                "overhead_pct": 100 * (statistics.median(ratios) - 1),
                "overhead_total_pct": 100 * (sum(times[key]) / sum(times["dense"]) - 1),
                "blocks": blocks,
                "block_steps": block_steps,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=31)
    parser.add_argument("--block-steps", type=int, default=20)
    parser.add_argument("--output", type=Path, default=RESULTS / "engine_overhead")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    generator = torch.Generator().manual_seed(0)
    mlp_batch = (torch.randn(100, 1, 28, 28, generator=generator), torch.randint(0, 10, (100,), generator=generator))
    cnn_batch = (torch.randn(64, 1, 28, 28, generator=generator), torch.randint(0, 10, (64,), generator=generator))
    rows = []
    for optimizer_kind in OPTIMIZERS:
        rows += measure("MLP 784-300-100-10, batch 100", mlp, mlp_batch, optimizer_kind, args.blocks, args.block_steps)
        rows += measure(
            "CNN conv16-conv32-linear, batch 64", cnn, cnn_batch, optimizer_kind, args.blocks, args.block_steps
        )
    numel = 784 * 300  # the MLP's first weight
    sqrt_us = {
        "random": sqrt_microseconds(torch.rand(numel, generator=generator)),
        "zeros": sqrt_microseconds(torch.zeros(numel)),
    }
    meta = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads, load average before the run {load_before:.2f}",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "rows": rows, "sqrt_us_784x300": sqrt_us}, indent=1)
    )
    lines = [
        "# Mask overhead per training step (CPU)",
        "",
        f"Machine: {meta['machine']}; date: {meta['date']}; torch {meta['torch']}.",
        f"Over {args.blocks} interleaved blocks of {args.block_steps} steps; target: at most 15% overhead.",
        "",
        "| model | optimizer | sparsifier | dense ms/step | masked ms/step | overhead (median block) "
        "| overhead (all steps) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['optimizer']} | {r['sparsifier']} | {r['dense_ms']:.2f} | {r['masked_ms']:.2f} "
        f"| {r['overhead_pct']:+.1f}% | {r['overhead_total_pct']:+.1f}% |"
        for r in rows
    ]
    lines += [
        "",
        f"`torch.sqrt` over {numel} float32 values: {sqrt_us['random']:.0f} us random, {sqrt_us['zeros']:.0f} us "
        "all zeros (the unfused AdamW step takes the square root of the second moment, zero where masked).",
    ]
    args.output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
