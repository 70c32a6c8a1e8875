"""Do search scores predict trained accuracy? Rank correlation of every method's fidelity with trained accuracy.

For each search space (node, weight, allocation) at one sparsity, sample N candidates of the same parent
(MNIST-1D, one seed) and score each with every fidelity a search method uses: SynFlow, SNIP, and short training
for k steps (validation accuracy; one resumable run per candidate read at every k, as successive halving
reads it). Then train every candidate fully under the same budget and measure the Kendall tau between each
score and the final validation / test accuracy. A tau near 0 means selecting by that score is no better than
picking at random; successive halving, evolution and TPE can only win where their fidelity has a clearly
positive tau. Learned masks (DASS, at Random Search's budget of 8 candidates x 40 steps) are one mask, not a
ranking: the table gives its trained accuracy and its rank among the N random candidates. Writes
benchmarks/results/<output>.md and .json. One CPU thread; other load may be present.

    python benchmarks/scorer_correlation.py [--candidates 12] [--epochs 15] [--sparsity 0.9] [--rescale-init]
        [--spaces node weight allocation] [--steps 10 20 40 80 160] [--output scorer_correlation_methods]
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
from sparsearch.search import SearchProblem, make_space, rescale_to_fan_in, run_method, snip_score, synflow_score
from sparsearch.search.methods import short_train
from sparsearch.training import TrainBudget, train

RESULTS = Path(__file__).parent / "results"
WIDTHS = (256, 256)
RANDOM_SEARCH_CANDIDATES, RANDOM_SEARCH_STEPS = 8, 40  # the budget DASS gets here


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--rescale-init", action="store_true")
    parser.add_argument("--spaces", nargs="+", default=["node", "weight", "allocation"])
    parser.add_argument("--steps", nargs="+", type=int, default=[10, 20, 40, 80, 160])
    parser.add_argument("--output", default="scorer_correlation_methods")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    data = load_dataset("mnist1d", seed=0)
    budget = TrainBudget(epochs=args.epochs)
    steps = sorted(args.steps)

    def parent():
        return build_model("mlp", data.input_shape, data.num_classes, widths=WIDTHS, seed=0)

    def trained_accuracy(masks):
        model = fresh(masks)
        result = train(
            model, data, budget, seed=0, sparsifier_factory=lambda _, masks=masks: StaticMaskSparsifier(masks)
        )
        return result.final_val_accuracy, result.final_test_accuracy

    def fresh(masks):
        model = parent()
        if args.rescale_init:
            rescale_to_fan_in(model, masks)
        return model

    batch_rows = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(0))[:128]
    batch = (data.x_train[batch_rows], data.y_train[batch_rows])
    scorers = ["synflow", "snip"] + [f"short-train@{k}" for k in steps]
    rows, summary, learned = [], [], []
    for space_name in args.spaces:
        space = make_space(space_name, parent(), args.sparsity)
        sampler = torch.Generator().manual_seed(1)
        candidates = []
        for index in range(args.candidates):
            masks = space.sample(sampler)
            row = {
                "space": space_name,
                "candidate": index,
                "synflow": synflow_score(fresh(masks), masks, data.input_shape),
                "snip": snip_score(fresh(masks), masks, batch),
            }
            model, state = fresh(masks), None
            for k in steps:  # one training run, read at every length
                accuracy, loss, state = short_train(
                    model, masks, data, steps=k, batch_size=128, budget=budget, seed=0, resume=state
                )
                row[f"short-train@{k}"], row[f"short-train@{k} loss"] = accuracy, loss
            row["val_accuracy"], row["test_accuracy"] = trained_accuracy(masks)
            candidates.append(row)
        rows += candidates
        for scorer in scorers:
            scores = [c[scorer] for c in candidates]
            tau_val = kendalltau(scores, [c["val_accuracy"] for c in candidates]).statistic
            tau_test = kendalltau(scores, [c["test_accuracy"] for c in candidates]).statistic
            loss_key = f"{scorer} loss"
            best = max(range(len(candidates)), key=lambda i: (scores[i], -candidates[i].get(loss_key, 0.0)))
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
        if space_name in ("weight", "allocation"):
            problem = SearchProblem(
                space,
                parent,
                data,
                seed=0,
                short_train_steps=RANDOM_SEARCH_STEPS,
                n_candidates=RANDOM_SEARCH_CANDIDATES,
                train_budget=budget,
                rescale_init=args.rescale_init,
            )
            outcome = run_method("dass", problem, space_name=space_name)
            val_accuracy, test_accuracy = trained_accuracy(outcome.best_masks)
            accuracies = sorted((c["test_accuracy"] for c in candidates), reverse=True)
            learned.append(
                {
                    "space": space_name,
                    "method": "dass",
                    "steps": outcome.evaluations[0]["steps"],
                    "flops": outcome.flops,
                    "budget_flops": outcome.budget_flops,
                    "test_accuracy": test_accuracy,
                    "val_accuracy": val_accuracy,
                    "rank_among_candidates": 1 + sum(a > test_accuracy for a in accuracies),
                    "candidates": len(candidates),
                    "mean_candidate_test_accuracy": round(sum(accuracies) / len(accuracies), 4),
                    "best_candidate_test_accuracy": accuracies[0],
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
        "short_train_steps": steps,
        "rescale_init": args.rescale_init,
        "budget": budget.model_dump(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    name = args.output + ("_rescaled" if args.rescale_init else "")
    document = {"meta": meta, "summary": summary, "learned": learned, "candidates": rows}
    (RESULTS / f"{name}.json").write_text(json.dumps(document, indent=2))
    lines = [
        f"# Do search scores predict trained accuracy? (MNIST-1D, MLP {WIDTHS}, {args.sparsity:.0%} sparse)",
        "",
        f"{meta['date']}, {meta['cores']} cores shared with other work (load average "
        f"{meta['load_average_before_after'][0]} -> {meta['load_average_before_after'][1]}), torch {meta['torch']}, "
        f"1 thread, {meta['seconds']} s. {args.candidates} candidates per space (one parent, seed 0), each scored "
        f"and then trained {args.epochs} epochs (SGD 0.05, cosine); short-train@k = validation accuracy after k "
        f"steps (batch 128, constant lr). Sparsity-aware init (rescale_to_fan_in): {args.rescale_init}.",
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
    if learned:
        lines += [
            "",
            f"Learned masks (DASS at Random Search's budget: {RANDOM_SEARCH_CANDIDATES} candidates x "
            f"{RANDOM_SEARCH_STEPS} steps), trained like the candidates:",
            "",
            "| space | gradient steps | search FLOPs (of budget) | test acc | rank among the candidates "
            "| mean candidate test acc | best candidate test acc |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in learned:
            lines.append(
                f"| {row['space']} | {row['steps']} | {row['flops'] / row['budget_flops']:.2f} | "
                f"{row['test_accuracy']:.4f} | {row['rank_among_candidates']} of {row['candidates'] + 1} | "
                f"{row['mean_candidate_test_accuracy']:.4f} | {row['best_candidate_test_accuracy']:.4f} |"
            )
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
