"""Small layers at 90% sparsity (MiniLM's 384x384, 384x1536, 1536x384; GPT-2's 768x768) at the batch sizes of
sentence inputs (8 to 128 tokens: one or more vectors of 8 or 16 per batch tile): sparse_linear against dense
F.linear, on 1 and 2 threads.

With --baseline REF the sparse kernels of git revision REF (its kernels module and C source, loaded next to
this checkout's under another module name, so both run in the same process, interleaved) are timed as well:
before/after from one run. Writes benchmarks/results/runtime_small_layers.md/.json.

Usage (a timing benchmark: run it under /work/bin/quiet; about a minute, two with --busy):
  python benchmarks/runtime_small_layers.py --baseline bb2d7c6
  python benchmarks/runtime_small_layers.py --baseline bb2d7c6 --busy
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from runtime_common import interleaved_times, machine, write_results
from runtime_contention import BusyProcess

from sparsearch.kernels import cpu as kernels
from sparsearch.kernels.format import PanelCSRMatrix

SHAPES = ((384, 384), (1536, 384), (384, 1536), (768, 768))  # (out_features, in_features)
TOKENS = (8, 11, 16, 20, 24, 32, 33, 128)
THREADS = (1, 2)
SPARSITY = 0.9
REPO = Path(__file__).resolve().parent.parent


def load_baseline(ref: str, workdir: Path) -> ModuleType:
    """The kernels module of git revision `ref` (kernels/cpu.py, or runtime/kernels.py before the kernels moved
    below the training layer) as module `baseline_kernels`, with its own C source."""
    package = workdir / "kernels"
    (package / "csrc").mkdir(parents=True)
    layouts = (("kernels", "cpu.py"), ("runtime", "kernels.py"))
    for directory, module_file in layouts:
        shown = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:src/sparsearch/{directory}/{module_file}"],
                               capture_output=True, text=True, check=False)
        if shown.returncode == 0:
            break
    else:
        raise SystemExit(f"revision {ref} has no kernels module (kernels/cpu.py or runtime/kernels.py)")
    (package / "cpu.py").write_text(shown.stdout)
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:src/sparsearch/{directory}/csrc/sparse_kernels.c"],
                            capture_output=True, text=True, check=True).stdout
    (package / "csrc" / "sparse_kernels.c").write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_kernels", package / "cpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_kernels"] = module
    spec.loader.exec_module(module)
    return module


def pruned_weight(out_features: int, in_features: int) -> torch.Tensor:
    weight = torch.randn(out_features, in_features)
    weight[torch.rand_like(weight) < SPARSITY] = 0
    return weight


def measure(baseline: ModuleType | None, budget: float) -> list[dict]:
    rows = []
    for out_features, in_features in SHAPES:
        weight, bias = pruned_weight(out_features, in_features), torch.randn(out_features)
        matrix = PanelCSRMatrix.from_dense(weight)
        for tokens in TOKENS:
            x = torch.randn(tokens, in_features)
            for threads in THREADS:
                torch.set_num_threads(threads)
                fns = {"dense": lambda x=x, w=weight, b=bias: F.linear(x, w, b),
                       "sparse": lambda x=x, m=matrix, b=bias: kernels.sparse_linear(x, m, b)}
                if baseline is not None:
                    fns["baseline"] = lambda x=x, m=matrix, b=bias: baseline.sparse_linear(x, m, b)
                    torch.testing.assert_close(fns["baseline"](), fns["dense"](), rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(fns["sparse"](), fns["dense"](), rtol=1e-4, atol=1e-4)
                median, best = interleaved_times(fns, budget_s=budget)
                row = {"shape": f"{out_features}x{in_features}", "tokens": tokens, "threads": threads,
                       **{f"{name}_median_us": round(t * 1e6, 1) for name, t in median.items()},
                       **{f"{name}_best_us": round(t * 1e6, 1) for name, t in best.items()}}
                rows.append(row)
                print(row, flush=True)
    torch.set_num_threads(max(THREADS))
    return rows


def table(rows: list[dict], has_baseline: bool) -> str:
    lines = ["| layer (out x in) | tokens | threads | dense us (median) | sparse us | speed-up (median, best)"
             + (" | before: sparse us | before: speed-up (median, best)" if has_baseline else "") + " |",
             "|---|---|---|---|---|---" + ("|---|---" if has_baseline else "") + "|"]
    for r in rows:
        line = (f"| {r['shape']} | {r['tokens']} | {r['threads']} | {r['dense_median_us']} | {r['sparse_median_us']} "
                f"| {r['dense_median_us'] / r['sparse_median_us']:.2f}x, "
                f"{r['dense_best_us'] / r['sparse_best_us']:.2f}x")
        if has_baseline:
            line += (f" | {r['baseline_median_us']} | {r['dense_median_us'] / r['baseline_median_us']:.2f}x, "
                     f"{r['dense_best_us'] / r['baseline_best_us']:.2f}x")
        lines.append(line + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", help="git revision whose sparse kernels to time as 'before'")
    parser.add_argument("--busy", action="store_true", help="also measure next to one competing busy process")
    parser.add_argument("--budget", type=float, default=0.6, help="seconds of timing per point")
    args = parser.parse_args()
    info = machine()
    info["torch_threads"] = "1 and 2 (per row)"
    info["kernel_backend"] = kernels.get_backend().name
    with tempfile.TemporaryDirectory() as workdir:
        baseline = load_baseline(args.baseline, Path(workdir)) if args.baseline else None
        results = {"quiet": measure(baseline, args.budget)}
        if args.busy:
            with BusyProcess():
                results["busy"] = measure(baseline, args.budget)
    markdown = (f"Per-layer speed-up of `sparse_linear` over dense `F.linear` at {SPARSITY:.0%} sparsity (random "
                "mask), x of shape [tokens, in]; " + (f"'before' = the kernels of git revision {args.baseline}, "
                "timed in the same run, interleaved. " if baseline else "")
                + "Produced by benchmarks/runtime_small_layers.py.\n\n")
    for condition, rows in results.items():
        markdown += f"## {condition}\n\n" + table(rows, baseline is not None) + "\n"
    write_results("runtime_small_layers", {"machine": info, "baseline": args.baseline, "sparsity": SPARSITY,
                                           "results": results}, markdown)


if __name__ == "__main__":
    main()
