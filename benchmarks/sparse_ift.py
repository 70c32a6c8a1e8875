"""Sparse-IFT: at the dense model's FLOPs, is a sparse wider / parallel / factorised / doped model more accurate?

For each data set (Fashion-MNIST, MNIST-1D) and model (the study's MLP and CNN families), train the dense model
and the four Sparse-IFT families at sparsities 0.5 / 0.75 / 0.9 (k = 2, 4, 10) with RigL (the study arms
``sift-*``), all under one budget (``sparsearch.training.train``: SGD momentum 0.9, cosine learning rate,
same epochs and batches), 3 seeds. Reported: test accuracy (mean ± std), non-zero forward FLOPs per sample
relative to dense (1.00 = iso-FLOP) and training FLOPs relative to dense training (RigL's dense gradients on
update steps make it slightly more).

Sized for a shared 2-core CPU: a training subset, a few epochs, one torch thread (see --train-subset,
--epochs). Each finished run is appended to the JSON file (re-running skips finished runs), then the table is
rendered to Markdown.

    python benchmarks/sparse_ift.py --datasets fashion-mnist mnist1d --models mlp cnn --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from sparsearch.algorithms import ARMS, ArmSetting
from sparsearch.data import load_dataset
from sparsearch.models import build_model, count_flops
from sparsearch.training import TrainBudget, train

RESULTS = Path(__file__).parent / "results"
FAMILIES = ("wide", "parallel", "factorized", "doped")
SPARSITIES = (0.5, 0.75, 0.9)
WIDTHS = {"mlp": (128, 128, 128), "cnn": (8, 16, 16)}


def subset(data, n_train: int, n_test: int):
    return dataclasses.replace(
        data, x_train=data.x_train[:n_train], y_train=data.y_train[:n_train],
        x_test=data.x_test[:n_test], y_test=data.y_test[:n_test],
    )


def run(dataset: str, arch: str, family: str | None, sparsity: float | None, seed: int, data, args) -> dict:
    model = build_model(arch, data.input_shape, data.num_classes, widths=WIDTHS[arch], seed=seed)
    dense_flops = count_flops(model, data.input_shape).dense
    budget = TrainBudget(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = budget.steps_per_epoch(len(data.y_train))
    factory = None
    if family is not None:
        arm = ARMS.get(f"sift-{family}")

        def factory(total_steps: int):
            return arm(ArmSetting(sparsity=sparsity, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                                  seed=seed, distribution="erk"))

    started = time.perf_counter()
    result = train(model, data, budget, seed=seed, sparsifier_factory=factory)
    return {
        "dataset": dataset, "model": arch, "family": family or "dense", "sparsity": sparsity, "seed": seed,
        "test_accuracy": result.final_test_accuracy, "flops_nonzero": result.forward_flops.nonzero,
        "flops_dense_model": dense_flops, "weights": result.forward_flops.dense // 2,
        "train_flops": result.train_flops, "seconds": time.perf_counter() - started,
    }


def markdown(payload: dict) -> str:
    meta, rows = payload["meta"], payload["runs"]
    lines = [
        "# Sparse-IFT at the dense model's FLOPs", "",
        f"Machine: {meta['machine']}, torch {meta['torch']}, {meta['threads']} torch thread; started "
        f"{meta['date']}, load average {meta['load_average_start']} at start, {meta.get('load_average_end')} at "
        "the end (shared machine). Produced by `python benchmarks/sparse_ift.py`.", "",
        f"Budget per run: the first {meta['train_subset']} training samples, {meta['epochs']} epochs, batch "
        f"{meta['batch_size']}, SGD momentum 0.9, weight decay 1e-4, cosine learning rate from {meta['lr']}; "
        f"test accuracy on the first {meta['test_subset']} test samples. RigL updates every min(100, steps per "
        "epoch) steps until 75% of training (the `sift-*` study arms). MLP widths "
        f"{WIDTHS['mlp']}, CNN channels {WIDTHS['cnn']}. Cells: test accuracy % mean ± std over seeds; "
        "[non-zero forward FLOPs / dense model's; training FLOPs / dense training].", "",
    ]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        for arch in dict.fromkeys(r["model"] for r in rows if r["dataset"] == dataset):
            cell_rows = [r for r in rows if r["dataset"] == dataset and r["model"] == arch]
            dense = [r for r in cell_rows if r["family"] == "dense"]
            if not dense:
                continue
            dense_train = statistics.mean(r["train_flops"] for r in dense)
            dense_acc = [100 * r["test_accuracy"] for r in dense]
            dense_cell = f"{statistics.mean(dense_acc):.2f} ± {_std(dense_acc):.2f} ({len(dense)} seeds)"
            lines += [f"## {dataset}, {arch}", "", "| family | " + " | ".join(f"s = {s}" for s in SPARSITIES) + " |",
                      "|---" * (len(SPARSITIES) + 1) + "|", f"| dense | {dense_cell} |" + " |" * (len(SPARSITIES) - 1)]
            wins = []
            for family in FAMILIES:
                cells = []
                for sparsity in SPARSITIES:
                    runs = [r for r in cell_rows if r["family"] == family and r["sparsity"] == sparsity]
                    if not runs:
                        cells.append("")
                        continue
                    acc = [100 * r["test_accuracy"] for r in runs]
                    flops = statistics.mean(r["flops_nonzero"] / r["flops_dense_model"] for r in runs)
                    train_ratio = statistics.mean(r["train_flops"] for r in runs) / dense_train
                    cells.append(f"{statistics.mean(acc):.2f} ± {_std(acc):.2f} [{flops:.3f}; {train_ratio:.2f}]")
                    wins.append(statistics.mean(acc) > statistics.mean(dense_acc))
                lines.append(f"| {family} | " + " | ".join(cells) + " |")
            lines += ["", f"Sparse-IFT cells above dense: {sum(wins)} of {len(wins)}.", ""]
    return "\n".join(lines)


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["fashion-mnist", "mnist1d"])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--train-subset", type=int, default=3000)
    parser.add_argument("--test-subset", type=int, default=2000)
    parser.add_argument("--output", type=Path, default=RESULTS / "sparse_ift")
    args = parser.parse_args()
    torch.set_num_threads(1)
    json_path = args.output.with_suffix(".json")
    payload = json.loads(json_path.read_text()) if json_path.exists() else {"runs": []}
    payload["meta"] = {
        "machine": f"{platform.machine()} {platform.processor() or ''} ({os.cpu_count()} cores)".strip(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "date": payload.get("meta", {}).get("date", datetime.now(UTC).isoformat(timespec="seconds")),
        "load_average_start": payload.get("meta", {}).get("load_average_start",
                                                           [round(v, 2) for v in os.getloadavg()]),
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "train_subset": args.train_subset,
        "test_subset": args.test_subset,
    }
    done = {(r["dataset"], r["model"], r["family"], r["sparsity"], r["seed"]) for r in payload["runs"]}
    datasets = {name: subset(load_dataset(name, seed=0), args.train_subset, args.test_subset) for name in args.datasets}
    for seed in args.seeds:  # seeds outermost: an interrupted run still covers every cell
        for dataset, data in datasets.items():
            for arch in args.models:
                plan = [(None, None)] + [(f, s) for s in SPARSITIES for f in FAMILIES]
                for family, sparsity in plan:
                    if (dataset, arch, family or "dense", sparsity, seed) in done:
                        continue
                    row = run(dataset, arch, family, sparsity, seed, data, args)
                    payload["runs"].append(row)
                    print(json.dumps(row), flush=True)
                    payload["meta"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
                    args.output.parent.mkdir(parents=True, exist_ok=True)
                    json_path.write_text(json.dumps(payload, indent=1))
    args.output.with_suffix(".md").write_text(markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    main()
