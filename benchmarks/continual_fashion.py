"""Split-Fashion-MNIST (5 tasks of 2 classes): SparCL-style sparse continual learning against fine-tuning,
dense experience replay and EWC. Average accuracy and forgetting after the last task (class-incremental: one
10-way head; task-incremental: argmax within the task's two classes) and training FLOPs.

Every method: MLP 784-256-256-10, SGD momentum 0.9 at lr 0.01 (0.05 diverged for fine-tuning and EWC), batch 32
(+ 32 replayed samples for replay and SparCL, buffer of 200), 1 epoch per task on the first 10,000 training
images (about 2,000 per task), test on the first 5,000 test images; EWC lambda 100 (10 and 100 were tried; 100
was better), Fisher from 200 samples per task; SparCL at sparsity 0.8, RigL-style mask updates every 50 steps.
One torch thread, seeds 0-2; shared machine (load average in the result file).

    python benchmarks/continual_fashion.py
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from datetime import UTC, datetime
from pathlib import Path

import torch

import sparsearch as sa
from sparsearch.algorithms import split_by_classes
from sparsearch.data import load_dataset
from sparsearch.models import build_model

RESULTS = Path(__file__).parent / "results"
METHODS = {"finetune": {}, "replay": {}, "ewc": {"ewc_lambda": 100.0}, "sparcl": {"sparsity": 0.8}}
SEEDS = (0, 1, 2)


def main() -> None:
    torch.set_num_threads(1)
    data = load_dataset("fashion-mnist", seed=0)
    tasks = split_by_classes(data.x_train[:10000], data.y_train[:10000], data.x_test[:5000], data.y_test[:5000])
    meta = {"machine": f"{platform.machine()} {platform.processor() or ''} ({os.cpu_count()} cores)".strip(),
            "torch": torch.__version__, "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "load_average_start": [round(v, 2) for v in os.getloadavg()],
            "tasks": [{"classes": t.classes, "train": len(t.y_train), "test": len(t.y_test)} for t in tasks]}
    runs = []
    for seed in SEEDS:
        for method, settings in METHODS.items():
            model = build_model("mlp", data.input_shape, 10, widths=(256, 256), seed=seed)
            result = sa.train_continual(model, tasks, method, epochs=1, batch_size=32, lr=0.01, buffer_size=200,
                                        seed=seed, **settings)
            runs.append({"method": method, "seed": seed, "average_accuracy": result.average_accuracy,
                         "forgetting": result.forgetting, "average_task_accuracy": result.average_task_accuracy,
                         "task_forgetting": result.task_forgetting, "train_flops": result.train_flops,
                         "final_density": result.final_density, "seconds": result.seconds,
                         "accuracy_matrix": result.accuracy})
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "accuracy_matrix"}), flush=True)
    meta["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "continual_fashion.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    finetune_flops = statistics.mean(r["train_flops"] for r in runs if r["method"] == "finetune")
    lines = ["# Split-Fashion-MNIST: sparse continual learning vs baselines", "",
             f"Machine: {meta['machine']}, torch {meta['torch']}, 1 thread; {meta['date']}; load average "
             f"{meta['load_average_start']} at start, {meta['load_average_end']} at the end. "
             "Produced by `python benchmarks/continual_fashion.py` (settings in its docstring).", "",
             "Mean ± std over seeds 0-2, accuracies in %. Forgetting: mean drop from the best earlier accuracy "
             "to the final one over tasks 1-4.", "",
             "| method | class-IL avg. accuracy | class-IL forgetting | task-IL avg. accuracy | task-IL forgetting "
             "| training FLOPs vs fine-tuning | final density |", "|---|---|---|---|---|---|---|"]
    for method in METHODS:
        rows = [r for r in runs if r["method"] == method]

        def cell(key: str, rows: list = rows) -> str:
            values = [100 * r[key] for r in rows]
            return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"

        flops = statistics.mean(r["train_flops"] for r in rows) / finetune_flops
        lines.append(f"| {method} | {cell('average_accuracy')} | {cell('forgetting')} | "
                     f"{cell('average_task_accuracy')} | {cell('task_forgetting')} | {flops:.2f} | "
                     f"{rows[0]['final_density']:.2f} |")
    (RESULTS / "continual_fashion.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
