"""Transformers models end to end: a pruned model directory (or model) in, a model with sparse kernels out.

`convert_transformers` loads a transformers model (for example a `sparsearch prune` output directory), checks
that it has zeros to use, and converts it with `convert`: every `nn.Linear` and GPT-2 `Conv1D` the model calls
as a module (attention projections included) is timed dense against sparse at token counts typical of its use
and goes sparse where faster; the output of the converted model is checked against the original on a tokenized
sample. `save_transformers` writes a directory with the config, tokenizer files and one sparse safetensors
file; `load_transformers` builds the model from the config and fills it from that file, so the result runs in
transformers (forward, `generate`) like the original.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsearch.kernels.modules import linear_like
from sparsearch.runtime.convert import ConversionReport, convert_with_report
from sparsearch.runtime.storage import load_sparse, save_sparse

SPARSE_WEIGHTS_NAME = "model.sparse.safetensors"
REPORT_NAME = "sparsearch_convert_report.md"
SAMPLE_TEXT = "Sparse weights skip the multiplications by zero, so a pruned model can run faster on a CPU."
# Token counts the layers of a transformer see: one sentence or one generated token per sequence (1 to 16),
# and a batch of sentences (128)
DEFAULT_BATCH_SIZES = (1, 16, 128)
_COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json", "spiece.model",
                 "tokenizer.model")


def zero_fraction(model: nn.Module) -> tuple[float, int]:
    """(fraction of zeros over the weights `SparseLinear` could take, number of such layers)."""
    zeros = total = layers = 0
    for module in model.modules():
        view = linear_like(module)
        if view is not None:
            weight = view[1]
            zeros += int((weight == 0).sum())
            total += weight.numel()
            layers += 1
    return (zeros / total if total else 0.0), layers


def sample_inputs(model: nn.Module, tokenizer: Any = None, batch: int = 1) -> dict[str, torch.Tensor]:
    """The default sample for `convert`'s output check and whole-model timings: `SAMPLE_TEXT` with the tokenizer,
    else 16 token ids; for a decoder-only model that generates, only the first token of each sequence, since
    generation runs one token per step and the timings must represent that (on a 6 x 768 GPT-2 at 70%, the
    16-token sample kept 5 layers sparse that lose at one token, and the model generated at 0.93x of dense)."""
    encoded = None
    if tokenizer is not None:
        if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
            tokenizer.pad_token = tokenizer.eos_token
        encoded = dict(tokenizer([SAMPLE_TEXT] * batch, return_tensors="pt", padding=True))
    if encoded is None or not encoded["input_ids"].numel():
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 100)
        encoded = {"input_ids": (torch.arange(16 * batch) % vocab).reshape(batch, 16)}
    if _generates_token_by_token(model):
        encoded = {name: tensor[:, :1] for name, tensor in encoded.items()}
    return encoded


def _generates_token_by_token(model: nn.Module) -> bool:
    can_generate = getattr(model, "can_generate", None)
    config = getattr(model, "config", None)
    return (callable(can_generate) and bool(can_generate())
            and not getattr(config, "is_encoder_decoder", False))


def _model_class(config: Any) -> Any:
    import transformers

    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    return model_class or transformers.AutoModel


def load_model_dir(path: str | Path) -> tuple[nn.Module, Any]:
    """(model, tokenizer or None) from a transformers model directory, offline; ValueError if it is not one."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"model directory {str(path)!r} does not exist or is not a directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"{str(path)!r} is not a transformers model directory: it has no config.json "
                         "(expected what save_pretrained or `sparsearch prune` writes)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        model = _model_class(config).from_pretrained(path, config=config, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"could not load the transformers model in {str(path)!r}: {error}") from error
    tokenizer = None  # without one, the sample input is token ids
    if any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, TypeError):
            tokenizer = None
    return model, tokenizer


def convert_transformers(model_or_path: nn.Module | str | Path, *, tokenizer: Any = None,
                         sample_input: dict[str, torch.Tensor] | None = None,
                         batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, min_speedup: float = 1.05,
                         max_density: float = 0.7, repeats: int = 5, tolerance: float | None = None,
                         int8: bool = False, int8_activation_bits: int | str = "auto", fuse_activations: bool = True
                         ) -> tuple[nn.Module, Any, ConversionReport]:
    """(converted model, tokenizer, report) for a transformers model or model directory with zeros in its weights.

    `sample_input` (the tokenizer's tensors) is what the outputs are checked and the whole model timed on; the
    default (`sample_inputs`) is a sentence, or one token per sequence for a decoder that generates: pass your own
    for another use (a decoder serving long prompts, say). `int8=True` stores the sparse layers' values as int8
    with a scale per segment, and `int8_activation_bits` sets how their one-row inputs are quantised (see
    `convert`); `fuse_activations`: the feed-forward GELU computed by the sparse layer before it (see `convert`).
    Raises ValueError for a directory that is not a transformers model
    and for a model whose Linear/Conv1D weights have no layer at or below `max_density` (nothing to gain: prune it
    first, e.g. `sparsearch prune`).
    """
    if isinstance(model_or_path, str | Path):
        model, loaded_tokenizer = load_model_dir(model_or_path)
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
    elif isinstance(model_or_path, nn.Module):
        model = model_or_path
    else:
        raise TypeError(f"expected a transformers model or a model directory, got {type(model_or_path).__name__}")
    zeros, layers = zero_fraction(model)
    if layers == 0:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv1D layers for the sparse kernels")
    densest_allowed = [m for m in model.modules() if linear_like(m) is not None
                       and float((linear_like(m)[1] != 0).float().mean()) <= max_density]
    if not densest_allowed:
        raise ValueError(f"no Linear/Conv1D layer of {type(model).__name__} has density <= max_density "
                         f"{max_density} (zeros overall: {zeros:.1%}): nothing to convert; prune the model first "
                         "(e.g. `sparsearch prune`)")
    model.eval()
    sample = sample_input if sample_input is not None else sample_inputs(model, tokenizer)
    converted, report = convert_with_report(model, sample, batch_sizes=tuple(batch_sizes), min_speedup=min_speedup,
                                            max_density=max_density, repeats=repeats, tolerance=tolerance,
                                            int8=int8, int8_activation_bits=int8_activation_bits,
                                            fuse_activations=fuse_activations)
    return converted, tokenizer, report


def check_output_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output {str(out)!r} exists and is not an empty directory; choose a new or empty directory")


def save_transformers(model: nn.Module, out_dir: str | Path, *, source_dir: str | Path | None = None,
                      tokenizer: Any = None, report: ConversionReport | None = None) -> int:
    """Write a converted model as a directory `load_transformers` reads; returns the sparse file's size in bytes.

    The config (and tokenizer) come from `model.config` / `tokenizer`, or are copied from `source_dir`."""
    out = Path(out_dir)
    check_output_dir(out)
    config = getattr(model, "config", None)
    if config is None and source_dir is None:
        raise ValueError("the model has no transformers config; pass source_dir (the original model directory)")
    out.mkdir(parents=True, exist_ok=True)
    if source_dir is not None:
        for name in _COPIED_FILES:
            if (Path(source_dir) / name).is_file():
                shutil.copy2(Path(source_dir) / name, out / name)
    if config is not None:
        if not getattr(config, "architectures", None):  # what save_pretrained records: the class to rebuild
            config.architectures = [type(model).__name__]
        config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    size = save_sparse(model, out / SPARSE_WEIGHTS_NAME)
    if report is not None:
        (out / REPORT_NAME).write_text(report.to_markdown() + "\n")
    return size


def load_transformers(model_dir: str | Path) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a directory written by `save_transformers` (or the CLI's `convert`)."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(model_dir)
    if not (path / SPARSE_WEIGHTS_NAME).is_file() or not (path / "config.json").is_file():
        raise ValueError(f"{str(path)!r} is not a converted sparse transformers directory: it needs config.json "
                         f"and {SPARSE_WEIGHTS_NAME}")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    model_class = _model_class(config)
    model = model_class.from_config(config) if hasattr(model_class, "from_config") else model_class(config)
    model = load_sparse(path / SPARSE_WEIGHTS_NAME, model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model, tokenizer


__all__ = ["check_output_dir", "convert_transformers", "load_model_dir", "load_transformers", "sample_inputs",
           "save_transformers", "zero_fraction"]
