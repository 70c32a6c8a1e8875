"""Fashion-MNIST: sparse-training algorithms vs dense at several sparsities, MLP and small CNN, several seeds.

Methods: dense, static random (uniform and ERK), SNIP (global), GMP (uniform, cubic 0 -> s over the first
75% of training, every 100 steps), SET (ERK, zeta 0.3, once per epoch), RigL (ERK, every 100 steps until 75%,
drop 0.3 cosine-decayed). Every run: the same optimizer (SGD, Nesterov momentum 0.9, weight decay 1e-4,
batch 100, cosine learning rate from --lr), the same epochs; test accuracy after the last epoch.
Training FLOPs per run are counted from the masks at every step (forward, input-gradient and
weight-gradient products of Linear/Conv layers; the weight gradient is dense on RigL's update steps) and
reported relative to dense training.

Results are appended to benchmarks/results/algorithms_fashion.json as each run finishes (re-running skips
finished runs), then rendered to benchmarks/results/algorithms_fashion.md.

    python benchmarks/algorithms_fashion.py --models mlp cnn --seeds 0 1 2
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

from sparsearch.algorithms import GMP, SET, SNIP, RigL, StaticRandom
from sparsearch.data import load_dataset
from sparsearch.engine import Sparsifier
from sparsearch.models import build_model
from sparsearch.models.flops import weight_positions

RESULTS = Path(__file__).parent / "results"
METHODS = ("dense", "static-uniform", "static-erk", "snip", "gmp", "set", "rigl")
SPARSITIES = (0.8, 0.9, 0.95, 0.98)
WIDTHS = {"mlp": (300, 100), "cnn": (16, 32)}


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


@torch.no_grad()
def accuracy(model, x, y, batch=1000) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(y), batch))
    model.train()
    return correct / len(y)


def run(arch, method, sparsity, seed, data, args) -> dict:
    torch.manual_seed(seed)
    model = build_model(arch, data.input_shape, data.num_classes, widths=WIDTHS[arch], seed=seed)
    n_train = args.train_subset or len(data.y_train)
    x_train, y_train = data.x_train[:n_train], data.y_train[:n_train]
    steps_per_epoch = n_train // args.batch_size
    total_steps = steps_per_epoch * args.epochs
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps)
    generator = torch.Generator().manual_seed(seed)
    batch_rows = torch.randperm(n_train, generator=generator)[: args.batch_size]
    sparsifier: Sparsifier | None = None
    if method != "dense":
        sparsifier = make_sparsifier(
            method,
            sparsity,
            total_steps,
            steps_per_epoch,
            seed,
            (x_train[batch_rows], y_train[batch_rows]),
            args.update_every,
        )
        sparsifier.attach(model, optimizer)
    params = dict(model.named_parameters())
    uses = {name: count for name, count in weight_positions(model, data.input_shape).items()}
    flops_dense_step = sum(2 * uses[n] * 3 * params[n].numel() for n in uses)
    train_flops = 0.0
    started = time.perf_counter()
    for _ in range(args.epochs):
        order = torch.randperm(n_train, generator=generator)
        for step in range(steps_per_epoch):
            rows = order[step * args.batch_size : (step + 1) * args.batch_size]
            if sparsifier is None:
                train_flops += flops_dense_step
            else:
                dense_before = sparsifier.dense_gradient_steps
                kept = {n: int(m.count_nonzero()) for n, m in sparsifier.masks.items()}
            loss = F.cross_entropy(model(x_train[rows]), y_train[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if sparsifier is not None:
                dense_grad = sparsifier.dense_gradient_steps > dense_before
                for name, count in uses.items():
                    nnz = kept.get(name, params[name].numel())
                    train_flops += 2 * count * (2 * nnz + (params[name].numel() if dense_grad else nnz))
    seconds = time.perf_counter() - started
    return {
        "model": arch,
        "method": method,
        "sparsity": sparsity,
        "seed": seed,
        "test_accuracy": accuracy(model, data.x_test, data.y_test),
        "actual_sparsity": sparsifier.overall_sparsity() if sparsifier is not None else 0.0,
        "train_flops_vs_dense": train_flops / (flops_dense_step * total_steps),
        "dense_gradient_steps": sparsifier.dense_gradient_steps if sparsifier is not None else 0,
        "seconds": seconds,
        "epochs": args.epochs,
        "train_samples": n_train,
        "update_every": args.update_every,
        "lr": args.lr,
        "batch_size": args.batch_size,
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
    for record in state["records"]:
        # a resumed file must hold runs of this budget only, or its tables would mix budgets
        stored = {key: record.get(key, value) for key, value in budget.items()}
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
