"""What one study trial costs on one CPU thread: data, epoch time, full-training accuracy, search scoring.

Runs the library pieces the study uses (``sparsearch.data``, ``sparsearch.models``, ``sparsearch.search``,
``sparsearch.training``) on MNIST-1D (10,000 generated sequences: 7,200 train / 800 val / 2,000 test)
with ``torch.set_num_threads(1)``, as one study worker does. Writes benchmarks/results/training_speed.md and
.json. Other processes may share the machine: the load average is recorded; per-epoch times are medians.

    python benchmarks/training_speed.py [--epochs 15]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sparsearch.data import load_dataset
from sparsearch.engine import StaticMaskSparsifier
from sparsearch.models import build_model, count_flops
from sparsearch.search import make_space, random_search, rescale_to_fan_in, weight_sparsity
from sparsearch.training import TrainBudget, train

RESULTS = Path(__file__).parent / "results"
PARENTS = [("mlp", (512, 512, 256)), ("mlp", (256, 256)), ("cnn", (32, 64, 64)), ("cnn", (16, 32, 32))]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _train_row(data, arch, widths, budget, masks_from=None, rescale=False):
    model = build_model(arch, data.input_shape, data.num_classes, widths=widths, seed=0)
    factory = None
    sparsity = 0.0
    if masks_from is not None:
        masks = make_space(masks_from[0], model, masks_from[1]).sample(torch.Generator().manual_seed(0))
        sparsity = weight_sparsity(masks)
        if rescale:
            rescale_to_fan_in(model, masks)

        def factory(steps):
            return StaticMaskSparsifier(masks)

    result = train(model, data, budget, seed=0, sparsifier_factory=factory)
    epoch_seconds = [e.seconds for e in result.epochs]
    flops = count_flops(model, data.input_shape)
    return {
        "arch": arch,
        "widths": list(widths),
        "mask": "dense" if masks_from is None else f"{masks_from[0]} space" + (", rescaled init" if rescale else ""),
        "weight_sparsity": round(sparsity, 4),
        "epochs": budget.epochs,
        "median_epoch_s": round(statistics.median(epoch_seconds), 3),
        "train_s": round(result.seconds, 2),
        "final_test_accuracy": round(result.final_test_accuracy, 4),
        "best_val_epoch_test_accuracy": round(max(result.epochs, key=lambda e: e.val_accuracy).test_accuracy, 4),
        "forward_flops_dense": flops.dense,
        "forward_flops_nonzero": flops.nonzero,
    }


def _search_row(data, arch, widths, space, scorer, n_candidates, steps):
    def parent():
        return build_model(arch, data.input_shape, data.num_classes, widths=widths, seed=0)

    result = random_search(
        make_space(space, parent(), 0.9),
        parent,
        data,
        scorer=scorer,
        n_candidates=n_candidates,
        seed=0,
        short_train_steps=steps,
    )
    return {
        "arch": arch,
        "widths": list(widths),
        "space": space,
        "scorer": scorer,
        "short_train_steps": steps if scorer == "short-train" else None,
        "n_candidates": n_candidates,
        "search_s": round(result.seconds, 2),
        "per_candidate_s": round(result.seconds / n_candidates, 3),
        "score_spread": round((max(result.scores) - min(result.scores)) / max(abs(max(result.scores)), 1e-12), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        load_dataset("mnist1d", cache_dir=cache)
        generate_s = time.perf_counter() - started
        started = time.perf_counter()
        data = load_dataset("mnist1d", cache_dir=cache)
        cached_s = time.perf_counter() - started
    # warm-up: the first optimizer step of a process imports torch._dynamo (~2 s); keep it out of the timings
    train(build_model("mlp", data.input_shape, 10, widths=(8,)), data, TrainBudget(epochs=1), seed=0)
    budget = TrainBudget(epochs=args.epochs)
    training = [_train_row(data, arch, widths, budget) for arch, widths in PARENTS]
    for space in ("node", "weight"):
        for rescale in (False, True):
            training.append(_train_row(data, "mlp", (512, 512, 256), budget, (space, 0.9), rescale))
    searches = [
        _search_row(data, arch, widths, space, scorer, 8, 40)
        for arch, widths in [("mlp", (512, 512, 256)), ("mlp", (256, 256))]
        for space in ("node", "weight")
        for scorer in ("synflow", "snip", "short-train")
    ]
    meta = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "data": data.sizes(),
        "mnist1d_generate_s": round(generate_s, 2),
        "mnist1d_cached_load_s": round(cached_s, 3),
        "budget": budget.model_dump(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "training_speed.json").write_text(
        json.dumps({"meta": meta, "training": training, "search": searches}, indent=2)
    )
    lines = [
        "# Training and search cost of one study trial (MNIST-1D, 1 CPU thread)",
        "",
        f"{meta['date']}, {meta['cpu']} ({meta['cores']} cores, other load present: load average "
        f"{meta['load_average_before_after'][0]} before, {meta['load_average_before_after'][1]} after), "
        f"torch {meta['torch']}, 1 thread. Data: {meta['data']}; generating MNIST-1D took "
        f"{meta['mnist1d_generate_s']} s once, loading it from the cache {meta['mnist1d_cached_load_s']} s.",
        f"Budget: {args.epochs} epochs, batch {budget.batch_size}, SGD lr {budget.lr} momentum {budget.momentum}, "
        f"weight decay {budget.weight_decay}, cosine. Masks are applied by StaticMaskSparsifier (dense kernels); "
        "'rescaled init' = rescale_to_fan_in before training.",
        "",
        "| parent | mask | weight sparsity | median epoch (s) | training (s) | final test acc "
        "| forward FLOPs dense / non-zero |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in training:
        lines.append(
            f"| {row['arch']} {tuple(row['widths'])} | {row['mask']} | {row['weight_sparsity']} | "
            f"{row['median_epoch_s']} | {row['train_s']} | {row['final_test_accuracy']} | "
            f"{row['forward_flops_dense']:,} / {row['forward_flops_nonzero']:,} |"
        )
    lines += [
        "",
        "Random Search at 90% weight sparsity, 8 candidates (short-train: 40 steps each, then a validation pass):",
        "",
        "| parent | space | scorer | search (s) | per candidate (s) | (max - min) / max score |",
        "|---|---|---|---|---|---|",
    ]
    for row in searches:
        scorer = row["scorer"] + (f" ({row['short_train_steps']} steps)" if row["short_train_steps"] else "")
        lines.append(
            f"| {row['arch']} {tuple(row['widths'])} | {row['space']} | {scorer} | {row['search_s']} | "
            f"{row['per_candidate_s']} | {row['score_spread']} |"
        )
    (RESULTS / "training_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
