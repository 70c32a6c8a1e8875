"""SPDF on a small GPT-2: sparse (75%) vs dense pre-training on Python docstrings, then dense fine-tuning on a
different local text (the licence texts in /usr/share/common-licenses). Perplexity on held-out text and training
FLOPs (6 x non-zero matmul weights per token: attention scores and the embedding lookup are left out).

Sized for an overloaded 2-core machine: 2 layers x 128, context 64, batch 8, 1 torch thread, --pretrain-steps
and --finetune-steps (defaults 300 and 150), AdamW lr 2e-3 then 5e-4.

    python benchmarks/spdf_gpt.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from oneshot_corpus import stdlib_docstrings
from oneshot_train_gpt import token_stream, train_tokenizer
from transformers import GPT2Config, GPT2LMHeadModel

import sparsearch as sa

RESULTS = Path(__file__).parent / "results"
LICENSES = Path("/usr/share/common-licenses")
MATMULS = r"\.(c_attn|c_proj|c_fc)\.weight$"
CONTEXT, BATCH = 64, 8


def batches(stream: torch.Tensor, steps: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        offsets = torch.randint(0, len(stream) - CONTEXT - 1, (BATCH,), generator=generator).tolist()
        yield torch.stack([stream[o : o + CONTEXT] for o in offsets])


@torch.no_grad()
def perplexity(model, stream: torch.Tensor) -> float:
    model.eval()
    usable = len(stream) // CONTEXT * CONTEXT
    windows = stream[:usable].reshape(-1, CONTEXT)[:128]
    loss = sum(model(input_ids=w, labels=w).loss.item() for w in windows.split(32)) / math.ceil(len(windows) / 32)
    model.train()
    return math.exp(loss)


def matmul_weights(model) -> int:
    return sum(int((p != 0).sum()) for n, p in model.named_parameters()
               if n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))) + model.lm_head.weight.numel()


def train(model, stream, steps, lr, seed) -> int:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, fused=True)
    flops = 0
    for batch in batches(stream, steps, seed):
        model(input_ids=batch, labels=batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        flops += 6 * matmul_weights(model) * batch.numel()
    return flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--finetune-steps", type=int, default=150)
    parser.add_argument("--sparsity", type=float, default=0.75)
    args = parser.parse_args()
    torch.set_num_threads(1)
    meta = {"machine": f"{platform.machine()} ({os.cpu_count()} cores)", "torch": torch.__version__,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "load_average_start": [round(v, 2) for v in os.getloadavg()], **vars(args)}
    train_docs, held_docs = stdlib_docstrings()
    tokenizer = train_tokenizer(train_docs)
    pre_train, pre_held = token_stream(tokenizer, train_docs), token_stream(tokenizer, held_docs)
    legal = token_stream(tokenizer, [p.read_text(errors="replace") for p in sorted(LICENSES.iterdir()) if p.is_file()])
    split = int(0.85 * len(legal))
    fine_train, fine_held = legal[:split], legal[split:]
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=CONTEXT, n_embd=128, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    rows = []
    for name in ("dense pre-training", f"sparse pre-training ({args.sparsity:.0%})", "no pre-training"):
        started = time.perf_counter()
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)
        pretrain_flops = 0
        if name != "no pre-training":
            sparsity = args.sparsity if name.startswith("sparse") else None
            pretrain_flops = pretrain(model, pre_train, args.pretrain_steps, sparsity)
        pre_ppl = perplexity(model, pre_held)
        zero_shot = perplexity(model, fine_held)
        finetune_flops = train(model, fine_train, args.finetune_steps, 5e-4, seed=1)
        rows.append({"run": name, "pretrain_flops": pretrain_flops, "finetune_flops": finetune_flops,
                     "pretrain_held_out_perplexity": pre_ppl, "downstream_before_finetune": zero_shot,
                     "downstream_perplexity": perplexity(model, fine_held), "seconds": time.perf_counter() - started})
        print(json.dumps(rows[-1]), flush=True)
    meta["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "spdf_gpt.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    dense = rows[0]["pretrain_flops"]
    lines = ["# SPDF on a small GPT-2", "", f"{meta['machine']}, torch {meta['torch']}, 1 thread; {meta['date']}; "
             f"load average {meta['load_average_start']} at start, {meta['load_average_end']} at the end. "
             f"{args.pretrain_steps} pre-training and {args.finetune_steps} fine-tuning steps of {BATCH}x{CONTEXT} "
             "tokens. Produced by `python benchmarks/spdf_gpt.py`.", "",
             "| run | pre-training FLOPs vs dense | docstring perplexity after pre-training | licence-text "
             "perplexity before / after dense fine-tuning |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['run']} | {row['pretrain_flops'] / dense:.2f} | "
                     f"{row['pretrain_held_out_perplexity']:.1f} | {row['downstream_before_finetune']:.1f} / "
                     f"{row['downstream_perplexity']:.1f} |")
    (RESULTS / "spdf_gpt.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def pretrain(model, stream, steps: int, sparsity: float | None) -> int:
    """Pre-train (sparse with SPDF if ``sparsity``), lift the mask, return the training FLOPs."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01, fused=True)
    spdf = sa.SPDF(sparsity, include=MATMULS, seed=0) if sparsity is not None else None
    if spdf is not None:
        spdf.pretrain(model, optimizer)
    flops = 0
    for batch in batches(stream, steps, seed=0):
        model(input_ids=batch, labels=batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        flops += 6 * matmul_weights(model) * batch.numel()
    if spdf is not None:
        spdf.finetune()
    return flops


if __name__ == "__main__":
    main()
