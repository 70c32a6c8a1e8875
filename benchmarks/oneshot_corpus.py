"""Offline English text for the one-shot pruning benchmarks: the docstrings of Python's standard library.

Every Python installation ships the same text, so the corpus needs no download. Docstrings are read with
``ast`` (nothing is imported) from the standard library's ``.py`` files, and each file is assigned to the
train or held-out split by a hash of its relative path, so calibration/training text and evaluation text
never come from the same file.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sysconfig
from pathlib import Path

SKIPPED_DIRECTORIES = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "__pycache__"}
HELD_OUT_PERCENT = 15


def _docstrings(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef))]
    texts = (ast.get_docstring(node) for node in nodes)
    return [text.strip() for text in texts if text and len(text.strip()) > 40]


def _is_held_out(relative_path: str) -> bool:
    digest = hashlib.sha256(relative_path.encode()).digest()
    return digest[0] * 100 // 256 < HELD_OUT_PERCENT


def stdlib_docstrings() -> tuple[list[str], list[str]]:
    """Return (train, held_out) lists of docstrings from the standard library, split by source file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train: list[str] = []
    held_out: list[str] = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if SKIPPED_DIRECTORIES.intersection(relative.split("/")):
            continue
        texts = _docstrings(path.read_text(encoding="utf-8", errors="replace"))
        (held_out if _is_held_out(relative) else train).extend(texts)
    return train, held_out


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PROSE = re.compile(r"^[A-Z][A-Za-z ,;:'()\-]+[.!?]$")


def sentences(docstrings: list[str], min_words: int = 6, max_words: int = 40) -> list[str]:
    """Prose sentences (no code, no tables) from docstrings, deduplicated, in first-seen order."""
    seen: dict[str, None] = {}
    for doc in docstrings:
        paragraph_text = " ".join(doc.split())
        for sentence in _SENTENCE_END.split(paragraph_text):
            words = sentence.split()
            if min_words <= len(words) <= max_words and _PROSE.match(sentence):
                seen.setdefault(sentence, None)
    return list(seen)


if __name__ == "__main__":
    train_docs, held_docs = stdlib_docstrings()
    print(f"train docstrings {len(train_docs)} ({sum(map(len, train_docs))} chars), "
          f"held-out {len(held_docs)} ({sum(map(len, held_docs))} chars)")
    print(f"sentences: train {len(sentences(train_docs))}, held-out {len(sentences(held_docs))}")
