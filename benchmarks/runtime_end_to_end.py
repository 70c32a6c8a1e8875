"""End to end: an MLP and a small CNN trained to 90% sparsity on Fashion-MNIST, converted, timed and saved.

Each model is trained with gradual magnitude pruning (per layer, all Linear and Conv weights, 90% at the
end; the last epoch fine-tunes with the mask fixed), then `sparsearch.runtime.convert` picks sparse or dense
per layer by measurement. Reported against the same masked model run densely: test accuracy, latency at
batch 1, throughput at batch 256, and file sizes (dense safetensors vs sparse file, bytes per non-zero).
Run: python benchmarks/runtime_end_to_end.py [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from runtime_common import interleaved_times, machine, write_results
from safetensors.torch import save_file
from torch import nn

from sparsearch.data import load_dataset
from sparsearch.runtime import SparseLinear, convert_with_report, load_sparse, save_sparse

SPARSITY = 0.9


def build_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                         nn.Linear(1024, 10))


def build_cnn() -> nn.Module:
    """conv-conv-fc-fc (LeNet-like): about half of the multiply-adds are in the first fully connected layer."""
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64 * 7 * 7, 1024), nn.ReLU(), nn.Linear(1024, 10))


def prunable(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]


def magnitude_masks(model: nn.Module, sparsity: float) -> list[torch.Tensor]:
    masks = []
    for weight in prunable(model):
        k = int(sparsity * weight.numel())
        threshold = weight.detach().abs().flatten().kthvalue(k).values if k else -1.0
        masks.append(weight.detach().abs() > threshold)
    return masks


def apply_masks(model: nn.Module, masks: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for weight, mask in zip(prunable(model), masks, strict=True):
            weight.mul_(mask)


def train(model: nn.Module, data, schedule: list[float], batch_size: int, train_limit: int) -> None:
    """One epoch per entry of `schedule`: prune to that sparsity at the epoch's start, keep the mask fixed."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    x_train, y_train = data.x_train[:train_limit], data.y_train[:train_limit]
    generator = torch.Generator().manual_seed(0)
    masks = None
    for epoch, sparsity in enumerate(schedule):
        if sparsity > 0:
            masks = magnitude_masks(model, sparsity)
            apply_masks(model, masks)
        model.train()
        order = torch.randperm(len(y_train), generator=generator)
        start = time.perf_counter()
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if masks is not None:
                apply_masks(model, masks)
        print(f"  epoch {epoch}: sparsity {sparsity}, loss {loss.item():.3f}, "
              f"{time.perf_counter() - start:.1f} s", flush=True)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum()) for i in range(0, len(y), 1000))
    return correct / len(y)


def measure(name: str, build, data, schedule: list[float], train_limit: int, workdir: Path) -> dict:
    torch.manual_seed(0)
    model = build()
    print(f"{name}: training", flush=True)
    train(model, data, schedule, batch_size=128, train_limit=train_limit)
    model.eval()
    model.requires_grad_(False)
    weights = prunable(model)
    nonzero_weights = sum(int((w != 0).sum()) for w in weights)
    achieved = 1 - nonzero_weights / sum(w.numel() for w in weights)
    start = time.perf_counter()
    fast, report = convert_with_report(model, batch_sizes=(1, 256))
    convert_s = time.perf_counter() - start
    dense_path, sparse_path = workdir / f"{name}_dense.safetensors", workdir / f"{name}_sparse.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(dense_path))
    sparse_size = save_sparse(fast, sparse_path)
    reloaded = load_sparse(sparse_path, build())
    x_test, y_test = data.x_test, data.y_test
    acc_dense, acc_sparse, acc_reloaded = (accuracy(m, x_test, y_test) for m in (model, fast, reloaded))
    one, batch = x_test[:1].contiguous(), x_test[:256].contiguous()
    with torch.no_grad():
        latency, latency_best = interleaved_times({"dense": lambda: model(one), "sparse": lambda: fast(one)},
                                                  min_rounds=50, max_rounds=400, budget_s=3.0)
        throughput, throughput_best = interleaved_times(
            {"dense": lambda: model(batch), "sparse": lambda: fast(batch)}, min_rounds=10, max_rounds=100,
            budget_s=6.0)
    sparse_nnz = sum(m.nnz for m in fast.modules() if isinstance(m, SparseLinear))
    result = {
        "model": name, "target_sparsity": SPARSITY, "achieved_sparsity": round(achieved, 4),
        "train_samples": min(train_limit, len(data.y_train)), "epochs": len(schedule),
        "test_accuracy": {"dense_masked": acc_dense, "converted": acc_sparse, "reloaded": acc_reloaded},
        "latency_batch1_ms": {k: v * 1e3 for k, v in latency.items()},
        "latency_speedup": latency["dense"] / latency["sparse"],
        "latency_best_ms": {k: v * 1e3 for k, v in latency_best.items()},
        "latency_best_speedup": latency_best["dense"] / latency_best["sparse"],
        "throughput_batch256_samples_per_s": {k: 256 / v for k, v in throughput.items()},
        "throughput_speedup": throughput["dense"] / throughput["sparse"],
        "throughput_best_speedup": throughput_best["dense"] / throughput_best["sparse"],
        "file_bytes": {"dense_safetensors": dense_path.stat().st_size, "sparse": sparse_size},
        "file_ratio": sparse_size / dense_path.stat().st_size,
        "nnz_in_sparse_layers": sparse_nnz,
        "nonzero_weights": nonzero_weights,
        "sparse_file_bytes_per_nonzero_weight": sparse_size / nonzero_weights,
        "convert_seconds": convert_s,
        "layers": report.to_markdown(),
    }
    print(f"{name}: acc {acc_dense:.4f}/{acc_sparse:.4f}, latency x{result['latency_speedup']:.2f}, "
          f"throughput x{result['throughput_speedup']:.2f}, file {result['file_ratio']:.3f} of dense", flush=True)
    return result


def to_markdown(payload: dict) -> str:
    lines = ["Fashion-MNIST (training images used: see `train_samples` in the json; full 10,000-image test "
             f"set), per-layer magnitude pruning to {SPARSITY:.0%} (sparsity = fraction of zero weights "
             "in all Linear and Conv weights). Dense = the same masked model run with dense PyTorch layers.\n",
             "| model | sparsity | test acc (dense / converted / reloaded) | latency b=1 ms (dense / sparse) | "
             "speed-up median (best) | throughput b=256 samples/s (dense / sparse) | speed-up median (best) | "
             "file bytes (dense / sparse) | "
             "size ratio | sparse file bytes per non-zero weight | convert s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["results"]:
        a, lat, thr, fb = r["test_accuracy"], r["latency_batch1_ms"], r["throughput_batch256_samples_per_s"], \
            r["file_bytes"]
        lines.append(f"| {r['model']} | {r['achieved_sparsity']:.3f} | {a['dense_masked']:.4f} / "
                     f"{a['converted']:.4f} / {a['reloaded']:.4f} | {lat['dense']:.3f} / {lat['sparse']:.3f} | "
                     f"{r['latency_speedup']:.2f}x ({r['latency_best_speedup']:.2f}x) | "
                     f"{thr['dense']:.0f} / {thr['sparse']:.0f} | "
                     f"{r['throughput_speedup']:.2f}x ({r['throughput_best_speedup']:.2f}x) | "
                     f"{fb['dense_safetensors']} / {fb['sparse']} | "
                     f"{r['file_ratio']:.3f} | {r['sparse_file_bytes_per_nonzero_weight']:.2f} | "
                     f"{r['convert_seconds']:.1f} |")
    for r in payload["results"]:
        lines += ["", f"Layer decisions of `convert` for the {r['model']}:", "", r["layers"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="train on 10,000 images for a smoke run")
    args = parser.parse_args()
    torch.set_num_threads(2)
    info = machine()
    data = load_dataset("fashion-mnist")
    # subsets of the 54,000 training images to keep the run near 10 minutes on 2 shared cores
    mlp_limit, cnn_limit = (10_000, 10_000) if args.quick else (40_000, 12_000)
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure("MLP 784-1024-1024-10", build_mlp, data, [0.0, 0.6, 0.85, 0.9], mlp_limit, Path(tmp)),
                   measure("CNN conv32-conv64-fc1024-fc10", build_cnn, data, [0.0, 0.75, 0.9], cnn_limit,
                           Path(tmp))]
    payload = {"machine": info, "results": results}
    write_results("runtime_end_to_end" + ("_quick" if args.quick else ""), payload, to_markdown(payload))


if __name__ == "__main__":
    main()
