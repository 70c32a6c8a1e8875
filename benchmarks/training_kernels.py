"""Training through the sparse kernels: is a training step with a fixed sparsity pattern faster than masked dense?

1. One 4096x4096 layer at 90%, 95% and 99% sparsity, batch 64 and 256: a full training step (forward, backward,
   SGD with momentum) of the masked dense `nn.Linear` (gradient masked, as static-mask training on dense kernels
   does), of sparsearch's trainable `SparseLinear` (`runtime.for_training`), and of sparselab's `SparseLinear` (a
   peer with CPU training kernels; its own random pattern at the same sparsity). Interleaved, medians; quiet, and
   at 90% also next to one competing busy process (as in runtime_contention.py).
2. A 784-2048-2048-10 MLP on Fashion-MNIST with its two hidden layers at 95%: seconds per epoch and test accuracy
   after the epochs, for the masked dense model, the same model and pattern through `for_training`, and sparselab.
   The masked dense and sparsearch runs start from the same weights, so their accuracies should agree (the same
   arithmetic, summed in another order).
3. Sparse fine-tuning after one-shot pruning: the GPT-2-style decoder of runtime_transformers.py (6 x 768, vocabulary
   8192) pruned to 90% with one-shot magnitude, one AdamW step on 8 sequences of 64 tokens: masked dense against
   `for_training` (its Conv1D layers on the kernels; the lm_head, tied to the embedding, stays dense), interleaved.
4. A study trial: the random-weight arm of benchmarks/study_fashion.toml (LeNet-300-100 on Fashion-MNIST, an ERK
   random mask, SGD with momentum and weight decay, cosine rate, batch 128) at 90% and 98%, trained by
   `sparsearch.training.train` on one thread (as a study worker trains) with and without `sparse_kernels=True`:
   seconds per epoch and final test accuracy.
5. A study's search arm: Random Search of study_fashion.toml's search-weight arm (8 ERK candidates of
   LeNet-300-100, 100 short-training steps each at batch 128, scored on the validation split) at 90% and 98%, on
   one thread, `SearchProblem(sparse_kernels=False / True)`: wall seconds of the search and the candidates' scores.

Run: python benchmarks/training_kernels.py [--threads 2] [--epochs 2] (about 6 minutes on 2 quiet cores)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import sparselab
import torch
import torch.nn.functional as F
from runtime_common import interleaved_times, machine, write_results
from runtime_contention import BusyProcess, weight_at
from runtime_transformers import DECODER_NAME, SETTINGS, VOCAB, decoder_model, pruned_copy
from torch import nn

from sparsearch.data import load_dataset
from sparsearch.runtime import for_training

SPARSITIES = (0.9, 0.95, 0.99)
BATCHES = (64, 256)
CANDIDATES = ("dense (masked)", "sparsearch", "sparselab")


class Step:
    """One training step of a model on fixed data: forward, backward with a given output gradient, SGD."""

    def __init__(self, model: nn.Module, x: torch.Tensor, grad_output: torch.Tensor,
                 masks: dict[nn.Parameter, torch.Tensor] | None = None) -> None:
        self.model, self.x, self.grad_output, self.masks = model, x, grad_output, masks or {}
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.model(self.x).backward(self.grad_output)
        for param, mask in self.masks.items():
            param.grad.mul_(mask)
        self.optimizer.step()


def layer_rows(budget: float) -> list[dict]:
    rows = []
    for sparsity in SPARSITIES:
        weight = weight_at(sparsity)
        dense = nn.Linear(4096, 4096)
        with torch.no_grad():
            dense.weight.copy_(weight)
        mask = weight != 0
        sparse, _ = for_training(dense, max_density=1.0)
        torch.manual_seed(0)
        peer = sparselab.SparseLinear(4096, 4096, sparsity=sparsity)
        for batch in BATCHES:
            x, grad_output = torch.randn(batch, 4096), torch.randn(batch, 4096)
            steps = {"dense (masked)": Step(dense, x, grad_output, {dense.weight: mask}),
                     "sparsearch": Step(sparse, x, grad_output), "sparselab": Step(peer, x, grad_output)}
            for condition in ("quiet", "busy") if sparsity == 0.9 else ("quiet",):
                load = [round(v, 2) for v in os.getloadavg()]
                with BusyProcess() if condition == "busy" else nullcontext():
                    medians, best = interleaved_times(steps, min_rounds=5, max_rounds=40, budget_s=budget)
                row = {"sparsity": sparsity, "batch": batch, "condition": condition, "load_average_before": load,
                       "median_ms": {k: v * 1e3 for k, v in medians.items()},
                       "best_ms": {k: v * 1e3 for k, v in best.items()},
                       "sparselab_nnz": int(peer.nnz), "sparsearch_nnz": int(sparse.matrix.nnz)}
                rows.append(row)
                print(row, flush=True)
    return rows


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))


def model_rows(epochs: int, sparsity: float = 0.95, batch: int = 128) -> dict:
    data = load_dataset("fashion-mnist")
    x_train, y_train = data.x_train.reshape(len(data.y_train), -1), data.y_train
    x_test, y_test = data.x_test.reshape(len(data.y_test), -1), data.y_test
    torch.manual_seed(0)
    dense = mlp()
    masks = {}
    with torch.no_grad():
        for index in (0, 2):
            layer = dense[index]
            masks[layer.weight] = torch.rand(layer.weight.shape) >= sparsity
            layer.weight.mul_(masks[layer.weight])
    sparse, report = for_training(dense)
    peer = nn.Sequential(sparselab.SparseLinear(784, 2048, sparsity=sparsity), nn.ReLU(),
                         sparselab.SparseLinear(2048, 2048, sparsity=sparsity), nn.ReLU(), nn.Linear(2048, 10))
    models = {"dense (masked)": dense, "sparsearch": sparse, "sparselab": peer}
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for k, m in models.items()}
    seconds: dict[str, list[float]] = {k: [] for k in models}
    for epoch in range(epochs):
        order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(epoch))
        for name in (CANDIDATES if epoch % 2 == 0 else CANDIDATES[::-1]):  # epochs interleaved
            model, optimizer = models[name], optimizers[name]
            start = time.perf_counter()
            for first in range(0, len(order), batch):
                index = order[first:first + batch]
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(x_train[index]), y_train[index]).backward()
                if model is dense:
                    for param, mask in masks.items():
                        param.grad.mul_(mask)
                optimizer.step()
            seconds[name].append(time.perf_counter() - start)
    accuracy = {}
    with torch.no_grad():
        for name, model in models.items():
            accuracy[name] = float((model(x_test).argmax(1) == y_test).float().mean())
    return {"sparsity": sparsity, "batch": batch, "epochs": epochs, "train_samples": len(y_train),
            "sparse_layers": report.sparse_layers, "epoch_seconds": seconds,
            "median_epoch_seconds": {k: statistics.median(v) for k, v in seconds.items()},
            "test_accuracy": accuracy}


class DecoderStep:
    """One AdamW step of a causal language model on fixed tokens (next-token loss), masked gradients optional."""

    def __init__(self, model: nn.Module, tokens: torch.Tensor, masks: dict[nn.Parameter, torch.Tensor]) -> None:
        self.model, self.tokens, self.masks = model, tokens, masks
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.model(self.tokens, labels=self.tokens).loss.backward()
        for param, mask in self.masks.items():
            param.grad.mul_(mask)
        self.optimizer.step()


def decoder_row(budget: float, steps: int) -> dict:
    pruned = pruned_copy(decoder_model(), SETTINGS["90%"], VOCAB)  # eval mode: no dropout
    pruned.config.use_cache = False
    masks = {m.weight: m.weight != 0 for m in pruned.modules() if type(m).__name__ == "Conv1D"}
    trainable, report = for_training(pruned)
    tokens = torch.randint(0, VOCAB, (8, 64), generator=torch.Generator().manual_seed(0))
    load = [round(v, 2) for v in os.getloadavg()]
    medians, best = interleaved_times({"dense (masked)": DecoderStep(pruned, tokens, masks),
                                       "sparsearch": DecoderStep(trainable, tokens, {})},
                                      min_rounds=steps, max_rounds=steps, budget_s=budget)
    return {"model": DECODER_NAME, "sparsity": 0.9, "sequences": 8, "tokens": 64, "load_average_before": load,
            "sparse_layers": len(report.sparse_layers), "linear_layers": len(report.layers),
            "median_s": medians, "best_s": best}


@contextmanager
def study_fashion_setting(epochs: int) -> Iterator[tuple[object, object, Callable[[], nn.Module]]]:
    """(data, budget, parent) of benchmarks/study_fashion.toml (Fashion-MNIST, LeNet-300-100, its SGD recipe for
    `epochs`), on one thread as a study worker trains; the thread count is restored afterwards."""
    from sparsearch.models import build_model
    from sparsearch.training import TrainBudget

    data = load_dataset("fashion-mnist", seed=0)
    budget = TrainBudget(epochs=epochs, batch_size=128, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4,
                         lr_schedule="cosine")

    def parent() -> nn.Module:
        return build_model("mlp", data.input_shape, data.num_classes, widths=(300, 100), seed=0)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield data, budget, parent
    finally:
        torch.set_num_threads(threads)


def study_trial_rows(epochs: int) -> list[dict]:
    from sparsearch.algorithms import RigL
    from sparsearch.engine import StaticMaskSparsifier
    from sparsearch.search import WeightSpace
    from sparsearch.training import train

    rows = []
    with study_fashion_setting(epochs) as (data, budget, parent):
        for sparsity in (0.9, 0.98):
            masks = WeightSpace(parent(), sparsity, "erk").sample(torch.Generator().manual_seed(0))
            row: dict = {"sparsity": sparsity, "epochs": epochs, "threads": 1,
                         "mask_density": {k: float(m.float().mean()) for k, m in masks.items()}}
            arms = {"random-weight": lambda steps, masks=masks: StaticMaskSparsifier(masks),
                    # a dynamic arm: on the kernels between its updates (every 100 steps until 75% of training)
                    "rigl": lambda steps, sparsity=sparsity: RigL(sparsity, total_steps=steps, update_every=100,
                                                                  distribution="erk")}
            for arm, factory in arms.items():
                row = {**row, "arm": arm}
                for kernels in (False, True):  # whole trials one after the other: each takes seconds
                    result = train(parent(), data, budget, seed=0, sparse_kernels=kernels, sparsifier_factory=factory)
                    name = "kernels" if kernels else "masked"
                    row[f"{name}_epoch_seconds"] = statistics.median(e.seconds for e in result.epochs)
                    row[f"{name}_test_accuracy"] = result.final_test_accuracy
                rows.append(row)
                print(row, flush=True)
    return rows


def search_arm_rows(candidates: int) -> list[dict]:
    from sparsearch.search import WeightSpace
    from sparsearch.search.methods import SearchProblem, run_method

    rows = []
    with study_fashion_setting(8) as (data, budget, parent):
        for sparsity in (0.9, 0.98):
            row: dict = {"sparsity": sparsity, "candidates": candidates, "short_train_steps": 100, "threads": 1}
            for kernels in (False, True):
                problem = SearchProblem(WeightSpace(parent(), sparsity, "erk"), parent, data, seed=0,
                                        n_candidates=candidates, short_train_steps=100, batch_size=128,
                                        train_budget=budget, sparse_kernels=kernels)
                started = time.perf_counter()
                outcome = run_method("search", problem)
                name = "kernels" if kernels else "masked"
                row[f"{name}_seconds"] = time.perf_counter() - started
                row[f"{name}_scores"] = [float(e["score"]) for e in outcome.evaluations]
                row[f"{name}_best"] = outcome.best_id
            rows.append(row)
            print(row, flush=True)
    return rows


def to_markdown(payload: dict) -> str:
    lines = ["One training step (forward, backward, SGD with momentum) of a 4096x4096 layer: ms, median of "
             "interleaved steps (speed-up over the masked dense step). 'dense (masked)': `nn.Linear` with its "
             "gradient masked; 'sparsearch': `runtime.for_training` (trainable `SparseLinear`, forward and backward "
             "on the kernels); 'sparselab': sparselab 0.2.2's `SparseLinear` (its own pattern, same sparsity). "
             "'busy': next to one process multiplying matrices on one core.\n",
             "| sparsity | batch | condition | dense (masked) | sparsearch | sparselab | load avg before |",
             "|---|---|---|---|---|---|---|"]
    for r in payload["layer"]:
        ms = r["median_ms"]
        cells = [f"{ms['dense (masked)']:.1f}"] + [f"{ms[k]:.1f} ({ms['dense (masked)'] / ms[k]:.2f}x)"
                                                  for k in ("sparsearch", "sparselab")]
        lines.append(f"| {r['sparsity']:.0%} | {r['batch']} | {r['condition']} | {' | '.join(cells)} | "
                     f"{r['load_average_before'][0]} |")
    m = payload.get("model")
    if m:
        lines += ["", f"784-2048-2048-10 MLP on Fashion-MNIST ({m['train_samples']} training images), hidden layers "
                  f"at {m['sparsity']:.0%}, batch {m['batch']}, SGD lr 0.05 momentum 0.9, {m['epochs']} epochs "
                  "(interleaved by epoch); sparsearch trains the masked dense model's own weights and pattern.\n",
                  "| candidate | median epoch (s) | speed-up | test accuracy |", "|---|---|---|---|"]
        base = m["median_epoch_seconds"]["dense (masked)"]
        for name in CANDIDATES:
            seconds = m["median_epoch_seconds"][name]
            lines.append(f"| {name} | {seconds:.2f} | {base / seconds:.2f}x | {m['test_accuracy'][name]:.4f} |")
    d = payload.get("decoder")
    if d:
        base, ours = d["median_s"]["dense (masked)"], d["median_s"]["sparsearch"]
        lines += ["", f"Sparse fine-tuning: {d['model']} pruned to 90% (one-shot magnitude), one AdamW step on "
                  f"{d['sequences']} sequences of {d['tokens']} tokens, median of interleaved steps; "
                  f"{d['sparse_layers']} of {d['linear_layers']} Linear/Conv1D layers on the kernels (the lm_head is "
                  f"tied to the embedding and stays dense). Masked dense {base:.2f} s, sparsearch {ours:.2f} s "
                  f"({base / ours:.2f}x); load average before {d['load_average_before'][0]}."]
    trials = payload.get("study_trial")
    if trials:
        lines += ["", "A study trial on one thread (`sparsearch.training.train`, the random-weight arm of "
                  "benchmarks/study_fashion.toml: LeNet-300-100, ERK mask, Fashion-MNIST; and RigL with ERK, "
                  "updates every 100 steps until 75% of training, on the kernels between them), median seconds per "
                  "epoch and final test accuracy, masked against `sparse_kernels=True`:\n",
                  "| arm | sparsity | kept per layer (ERK) | masked s/epoch | kernels s/epoch | speed-up | "
                  "test acc masked / kernels |",
                  "|---|---|---|---|---|---|---|"]
        for r in trials:
            kept = ", ".join(f"{v:.2f}" for v in r["mask_density"].values())
            lines.append(f"| {r.get('arm', 'random-weight')} | {r['sparsity']:.0%} | {kept} | "
                         f"{r['masked_epoch_seconds']:.2f} | "
                         f"{r['kernels_epoch_seconds']:.2f} | "
                         f"{r['masked_epoch_seconds'] / r['kernels_epoch_seconds']:.2f}x | "
                         f"{r['masked_test_accuracy']:.4f} / {r['kernels_test_accuracy']:.4f} |")
    searches = payload.get("search_arm")
    if searches:
        lines += ["", "A study's search arm on one thread (Random Search as in study_fashion.toml's search-weight arm: "
                  "ERK candidates of LeNet-300-100, 100 short-training steps each at batch 128), wall seconds of the "
                  "whole search, `SearchProblem(sparse_kernels=...)`; validation-accuracy scores of the candidates "
                  "(largest difference between the two runs) and the candidate picked:\n",
                  "| sparsity | candidates | masked s | kernels s | speed-up | largest score difference | "
                  "picked masked / kernels |", "|---|---|---|---|---|---|---|"]
        for r in searches:
            difference = max(abs(a - b) for a, b in zip(r["masked_scores"], r["kernels_scores"], strict=True))
            lines.append(f"| {r['sparsity']:.0%} | {r['candidates']} | {r['masked_seconds']:.1f} | "
                         f"{r['kernels_seconds']:.1f} | {r['masked_seconds'] / r['kernels_seconds']:.2f}x | "
                         f"{difference:.4f} | {r['masked_best']} / {r['kernels_best']} |")
    lines += ["", f"Run: `{payload['command']}`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of timing per layer point")
    parser.add_argument("--epochs", type=int, default=2, help="MLP epochs (0: skip the MLP)")
    parser.add_argument("--decoder-steps", type=int, default=8, help="decoder steps per candidate (0: skip)")
    parser.add_argument("--trial-epochs", type=int, default=2, help="study-trial epochs (0: skip)")
    parser.add_argument("--search-candidates", type=int, default=8, help="search-arm candidates (0: skip)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = machine()
    payload = {"machine": info, "command": f"python benchmarks/training_kernels.py --threads {args.threads} "
                                          f"--budget {args.budget} --epochs {args.epochs} "
                                          f"--decoder-steps {args.decoder_steps} --trial-epochs {args.trial_epochs} "
                                          f"--search-candidates {args.search_candidates}",
               "layer": layer_rows(args.budget)}
    if args.epochs:
        payload["model"] = model_rows(args.epochs)
        print(payload["model"], flush=True)
    if args.decoder_steps:
        payload["decoder"] = decoder_row(args.budget, args.decoder_steps)
        print(payload["decoder"], flush=True)
    if args.trial_epochs:
        payload["study_trial"] = study_trial_rows(args.trial_epochs)
    if args.search_candidates:
        payload["search_arm"] = search_arm_rows(args.search_candidates)
    write_results("training_kernels", payload, to_markdown(payload))


if __name__ == "__main__":
    main()
