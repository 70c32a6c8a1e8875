"""Do the Random Search scores predict trained accuracy? Rank correlation of candidate scores with accuracy.

For each search space at one sparsity, sample N candidates of the same parent (MNIST-1D, one seed), score
each with SynFlow, SNIP and short-train (k steps, validation accuracy), then train every candidate fully
under the same budget and measure the Kendall tau between each score and the final validation / test
accuracy. A score near 0 means selecting by it is no better than picking at random. Writes
benchmarks/results/scorer_correlation.md and .json. One CPU thread; other load may be present.

    python benchmarks/scorer_correlation.py [--candidates 12] [--epochs 15] [--sparsity 0.9] [--rescale-init]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import torch
from scipy.stats import kendalltau

from sparsearch.data import load_dataset
from sparsearch.engine import StaticMaskSparsifier
from sparsearch.models import build_model
from sparsearch.search import (
    make_space,
    rescale_to_fan_in,
    short_train_evaluation,
    snip_score,
    synflow_score,
)
from sparsearch.training import TrainBudget, train

RESULTS = Path(__file__).parent / "results"
WIDTHS = (256, 256)
SHORT_TRAIN_STEPS = 40


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--rescale-init", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    data = load_dataset("mnist1d", seed=0)
    budget = TrainBudget(epochs=args.epochs)

    def parent():
        return build_model("mlp", data.input_shape, data.num_classes, widths=WIDTHS, seed=0)

    batch_rows = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(0))[:128]
    batch = (data.x_train[batch_rows], data.y_train[batch_rows])
    rows, summary = [], []
    for space_name in ("node", "weight"):
        space = make_space(space_name, parent(), args.sparsity)
        sampler = torch.Generator().manual_seed(1)
        candidates = []
        for index in range(args.candidates):
            masks = space.sample(sampler)

            def fresh(masks=masks):
                model = parent()
                if args.rescale_init:
                    rescale_to_fan_in(model, masks)
                return model

            short_accuracy, short_loss, _ = short_train_evaluation(
                fresh(), masks, data, steps=SHORT_TRAIN_STEPS, budget=budget, seed=0
            )
            trained = train(
                fresh(), data, budget, seed=0, sparsifier_factory=lambda steps, masks=masks: StaticMaskSparsifier(masks)
            )
            candidates.append(
                {
                    "space": space_name,
                    "candidate": index,
                    "synflow": synflow_score(fresh(), masks, data.input_shape),
                    "snip": snip_score(fresh(), masks, batch),
                    "short-train": short_accuracy,
                    "short-train loss": short_loss,
                    "val_accuracy": trained.final_val_accuracy,
                    "test_accuracy": trained.final_test_accuracy,
                }
            )
        rows += candidates
        for scorer in ("synflow", "snip", "short-train"):
            scores = [c[scorer] for c in candidates]
            tau_val = kendalltau(scores, [c["val_accuracy"] for c in candidates]).statistic
            tau_test = kendalltau(scores, [c["test_accuracy"] for c in candidates]).statistic
            best = max(range(len(candidates)), key=lambda i: (scores[i], -candidates[i]["short-train loss"]))
            summary.append(
                {
                    "space": space_name,
                    "scorer": scorer,
                    "kendall_tau_val": round(float(tau_val), 3),
                    "kendall_tau_test": round(float(tau_test), 3),
                    "picked_test_accuracy": candidates[best]["test_accuracy"],
                    "mean_test_accuracy": round(sum(c["test_accuracy"] for c in candidates) / len(candidates), 4),
                    "best_test_accuracy": max(c["test_accuracy"] for c in candidates),
                }
            )
    meta = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "parent": f"mlp {WIDTHS}",
        "sparsity": args.sparsity,
        "candidates": args.candidates,
        "short_train_steps": SHORT_TRAIN_STEPS,
        "rescale_init": args.rescale_init,
        "budget": budget.model_dump(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    name = "scorer_correlation" + ("_rescaled" if args.rescale_init else "")
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "summary": summary, "candidates": rows}, indent=2))
    lines = [
        f"# Do Random Search scores predict trained accuracy? (MNIST-1D, MLP {WIDTHS}, {args.sparsity:.0%} sparse)",
        "",
        f"{meta['date']}, {meta['cores']} cores shared with other work (load average "
        f"{meta['load_average_before_after'][0]} -> {meta['load_average_before_after'][1]}), torch {meta['torch']}, "
        f"1 thread, {meta['seconds']} s. {args.candidates} candidates per space (one parent, seed 0), each scored "
        f"and then trained {args.epochs} epochs (SGD 0.05, cosine); short-train = validation accuracy after "
        f"{SHORT_TRAIN_STEPS} steps. Sparsity-aware init (rescale_to_fan_in): {args.rescale_init}.",
        "",
        "| space | scorer | Kendall tau (val acc) | Kendall tau (test acc) | test acc of the pick "
        "| mean test acc | best test acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in summary:
        lines.append(
            f"| {row['space']} | {row['scorer']} | {row['kendall_tau_val']} | {row['kendall_tau_test']} | "
            f"{row['picked_test_accuracy']:.4f} | {row['mean_test_accuracy']:.4f} | {row['best_test_accuracy']:.4f} |"
        )
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
