"""Sparse convolutions: single layers (quiet and next to a busy process) and the Fashion-MNIST CNN end to end.

Layers: a 2-D 64->128 3x3 convolution on 32x32 maps (batch 1 and 64) and the middle 1-D convolution of the
package's default CNN on MNIST-1D (32->64, kernel 5, 'same' padding, length 20; batch 1 and 256), at 80, 90 and
95% random sparsity. Timed interleaved in rounds: dense (`nn.Conv*d`); `SparseConv*d` (one kernel call per image
on the padded image itself, see runtime/conv.py); the alternative the runtime does not use, im2col for the whole
batch (an as_strided copy into (in*k*k) x (batch*L)) and ONE kernel call, then the output transpose back to
NCHW; and the layer as `convert` decided it on the quiet machine. Each point "quiet" (nothing started by the
benchmark; load averages recorded) and "busy" (one competing process multiplying 512x512 matrices on one thread,
as in runtime_contention.py).

End to end: the CNN of runtime_end_to_end.py (conv32-conv64-fc1024-fc10, trained with gradual magnitude pruning
to 90% on 12,000 Fashion-MNIST images, the same recipe and seed), dense vs `convert` with Linear layers only (what
convert did before convolutions: convs stay dense) vs `convert` now, latency at batch 1 and throughput at batch
256, quiet and busy. Training is not timed: run `--train-only` first under `heavy`, then the timing under `quiet`
(the trained model is cached under $SPARSEARCH_CACHE or ~/.cache/sparsearch).
Run: python benchmarks/runtime_conv.py [--train-only] [--part layers|cnn|all] [--budget SECONDS] (layers: about
2 minutes on 2 quiet cores at the default budget; cnn: about 1 minute after --train-only)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from runtime_common import interleaved_times, machine, write_results
from runtime_contention import BusyProcess
from runtime_end_to_end import accuracy, build_cnn, prunable, train
from safetensors.torch import load_file, save_file
from torch import nn

from sparsearch.data import load_dataset
from sparsearch.runtime import (
    PanelCSRMatrix,
    SparseConv1d,
    SparseConv2d,
    SparseLinear,
    convert,
    convert_with_report,
    kernels,
    load_sparse,
    save_sparse,
    sparse_matmul_t,
)

SPARSITIES = (0.8, 0.9, 0.95)
LAYERS = (  # name, conv, per-sample input shape, batch sizes
    ("Conv2d 64->128 3x3, 32x32", lambda: nn.Conv2d(64, 128, 3, padding=1), (64, 32, 32), (1, 64)),
    ("Conv1d 32->64 k5, length 20 (default CNN)", lambda: nn.Conv1d(32, 64, 5, padding=2), (32, 20), (1, 256)),
)
CNN_TRAIN_LIMIT, CNN_SCHEDULE = 12_000, [0.0, 0.75, 0.9]  # as runtime_end_to_end.py


def sparse_layer(make, sparsity: float) -> nn.Module:
    torch.manual_seed(0)
    conv = make().eval().requires_grad_(False)
    conv.weight.mul_(torch.rand(conv.weight.shape) >= sparsity)
    return conv


def batched_im2col(conv: nn.Module, matrix: PanelCSRMatrix):
    """One kernel call over batch * L columns: the alternative to per-image calls (stride 1 only)."""
    k, pad = conv.kernel_size[-1], conv.padding[-1]
    bias = conv.bias

    def run(x: torch.Tensor) -> torch.Tensor:
        x4 = x if x.dim() == 4 else x[:, :, None, :]
        kh = k if x.dim() == 4 else 1
        padded = F.pad(x4, (pad, pad) + ((pad, pad) if x.dim() == 4 else (0, 0)))
        n, c, hp, wp = padded.shape
        ho, wo = hp - kh + 1, wp - k + 1
        s = padded.stride()
        columns = padded.as_strided((c, kh, k, n, ho, wo), (s[1], s[2], s[3], s[0], s[2], s[3]))
        yt = sparse_matmul_t(matrix, columns.reshape(c * kh * k, n * ho * wo), bias)
        y = yt.view(matrix.rows, n, ho, wo).permute(1, 0, 2, 3).contiguous()
        return y if x.dim() == 4 else y[:, :, 0, :]

    return run


def measure_layers(budget: float) -> list[dict]:
    rows = []
    for label, make, shape, batches in LAYERS:
        for sparsity in SPARSITIES:
            conv = sparse_layer(make, sparsity)
            sparse = (SparseConv2d if isinstance(conv, nn.Conv2d) else SparseConv1d).from_conv(conv)
            im2col = batched_im2col(conv, PanelCSRMatrix.from_dense(conv.weight.reshape(conv.out_channels, -1)))
            for batch in batches:
                x = torch.randn(batch, *shape)
                with torch.no_grad():
                    expected = conv(x)
                    assert (sparse(x) - expected).abs().max() < 1e-3 and (im2col(x) - expected).abs().max() < 1e-3
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    converted = convert(nn.Sequential(conv), x, batch_sizes=(batch,))
                kept = "sparse" if isinstance(converted[0], SparseConv1d | SparseConv2d) else "dense"
                fns = {"dense": lambda x=x, c=conv: c(x), "sparse": lambda x=x, s=sparse: s(x),
                       "converted": lambda x=x, c=converted: c(x)}
                # timed in its own rounds: its batch-sized im2col buffer evicted the caches of whichever call came
                # next, which made even the unchanged dense layer look slower when it followed
                alternative = {"dense": fns["dense"], "im2col_one_call": lambda x=x, f=im2col: f(x)}
                row = {"layer": label, "sparsity": sparsity, "batch": batch, "converted_kept": kept}
                for condition in ("quiet", "busy"):
                    row[condition] = timed(fns, condition, budget)
                    other = timed(alternative, condition, budget / 2)
                    row[condition]["speedup"]["im2col_one_call"] = other["speedup"]["im2col_one_call"]
                    row[condition]["im2col_rounds"] = other
                    s = row[condition]["speedup"]
                    print(f"{label} s={sparsity} b={batch} {condition}: dense {row[condition]['ms']['dense']:.3f} ms "
                          f"| sparse {s['sparse']:.2f}x | im2col one call {s['im2col_one_call']:.2f}x | converted "
                          f"({kept}) {s['converted']:.2f}x", flush=True)
                rows.append(row)
    return rows


def timed(fns: dict, condition: str, budget: float) -> dict:
    load_before = [round(v, 2) for v in os.getloadavg()]
    with torch.no_grad():
        if condition == "busy":
            with BusyProcess():
                med, best = interleaved_times(fns, min_rounds=5, max_rounds=200, budget_s=budget)
        else:
            med, best = interleaved_times(fns, min_rounds=5, max_rounds=200, budget_s=budget)
    return {"ms": {k: v * 1e3 for k, v in med.items()}, "best_ms": {k: v * 1e3 for k, v in best.items()},
            "speedup": {k: med["dense"] / v for k, v in med.items() if k != "dense"},
            "load_average_before": load_before}


def cnn_cache() -> Path:
    root = Path(os.environ.get("SPARSEARCH_CACHE") or Path.home() / ".cache" / "sparsearch").expanduser()
    return root / "benchmarks" / f"runtime_conv_cnn_{CNN_TRAIN_LIMIT}_{'-'.join(map(str, CNN_SCHEDULE))}.safetensors"


def trained_cnn(data) -> nn.Module:
    model = build_cnn()
    path = cnn_cache()
    if path.exists():
        model.load_state_dict(load_file(str(path)))
    else:
        torch.manual_seed(0)
        model = build_cnn()
        train(model, data, CNN_SCHEDULE, batch_size=128, train_limit=CNN_TRAIN_LIMIT)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model.eval().requires_grad_(False)


def measure_cnn(data, budget: float) -> dict:
    model = trained_cnn(data)
    weights = prunable(model)
    sparsity = 1 - sum(int((w != 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    sample = data.x_test[:256]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # without a sample input convs stay dense: that is the point here
        linear_only, linear_report = convert_with_report(model, batch_sizes=(1, 256))
    start = time.perf_counter()
    full, report = convert_with_report(model, sample, batch_sizes=(1, 256))
    convert_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cnn.safetensors"
        file_bytes = save_sparse(full, path)
        reloaded = load_sparse(path, build_cnn())
    models = {"dense": model, "linear_only": linear_only, "with_convs": full, "reloaded": reloaded}
    acc = {name: accuracy(m, data.x_test, data.y_test) for name, m in models.items()}
    one, batch = data.x_test[:1].contiguous(), sample.contiguous()
    result = {"achieved_sparsity": round(sparsity, 4), "test_accuracy": acc, "sparse_file_bytes": file_bytes,
              "convert_seconds": convert_s, "layers": report.to_markdown(),
              "linear_only_layers": linear_report.to_markdown(),
              "sparse_convs": [n for n, m in full.named_modules() if isinstance(m, SparseConv1d | SparseConv2d)],
              "sparse_linears": [n for n, m in full.named_modules() if isinstance(m, SparseLinear)]}
    for label, x in (("batch1", one), ("batch256", batch)):
        fns = {name: (lambda m=m, x=x: m(x)) for name, m in models.items() if name != "reloaded"}
        for condition in ("quiet", "busy"):
            result[f"{label}_{condition}"] = timed(fns, condition, budget)
            s = result[f"{label}_{condition}"]["speedup"]
            print(f"CNN {label} {condition}: Linear only {s['linear_only']:.2f}x, with convs {s['with_convs']:.2f}x",
                  flush=True)
    return result


def to_markdown(payload: dict) -> str:
    layer_intro = ["Single convolution layers, fp32, random sparsity. Speed-up = median(dense) / median(candidate) "
             "in the same condition, interleaved. 'sparse': `SparseConv*d` (one kernel call per image, no im2col); "
             "'im2col, one call': an im2col copy of the whole batch and one kernel call over batch x positions "
             "columns, then the transpose back to NCHW (timed against dense in rounds of its own); 'converted': what "
             "`convert` chose on the quiet machine for that batch. 'busy': one competing process multiplying "
             "512x512 matrices on one thread.\n",
             "| layer | sparsity | batch | condition | load avg before | dense ms | sparse | im2col, one call | "
             "converted |", "|---|---|---|---|---|---|---|---|---|"]
    lines = layer_intro if payload["layers"] else []
    for r in payload["layers"]:
        for condition in ("quiet", "busy"):
            c = r[condition]
            s = c["speedup"]
            lines.append(f"| {r['layer']} | {r['sparsity']} | {r['batch']} | {condition} | "
                         f"{c['load_average_before'][0]} | {c['ms']['dense']:.3f} | {s['sparse']:.2f}x | "
                         f"{s['im2col_one_call']:.2f}x | {s['converted']:.2f}x ({r['converted_kept']}) |")
    cnn = payload.get("cnn")
    if cnn:
        a = cnn["test_accuracy"]
        lines += [f"Fashion-MNIST CNN (conv32-conv64-fc1024-fc10, {cnn['achieved_sparsity']:.1%} zeros, trained as "
                  "in runtime_end_to_end.py). 'Linear only': `convert` keeping every convolution dense (what it did "
                  "before sparse convolutions); 'with convs': `convert` now. Speed-up over the dense model "
                  "(median / median, interleaved).\n",
                  f"Test accuracy: dense {a['dense']:.4f}, Linear only {a['linear_only']:.4f}, with convs "
                  f"{a['with_convs']:.4f}, reloaded from the sparse file {a['reloaded']:.4f}. Sparse layers: convs "
                  f"{cnn['sparse_convs']}, Linear {cnn['sparse_linears']}. convert took "
                  f"{cnn['convert_seconds']:.1f} s; sparse file {cnn['sparse_file_bytes']} bytes.\n",
                  "| input | condition | load avg before | dense ms | Linear only | with convs |",
                  "|---|---|---|---|---|---|"]
        for label in ("batch1", "batch256"):
            for condition in ("quiet", "busy"):
                c = cnn[f"{label}_{condition}"]
                lines.append(f"| {label} | {condition} | {c['load_average_before'][0]} | {c['ms']['dense']:.3f} | "
                             f"{c['speedup']['linear_only']:.2f}x | {c['speedup']['with_convs']:.2f}x |")
        lines += ["", "Layer decisions of `convert` (with convs):", "", cnn["layers"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=1.5, help="seconds of timing per point and condition")
    parser.add_argument("--part", choices=("layers", "cnn", "all"), default="all",
                        help="single layers (results: runtime_conv_layers), the CNN end to end (runtime_conv_cnn)")
    parser.add_argument("--train-only", action="store_true", help="train and cache the CNN, time nothing")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.train_only:
        trained_cnn(load_dataset("fashion-mnist"))
        return
    for part in ("layers", "cnn") if args.part == "all" else (args.part,):
        info = machine()
        info.update(torch_threads=args.threads, kernel_backend=kernels.get_backend().name,
                    budget_s_per_point=args.budget)
        if part == "layers":
            payload = {"machine": info, "layers": measure_layers(args.budget)}
        else:
            payload = {"machine": info, "layers": [], "cnn": measure_cnn(load_dataset("fashion-mnist"), args.budget)}
        write_results(f"runtime_conv_{part}", payload, to_markdown(payload))


if __name__ == "__main__":
    main()
