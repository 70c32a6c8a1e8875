"""Side by side: llm-compressor's Wanda and SparseGPT vs sparsearch's, same GPT model, sparsity and calibration.

llm-compressor pins an older transformers, so it runs in its own virtual environment; three steps:

1. ``python benchmarks/oneshot_llmcompressor.py export`` (sparsearch venv): write the calibration windows that
   ``oneshot_quality.py`` uses to ``benchmarks/out/llmc/calibration.json``.
2. ``/tmp/llmc/bin/python benchmarks/oneshot_llmcompressor.py prune`` (venv with ``llmcompressor``): prune the
   GPT model with llm-compressor's modifiers, one output directory per run under ``benchmarks/out/llmc``.
3. ``python benchmarks/oneshot_llmcompressor.py compare`` (sparsearch venv): held-out perplexity and sparsity
   of those models next to sparsearch's numbers from ``results/oneshot_quality.json``; writes
   ``results/oneshot_llmcompressor.{json,md}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).parent
GPT_DIR = HERE / "out" / "oneshot_gpt"
WORK = HERE / "out" / "llmc"
RUNS = [("wanda", {"sparsity": 0.5}), ("wanda", {"sparsity": 0.7}), ("wanda", {"pattern": "2:4"}),
        ("sparsegpt", {"sparsity": 0.5}), ("sparsegpt", {"sparsity": 0.7}), ("sparsegpt", {"pattern": "2:4"})]


def run_name(method: str, setting: dict) -> str:
    return f"{method}_{setting.get('pattern', setting.get('sparsity'))}".replace(":", "of")


def setting_label(setting: dict) -> str:
    return setting.get("pattern") or f"{setting['sparsity']:.0%}"


def export() -> None:
    from oneshot_corpus import stdlib_docstrings
    from oneshot_quality import CALIBRATION_TOKENS, SEQ_LEN

    from sparsearch.oneshot import calibration_windows, load_pretrained

    train_docs, _ = stdlib_docstrings()
    _, tokenizer = load_pretrained(GPT_DIR)
    windows = calibration_windows(tokenizer, train_docs, n_tokens=CALIBRATION_TOKENS, seq_len=SEQ_LEN, seed=0)
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "calibration.json").write_text(json.dumps(windows.tolist()))


def swap_conv1d(model, to_linear: bool, originals: dict | None = None) -> dict:
    """llm-compressor 0.14 prunes only Linear/Conv1d/Conv2d/Conv3d inside its targets, not GPT-2's
    transformers Conv1D; run it on equivalent nn.Linear layers and copy the result back."""
    import torch
    from transformers.pytorch_utils import Conv1D

    swapped = {}
    for name, module in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if to_linear and isinstance(module, Conv1D):
            linear = torch.nn.Linear(module.weight.shape[0], module.weight.shape[1])
            linear.weight.data.copy_(module.weight.data.T)
            linear.bias.data.copy_(module.bias.data)
            setattr(parent, child, linear)
            swapped[name] = module
        elif not to_linear and originals and name in originals:
            conv = originals[name]
            conv.weight.data.copy_(module.weight.data.T)
            conv.bias.data.copy_(module.bias.data)
            setattr(parent, child, conv)
    return swapped


def prune() -> None:
    import llmcompressor
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    windows = json.loads((WORK / "calibration.json").read_text())
    dataset = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
    timings = {}
    for method, setting in RUNS:
        model = AutoModelForCausalLM.from_pretrained(GPT_DIR)
        tokenizer = AutoTokenizer.from_pretrained(GPT_DIR)
        modifier_class = WandaPruningModifier if method == "wanda" else SparseGPTModifier
        pattern = setting.get("pattern")
        modifier = modifier_class(
            sparsity=0.5 if pattern else setting["sparsity"], mask_structure=pattern or "0:0",
            targets=["GPT2Block"],
        )
        conv_layers = swap_conv1d(model, to_linear=True)
        start = time.perf_counter()
        oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=modifier,
                num_calibration_samples=len(windows), max_seq_length=len(windows[0]),
                sequential_targets=["GPT2Block"])
        timings[run_name(method, setting)] = time.perf_counter() - start
        swap_conv1d(model, to_linear=False, originals=conv_layers)
        model.save_pretrained(WORK / run_name(method, setting))
        tokenizer.save_pretrained(WORK / run_name(method, setting))
    (WORK / "timings.json").write_text(json.dumps({"llmcompressor": llmcompressor.__version__, "seconds": timings}))


def compare() -> None:
    import torch
    from oneshot_corpus import stdlib_docstrings
    from oneshot_quality import held_out_windows, perplexity

    from sparsearch.oneshot import find_blocks, load_pretrained
    from sparsearch.oneshot.sequential import prunable_layers, weight_matrix

    torch.set_num_threads(1)
    _, held_docs = stdlib_docstrings()
    ours = json.loads((HERE / "results" / "oneshot_quality.json").read_text())["gpt"]
    timings = json.loads((WORK / "timings.json").read_text())
    rows = []
    for method, setting in RUNS:
        model, tokenizer = load_pretrained(WORK / run_name(method, setting))
        _, blocks = find_blocks(model)
        weights = [weight_matrix(layer) for block in blocks for _, layer in prunable_layers(block)]
        zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
        evaluation = held_out_windows(tokenizer, held_docs)
        mine = next(r for r in ours["rows"] if r["method"] == method and r["setting"] == setting_label(setting))
        rows.append({
            "method": method, "setting": setting_label(setting),
            "llmcompressor_perplexity": perplexity(model, evaluation), "llmcompressor_sparsity": zeros,
            "llmcompressor_seconds": timings["seconds"][run_name(method, setting)],
            "sparsearch_perplexity": mine["perplexity"], "sparsearch_sparsity": mine["actual_sparsity"],
            "sparsearch_seconds": mine["prune_seconds"],
        })
    result = {"llmcompressor": timings["llmcompressor"], "dense_perplexity": ours["dense"]["perplexity"],
              "date": datetime.now(UTC).isoformat(timespec="seconds"), "rows": rows}
    (HERE / "results" / "oneshot_llmcompressor.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# llm-compressor {timings['llmcompressor']} vs sparsearch: GPT-2 (4 x 192), held-out perplexity",
        "",
        f"Same model, sparsity and {ours['calibration_tokens']} calibration tokens; dense perplexity "
        f"{ours['dense']['perplexity']:.2f}. {result['date']}, 2-core x86_64 shared with other jobs, 1 torch "
        "thread. Produced by `benchmarks/oneshot_llmcompressor.py` (export, prune, compare); llm-compressor ran in "
        "its own venv (it pins transformers <= 5.17). llm-compressor 0.14 silently skips GPT-2's transformers "
        "Conv1D layers (sparsity 0 when targeted directly), so its runs use equivalent nn.Linear layers, copied "
        "back before saving. Times include llm-compressor's pipeline set-up.",
        "",
        "| method | setting | llm-compressor ppl | sparsearch ppl | llm-compressor sparsity | sparsearch sparsity "
        "| llm-compressor s | sparsearch s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['method']} | {r['setting']} | {r['llmcompressor_perplexity']:.2f} | {r['sparsearch_perplexity']:.2f} "
        f"| {r['llmcompressor_sparsity']:.3f} | {r['sparsearch_sparsity']:.3f} | {r['llmcompressor_seconds']:.1f} "
        f"| {r['sparsearch_seconds']:.1f} |"
        for r in rows
    ]
    (HERE / "results" / "oneshot_llmcompressor.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    {"export": export, "prune": prune, "compare": compare}[sys.argv[1] if len(sys.argv) > 1 else "compare"]()
