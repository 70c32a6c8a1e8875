"""Batch 1 (one row per call) in float32: the column-bitmap kernel against the index loop and dense F.linear.

From cpu.FLOAT_BITMAP_MIN_DENSITY (0.18) on, a float32 matrix's batch-1 product reads column bitmaps (one masked
expand and FMA per 16 columns) instead of one index per non-zero. Here the same weights are timed three ways in one
process, interleaved: dense `F.linear`, sparse as `sparse_linear` runs it (the bitmap kernel at these densities,
the index loop at 90%), and sparse with the index loop always (the kernel before); quiet and next to one competing
busy process (runtime_contention.BusyProcess). Shapes: 4096x4096 and the GPT-2 layers (768 wide, MLP 3072).
Run: python benchmarks/runtime_batch1_bitmap.py [--budget 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from runtime_common import interleaved_times, machine, write_results
from runtime_contention import BusyProcess

from sparsearch.kernels import cpu
from sparsearch.runtime import PanelCSRMatrix, sparse_linear

SHAPES = [(4096, 4096), (3072, 768), (768, 3072), (2304, 768)]
SPARSITIES = [0.5, 0.7, 0.8, 0.9]


def weights(shape: tuple[int, int], sparsity: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(*shape, generator=generator)
    return weight * (torch.rand(*shape, generator=generator) >= sparsity)


@torch.no_grad()
def point(shape: tuple[int, int], sparsity: float, condition: str, budget: float) -> dict:
    weight, bias = weights(shape, sparsity), torch.randn(shape[0])
    default, loop = PanelCSRMatrix.from_dense(weight), PanelCSRMatrix.from_dense(weight)
    x = torch.randn(1, shape[1])
    threshold = cpu.FLOAT_BITMAP_MIN_DENSITY
    try:  # a matrix's kernel is fixed when its first call builds its descriptor: the loop one is built without
        cpu.FLOAT_BITMAP_MIN_DENSITY = 2.0
        sparse_linear(x, loop, bias)
    finally:
        cpu.FLOAT_BITMAP_MIN_DENSITY = threshold
    sparse_linear(x, default, bias)
    calls = {"dense": lambda: F.linear(x, weight, bias), "sparse": lambda: sparse_linear(x, default, bias),
             "index_loop": lambda: sparse_linear(x, loop, bias)}
    load = [round(v, 2) for v in os.getloadavg()]
    with BusyProcess() if condition == "busy" else nullcontext():
        medians, _ = interleaved_times(calls, min_rounds=20, max_rounds=2000, budget_s=budget)
    difference = float((sparse_linear(x, default, bias) - F.linear(x, weight, bias)).abs().max())
    return {"shape": list(shape), "sparsity": sparsity, "condition": condition, "load_average": load,
            "bitmap": cpu.uses_bitmap(default) and cpu.get_backend().float_bitmap, "threshold": threshold,
            "ms": {k: v * 1e3 for k, v in medians.items()}, "max_abs_difference": difference}


def to_markdown(payload: dict) -> str:
    lines = ["Batch 1, float32, median ms of interleaved calls; speed-up over dense `F.linear` in brackets. 'sparse': "
             "as `sparse_linear` runs it (bitmap kernel where marked), 'index loop': the kernel before, on the same "
             "matrix. 'busy': one competing process multiplying 512x512 matrices. Produced by "
             "benchmarks/runtime_batch1_bitmap.py.", "",
             "| layer | sparsity | condition | dense | sparse | index loop | bitmap over index loop | kernel | load |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        ms = r["ms"]
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['sparsity']:.0%} | {r['condition']} | "
                     f"{ms['dense']:.3f} | {ms['sparse']:.3f} ({ms['dense'] / ms['sparse']:.2f}x) | "
                     f"{ms['index_loop']:.3f} ({ms['dense'] / ms['index_loop']:.2f}x) | "
                     f"{ms['index_loop'] / ms['sparse']:.2f}x | {'bitmap' if r['bitmap'] else 'index loop'} | "
                     f"{r['load_average'][0]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of interleaved timing per point")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.budget <= 0 or args.threads < 1:
        parser.error(f"--budget must be > 0 and --threads >= 1, got {args.budget} and {args.threads}")
    torch.set_num_threads(args.threads)
    info = machine()
    info["torch_threads"] = args.threads
    rows = []
    for shape in SHAPES:
        for sparsity in SPARSITIES:
            for condition in ("quiet", "busy"):
                rows.append(point(shape, sparsity, condition, args.budget))
                r = rows[-1]
                print(f"{shape} {sparsity} {condition}: dense/sparse {r['ms']['dense'] / r['ms']['sparse']:.2f}x, "
                      f"loop/sparse {r['ms']['index_loop'] / r['ms']['sparse']:.2f}x", flush=True)
    payload = {"machine": info, "rows": rows}
    write_results("runtime_batch1_bitmap", payload, to_markdown(payload))
    print(to_markdown(payload))


if __name__ == "__main__":
    main()
