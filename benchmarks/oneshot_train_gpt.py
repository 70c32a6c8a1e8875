"""Train the small GPT-2 used by the one-shot pruning benchmark, on Python's standard-library docstrings.

Offline and CPU-only: a byte-level BPE tokenizer (``tokenizers``) and a 4-layer, 192-wide GPT-2 are trained
from scratch on the train split of ``oneshot_corpus`` and saved, with the tokenizer, as an ordinary
``transformers`` model directory under ``benchmarks/out/oneshot_gpt`` (not committed; re-created by this
script). Run: ``python benchmarks/oneshot_train_gpt.py [--steps N]``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from oneshot_corpus import stdlib_docstrings
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

MODEL_DIR = Path(__file__).parent / "out" / "oneshot_gpt"
VOCAB_SIZE = 2048
CONTEXT = 128
END_OF_TEXT = "<|endoftext|>"


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=END_OF_TEXT, bos_token=END_OF_TEXT, unk_token=END_OF_TEXT,
        model_max_length=CONTEXT,
    )


def token_stream(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def train(steps: int, batch_size: int, seed: int) -> dict:
    torch.manual_seed(seed)
    # One thread: the 2-core machine is shared, and oversubscribed threads make small matmuls crawl.
    torch.set_num_threads(1)
    train_docs, _ = stdlib_docstrings()
    tokenizer = train_tokenizer(train_docs)
    stream = token_stream(tokenizer, train_docs)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=CONTEXT, n_embd=192, n_layer=4, n_head=4,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)

    def learning_rate_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        offsets = torch.randint(0, len(stream) - CONTEXT - 1, (batch_size,), generator=generator)
        batch = torch.stack([stream[o : o + CONTEXT] for o in offsets.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    seconds = time.perf_counter() - start
    model.eval()
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(MODEL_DIR)
    tokenizer.save_pretrained(MODEL_DIR)
    info = {
        "steps": steps, "batch_size": batch_size, "context": CONTEXT, "seed": seed,
        "train_tokens_seen": steps * batch_size * CONTEXT, "train_stream_tokens": len(stream),
        "final_train_loss": round(loss.item(), 4), "train_seconds": round(seconds, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (MODEL_DIR / "training_info.json").write_text(json.dumps(info, indent=2))
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(train(args.steps, args.batch_size, args.seed), indent=2))


if __name__ == "__main__":
    main()
