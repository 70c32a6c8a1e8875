"""Hugging Face model directories in and out: load a pretrained model offline, prune it, save a copy.

The source directory is only read. The output directory gets the source's auxiliary files (tokenizer,
sentence-transformers pooling config, README, ...) and then the pruned weights via ``save_pretrained``, so
it loads with plain ``transformers`` (and with sentence-transformers where the source did).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import transformers
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel

from sparsearch.oneshot.calibration import calibration_windows
from sparsearch.oneshot.config import OneShotConfig
from sparsearch.oneshot.report import LayerReport, PruneReport
from sparsearch.oneshot.sequential import check_pattern_fits, prune_model

REPORT_NAME = "sparsearch_prune_report.json"
DEFAULT_SEQUENCE_LENGTH = 128
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")
_WEIGHT_INDEXES = (".safetensors.index.json", ".bin.index.json")


def load_pretrained(model_dir: str | Path) -> tuple[PreTrainedModel, Any]:
    """Load a model (with the class its config names, e.g. GPT2LMHeadModel) and its tokenizer, offline."""
    path = Path(model_dir)
    if not path.exists():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"model directory {str(path)!r} is a file; give a transformers model directory")
    if not (path / "config.json").is_file():
        raise ValueError(
            f"{str(path)!r} is not a transformers model directory: it has no config.json "
            "(expected what save_pretrained writes)"
        )
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{str(path)!r} is not a usable transformers model directory: {error}") from error
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        model_class = AutoModel
    try:
        model = model_class.from_pretrained(path, config=config, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"could not load the model and tokenizer in {str(path)!r}: {error}") from error
    return model, tokenizer


def _check_output_dir(source: Path, out: Path, overwrite: bool) -> None:
    source, resolved = source.resolve(), out.resolve()
    if resolved == source or source in resolved.parents:
        raise ValueError(
            f"output directory {str(out)!r} is (inside) the source model directory {str(source)!r}; the "
            "source is never modified: choose a directory outside it"
        )
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output path {str(out)!r} is a file; give a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(
            f"output directory {str(out)!r} is not empty; choose a new or empty directory (or allow overwrite)"
        )


def _copy_auxiliary_files(source: Path, out: Path) -> None:
    for item in source.iterdir():
        if item.name.endswith(_WEIGHT_SUFFIXES + _WEIGHT_INDEXES) or item.name.startswith("."):
            continue
        if item.is_dir():
            shutil.copytree(item, out / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, out / item.name)


def max_sequence_length(model: PreTrainedModel) -> int | None:
    """The longest input the model's position embeddings allow, if the config says."""
    config = model.config
    for attribute in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def prune_pretrained(
    model_dir: str | Path,
    out_dir: str | Path,
    config: OneShotConfig,
    texts: list[str],
    n_tokens: int = 8192,
    seq_len: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    overwrite: bool = False,
    report_path: str | Path | None = None,
    on_layer: Callable[[LayerReport], None] | None = None,
) -> PruneReport:
    """Load ``model_dir``, prune a copy in memory on calibration ``texts``, save it to ``out_dir``.

    Calibration uses windows of ``seq_len`` tokens (default: 128, or the model's maximum if shorter).
    Returns the report, which is also written as JSON to ``report_path`` (default: ``out_dir`` /
    sparsearch_prune_report.json).
    """
    source, out = Path(model_dir), Path(out_dir)
    model, tokenizer = load_pretrained(source)
    _check_output_dir(source, out, overwrite)
    limit = max_sequence_length(model)
    if seq_len is None:
        seq_len = min(DEFAULT_SEQUENCE_LENGTH, limit or DEFAULT_SEQUENCE_LENGTH)
    if limit is not None and seq_len > limit:
        raise ValueError(f"calibration sequence length {seq_len} exceeds the model's maximum of {limit} positions")
    check_pattern_fits(model, config)
    windows = calibration_windows(tokenizer, texts, n_tokens=n_tokens, seq_len=seq_len, seed=seed)
    report = prune_model(model, windows, config, batch_size=batch_size, on_layer=on_layer)
    out.mkdir(parents=True, exist_ok=True)
    _copy_auxiliary_files(source, out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    destination = Path(report_path) if report_path is not None else out / REPORT_NAME
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_text(report.model_dump_json(indent=2))
    return report
