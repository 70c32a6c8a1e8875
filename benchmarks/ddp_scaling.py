"""Data-parallel training speed: DDP steps/s and samples/s with 1 and 2 processes (gloo, CPU), dense and RigL.

For an MLP (784-300-100-10, batch 100 per process) and a small CNN (conv16-conv32-linear on 28x28, batch 64 per
process), each step being forward + backward (DDP all-reduces the gradients) + SGD step. Three set-ups per model,
timed in interleaved blocks of steps in the same processes so that background load hits all alike:

- ``dense``: DDP alone;
- ``rigl 90%``: RigL (update every 100 steps) attached without ``synchronize`` (masks agree here only because
  nothing diverges; no check);
- ``rigl 90% + sync``: ``synchronize(RigL(...), ddp)``: rank 0's initial masks, and a mask checksum all-gathered
  after every step.

Each process uses 1 torch thread, so that 2 processes fill the 2 cores; samples/s = processes x batch x steps/s
(weak scaling: the batch per process is fixed). Inputs are random tensors of Fashion-MNIST's shape: speed does not
depend on the values. The machine is shared: the result file records the load average, and the ratios come from
one run.

    python benchmarks/ddp_scaling.py
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from engine_overhead import cnn, mlp
from runtime_common import RESULTS, machine, write_results
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sparsearch.algorithms import RigL
from sparsearch.engine.distributed import synchronize

MODELS = {
    "MLP 784-300-100-10": 100,
    "CNN conv16-conv32-linear": 64,
}
SETUPS = ("dense", "rigl 90%", "rigl 90% + sync")


def build(model: str) -> nn.Module:
    return mlp() if model.startswith("MLP") else cnn()  # the engine-overhead benchmark's models


class Trainer:
    def __init__(self, model: str, setup: str, rank: int) -> None:
        torch.manual_seed(0)
        self.ddp = DistributedDataParallel(build(model))
        self.optimizer = torch.optim.SGD(self.ddp.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        if setup != "dense":
            rigl = RigL(0.9, update_every=100, stop=None)
            if setup.endswith("sync"):
                synchronize(rigl, self.ddp)
            rigl.attach(self.ddp.module, self.optimizer)
        generator = torch.Generator().manual_seed(rank)
        batch = MODELS[model]
        self.x = torch.randn(batch, 1, 28, 28, generator=generator)
        self.y = torch.randint(0, 10, (batch,), generator=generator)

    def steps(self, count: int) -> float:
        dist.barrier()  # every process starts the block together
        started = time.perf_counter()
        for _ in range(count):
            loss = F.cross_entropy(self.ddp(self.x), self.y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return time.perf_counter() - started


def worker(blocks: int, block_steps: dict[str, int], out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []
    for model in MODELS:
        trainers = {setup: Trainer(model, setup, rank) for setup in SETUPS}
        for trainer in trainers.values():
            trainer.steps(10)  # warm-up
        times: dict[str, list[float]] = {setup: [] for setup in SETUPS}
        for _ in range(blocks):
            for setup, trainer in trainers.items():
                times[setup].append(trainer.steps(block_steps[model]) / block_steps[model])
        for setup in SETUPS:
            step_s, best_s = statistics.median(times[setup]), min(times[setup])
            rows.append(
                {
                    "model": model,
                    "setup": setup,
                    "processes": world,
                    "batch_per_process": MODELS[model],
                    "ms_per_step": 1e3 * step_s,
                    "steps_per_s": 1 / step_s,
                    "samples_per_s": world * MODELS[model] / step_s,
                    "best_ms_per_step": 1e3 * best_s,
                    "best_samples_per_s": world * MODELS[model] / best_s,
                    "blocks": blocks,
                    "block_steps": block_steps[model],
                }
            )
    if rank == 0:
        out.write_text(json.dumps(rows))
    dist.destroy_process_group()


def launch(world: int, blocks: int, block_steps: dict[str, int], out: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    command = [sys.executable, __file__, "--worker", str(out), "--blocks", str(blocks),
               "--mlp-steps", str(block_steps["MLP 784-300-100-10"]),
               "--cnn-steps", str(block_steps["CNN conv16-conv32-linear"])]  # fmt: skip
    processes = [subprocess.Popen(command, env={**env, "RANK": str(rank)}) for rank in range(world)]
    codes = [process.wait() for process in processes]
    if any(codes):
        raise SystemExit(f"a worker of the {world}-process run failed: exit codes {codes}")


def render(rows: list[dict]) -> str:
    lines = [
        "# DDP scaling on the CPU (gloo, 1 torch thread per process)",
        "",
        "Shared machine: other engineers' jobs ran at the same time (load averages above); 1 torch thread per "
        "process, so 2 processes need both cores to themselves to scale. Median block (what a user saw) and best "
        "block (the least disturbed by other jobs).",
        "",
        "| model (batch per process) | set-up | processes | ms/step median (best) | steps/s median "
        "| samples/s median (best) | samples/s vs 1 process, median (best) |",
        "|---|---|---|---|---|---|---|",
    ]
    single = {(r["model"], r["setup"]): r for r in rows if r["processes"] == 1}
    for r in rows:
        one = single[(r["model"], r["setup"])]
        speedup = r["samples_per_s"] / one["samples_per_s"]
        best_speedup = r["best_samples_per_s"] / one["best_samples_per_s"]
        lines.append(
            f"| {r['model']} ({r['batch_per_process']}) | {r['setup']} | {r['processes']} "
            f"| {r['ms_per_step']:.2f} ({r['best_ms_per_step']:.2f}) | {r['steps_per_s']:.1f} "
            f"| {r['samples_per_s']:.0f} ({r['best_samples_per_s']:.0f}) | {speedup:.2f}x ({best_speedup:.2f}x) |"
        )
    checks = {}
    for r in rows:
        if r["setup"] == "rigl 90% + sync" and r["processes"] == 2:
            unchecked = next(
                o for o in rows if o["model"] == r["model"] and o["setup"] == "rigl 90%" and o["processes"] == 2
            )
            checks[r["model"]] = (
                100 * (r["ms_per_step"] / unchecked["ms_per_step"] - 1),
                100 * (r["best_ms_per_step"] / unchecked["best_ms_per_step"] - 1),
            )
    lines += [
        "",
        "Cost of the per-step mask check with 2 processes (rigl 90% + sync vs rigl 90%), median (best): "
        + ", ".join(f"{model} {median:+.1f}% ({best:+.1f}%)" for model, (median, best) in checks.items())
        + ".",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=15)
    parser.add_argument("--mlp-steps", type=int, default=30, help="steps per timed block for the MLP")
    parser.add_argument("--cnn-steps", type=int, default=8, help="steps per timed block for the CNN")
    parser.add_argument("--output", type=Path, default=RESULTS / "ddp_scaling")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--render-only", action="store_true", help="rewrite the markdown from the JSON result")
    args = parser.parse_args()
    if args.render_only:
        payload = json.loads(args.output.with_suffix(".json").read_text())
        write_results(args.output.name, payload, render(payload["rows"]))
        return
    block_steps = {"MLP 784-300-100-10": args.mlp_steps, "CNN conv16-conv32-linear": args.cnn_steps}
    if args.worker is not None:
        worker(args.blocks, block_steps, args.worker)
        return
    info = machine()
    info["torch_threads"] = 1
    info["note"] = "shared machine: other engineers' jobs ran at the same time; see the load averages"
    rows = []
    for world in (1, 2):
        out = args.output.with_name(f"{args.output.name}.world{world}.tmp.json")
        started = time.perf_counter()
        launch(world, args.blocks, block_steps, out)
        print(f"{world} process(es): {time.perf_counter() - started:.0f} s", flush=True)
        rows += json.loads(out.read_text())
        out.unlink()
    write_results(args.output.name, {"machine": info, "rows": rows}, render(rows))
    print(render(rows))


if __name__ == "__main__":
    main()
