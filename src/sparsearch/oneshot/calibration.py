"""Calibration data for one-shot pruning: text in, fixed-length token windows out, within a token budget.

All texts are tokenized, joined into one stream (separated by the tokenizer's end/separator token) and cut
into non-overlapping windows; ``ceil(n_tokens / seq_len)`` of them are drawn at random with ``seed``. The
tokenizer's own special tokens (BERT's [CLS]/[SEP]) are added to every window and count toward its length.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def read_calibration_file(path: str | Path) -> list[str]:
    """Read a UTF-8 text file of calibration text (one document)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {str(path)!r} does not exist or is not a file")
    return [path.read_text(encoding="utf-8", errors="replace")]


def _special_token_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one sequence (e.g. BERT's [CLS] and [SEP])."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    framed = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(framed) - len(plain) + 1):
        if framed[start : start + len(plain)] == plain:
            return framed[:start], framed[start + len(plain) :]
    return [], []


def calibration_windows(tokenizer: Any, texts: list[str], n_tokens: int, seq_len: int, seed: int = 0) -> Tensor:
    """Token windows ``[n_windows, seq_len]`` drawn at random from ``texts``, covering at least ``n_tokens``."""
    if n_tokens < 1:
        raise ValueError(f"calibration token budget {n_tokens} must be at least 1")
    prefix, suffix = _special_token_frame(tokenizer)
    special = len(prefix) + len(suffix)
    content_length = seq_len - special
    if content_length < 1:
        raise ValueError(
            f"calibration sequence length {seq_len} leaves no room for text next to the tokenizer's "
            f"{special} special tokens; use a length above {special}"
        )
    non_empty = [text for text in texts if text.strip()]
    if not non_empty:
        raise ValueError("calibration data is empty: give a text file or strings with some text in them")
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    stream: list[int] = []
    for text in non_empty:
        stream.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if separator is not None:
            stream.append(separator)
    available_windows = len(stream) // content_length
    wanted_windows = math.ceil(n_tokens / seq_len)
    if wanted_windows > available_windows:
        raise ValueError(
            f"{n_tokens} calibration tokens were asked for, but the calibration data holds {len(stream)} "
            f"tokens, i.e. {available_windows} windows of {seq_len}; ask for at most "
            f"{available_windows * seq_len} tokens, a shorter sequence length, or give more text"
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(available_windows, generator=generator)[:wanted_windows].tolist()
    windows = [prefix + stream[start * content_length : (start + 1) * content_length] + suffix for start in chosen]
    return torch.tensor(windows, dtype=torch.long)
