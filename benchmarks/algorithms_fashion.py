"""Fashion-MNIST: sparse-training algorithms vs dense at several sparsities, MLP and small CNN, several seeds.

Methods: dense, static random (uniform and ERK), SNIP (global), GMP (uniform, cubic 0 -> s over the first
75% of training, every 100 steps), SET (ERK, zeta 0.3, once per epoch), RigL (ERK, every 100 steps until 75%,
drop 0.3 cosine-decayed). Every run goes through the study's training loop (``sparsearch.training.train``):
the same optimizer (SGD, momentum 0.9, weight decay 1e-4, batch 100, per-step cosine learning rate from --lr),
the same epochs; test accuracy after the last epoch. Training FLOPs per run come from the loop's FlopMeter
(forward, input-gradient and weight-gradient products of Linear/Conv layers at every step; the weight gradient
is dense on RigL's update steps), reported relative to dense training.

Result files written before the benchmark used the shared loop (``training_loop`` missing in a record) came from
its own loop (Nesterov momentum, last partial batch dropped); a resumed file must not mix the two.

Results are appended to benchmarks/results/algorithms_fashion.json as each run finishes (re-running skips
finished runs), then rendered to benchmarks/results/algorithms_fashion.md.

    python benchmarks/algorithms_fashion.py --models mlp cnn --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
from datetime import UTC, datetime
from pathlib import Path

import torch

from sparsearch.algorithms import GMP, SET, SNIP, RigL, StaticRandom
from sparsearch.data import load_dataset
from sparsearch.engine import Sparsifier
from sparsearch.models import build_model
from sparsearch.training import TrainBudget, train

RESULTS = Path(__file__).parent / "results"
METHODS = ("dense", "static-uniform", "static-erk", "snip", "gmp", "set", "rigl")
SPARSITIES = (0.8, 0.9, 0.95, 0.98)
WIDTHS = {"mlp": (300, 100), "cnn": (16, 32)}
TRAINING_LOOP = "sparsearch.training"


def make_sparsifier(method, sparsity, total_steps, steps_per_epoch, seed, batch, update_every):
    if method == "static-uniform":
        return StaticRandom(sparsity, distribution="uniform", seed=seed)
    if method == "static-erk":
        return StaticRandom(sparsity, distribution="erk", seed=seed)
    if method == "snip":
        return SNIP(sparsity, batch=batch, seed=seed)
    if method == "gmp":
        return GMP(sparsity, total_steps=total_steps, update_every=update_every, seed=seed)
    if method == "set":
        return SET(sparsity, update_every=steps_per_epoch, distribution="erk", seed=seed)
    if method == "rigl":
        return RigL(sparsity, total_steps=total_steps, update_every=update_every, distribution="erk", seed=seed)
    raise ValueError(method)


def run(arch, method, sparsity, seed, data, args) -> dict:
    model = build_model(arch, data.input_shape, data.num_classes, widths=WIDTHS[arch], seed=seed)
    n_train = args.train_subset or len(data.y_train)
    subset = dataclasses.replace(data, x_train=data.x_train[:n_train], y_train=data.y_train[:n_train])
    budget = TrainBudget(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=0.9,
        weight_decay=1e-4,
        lr_schedule="cosine",
    )
    steps_per_epoch = budget.steps_per_epoch(n_train)
    batch_rows = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))[: args.batch_size]
    sparsifiers: list[Sparsifier] = []

    def build_sparsifier(total_steps: int) -> Sparsifier:
        batch = (subset.x_train[batch_rows], subset.y_train[batch_rows])
        sparsifiers.append(
            make_sparsifier(method, sparsity, total_steps, steps_per_epoch, seed, batch, args.update_every)
        )
        return sparsifiers[-1]

    result = train(
        model,
        subset,
        budget,
        seed=seed,
        sparsifier_factory=None if method == "dense" else build_sparsifier,
        evaluate_after="end",
    )
    dense_training_flops = 3 * result.forward_flops.dense * n_train * args.epochs
    sparsifier = sparsifiers[0] if sparsifiers else None
    return {
        "model": arch,
        "method": method,
        "sparsity": sparsity,
        "seed": seed,
        "test_accuracy": result.final_test_accuracy,
        "actual_sparsity": sparsifier.overall_sparsity() if sparsifier is not None else 0.0,
        "train_flops_vs_dense": result.train_flops / dense_training_flops,
        "dense_gradient_steps": sparsifier.dense_gradient_steps if sparsifier is not None else 0,
        "seconds": result.seconds,
        "epochs": args.epochs,
        "train_samples": n_train,
        "update_every": args.update_every,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "training_loop": TRAINING_LOOP,
    }


def render(records: list[dict], meta: dict) -> str:
    lines = [
        "# Fashion-MNIST: sparse training algorithms",
        "",
        f"Machine: {meta['machine']}; date: {meta['date']}; torch {meta['torch']}.",
        "",
        "Test accuracy (%) after training, mean ± std over seeds (n = seeds); training FLOPs relative to dense "
        "training in brackets. Sparsity = fraction of zero weights over all Linear/Conv weights.",
        "",
    ]
    for arch in ("mlp", "cnn"):
        rows = [r for r in records if r["model"] == arch]
        if not rows:
            continue
        first = rows[0]
        lines += [
            f"## {arch.upper()} ({'784-300-100-10' if arch == 'mlp' else 'conv 16-32 + linear'}), "
            f"{first['epochs']} epochs on {first['train_samples']} training images, GMP/RigL update every "
            f"{first['update_every']} steps",
            "",
        ]
        header = "| method | " + " | ".join(f"{s:.0%}" for s in SPARSITIES) + " |"
        lines += [header, "|---" * (len(SPARSITIES) + 1) + "|"]
        for method in METHODS:
            cells = []
            for sparsity in SPARSITIES:
                hits = [
                    r for r in rows if r["method"] == method and (method == "dense" or r["sparsity"] == sparsity)
                ]
                if not hits:
                    cells.append("")
                    continue
                acc = [100 * r["test_accuracy"] for r in hits]
                std = statistics.stdev(acc) if len(acc) > 1 else 0.0
                flops = statistics.mean(r["train_flops_vs_dense"] for r in hits)
                cells.append(f"{statistics.mean(acc):.2f} ± {std:.2f} (n={len(acc)}) [{flops:.3f}]")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-subset", type=int, default=None, help="first N training images (default: all)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--update-every", type=int, default=100, help="GMP and RigL update interval (steps)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--output", type=Path, default=RESULTS / "algorithms_fashion")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    json_path = args.output.with_suffix(".json")
    state = json.loads(json_path.read_text()) if json_path.exists() else {"records": []}
    budget = {"epochs": args.epochs, "update_every": args.update_every, "lr": args.lr, "batch_size": args.batch_size}
    budget["training_loop"] = TRAINING_LOOP
    for record in state["records"]:
        # a resumed file must hold runs of this budget and loop only, or its tables would mix them
        stored = {key: record.get(key, value) for key, value in budget.items()}
        stored["training_loop"] = record.get("training_loop")
        subset_differs = args.train_subset is not None and record["train_samples"] != args.train_subset
        if stored != budget or subset_differs:
            raise SystemExit(
                f"{json_path} holds runs with another budget ({stored}, {record['train_samples']} training images); "
                "pass --output for a new file or delete it"
            )
    meta = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.2f} at the start",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
    }
    done = {(r["model"], r["method"], r["sparsity"], r["seed"]) for r in state["records"]}
    for arch in args.models:
        for seed in args.seeds:
            data = load_dataset("fashion-mnist", seed=seed)
            for method in METHODS:
                for sparsity in (0.0,) if method == "dense" else SPARSITIES:
                    if (arch, method, sparsity, seed) in done:
                        continue
                    record = run(arch, method, sparsity, seed, data, args)
                    state["records"].append(record)
                    state["meta"] = meta
                    json_path.parent.mkdir(parents=True, exist_ok=True)
                    json_path.write_text(json.dumps(state, indent=1))
                    args.output.with_suffix(".md").write_text(render(state["records"], meta))
                    print(
                        f"{arch} {method:15s} s={sparsity:.2f} seed={seed} acc={record['test_accuracy']:.4f} "
                        f"flops={record['train_flops_vs_dense']:.3f} {record['seconds']:.1f}s",
                        flush=True,
                    )
    args.output.with_suffix(".md").write_text(render(state["records"], meta))


if __name__ == "__main__":
    main()
