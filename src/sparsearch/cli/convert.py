"""The `sparsearch convert` command (registered on the app in `sparsearch.cli`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sparsearch.cli.errors import user_errors
from sparsearch.runtime.convert import convert_file
from sparsearch.runtime.hf import check_output_dir, convert_transformers, save_transformers

console = Console()


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--batch-sizes must be comma-separated positive integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--batch-sizes must be comma-separated positive integers, got {text!r}")
    return sizes


def convert_command(
    model_file: Annotated[Path, typer.Argument(help="safetensors state dict, sparsearch checkpoint, or a "
                                                    "transformers model directory (e.g. from `sparsearch prune`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Sparse safetensors file to write (for a model "
                                                           "directory: a new directory).")],
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes to time, comma-separated.")] = "1,64,256",
    min_speedup: Annotated[float, typer.Option(help="Sparse must beat dense by this factor at every batch size.")]
    = 1.05,
    max_density: Annotated[float, typer.Option(help="Layers denser than this stay dense without timing.")] = 0.7,
    int8: Annotated[bool, typer.Option("--int8", help="Sparse values as int8 with a scale per segment (a row "
                                                      "within a column panel; transformers directories).")] = False,
    int8_activation_bits: Annotated[str, typer.Option(
        help="With --int8: bits of each one-row input (a decoder's generation step) in the int8 kernel: auto (8 "
             "unless that moves the input by more than 2% of its norm, then 16), 8 (W8A8: fastest, least exact) "
             "or 16.")] = "auto",
    fuse_activations: Annotated[bool, typer.Option(
        help="Transformers directories: compute each feed-forward GELU in the sparse layer before it (checked on "
             "the sample; the report lists them).")] = True,
) -> None:
    """Make a pruned model run on sparse kernels where they are measured faster on this CPU.

    A safetensors file gives a sparse safetensors file (load it with `sparsearch.runtime.load_sparse`); a
    transformers model directory gives a directory that `sparsearch.runtime.load_transformers` loads, with
    outputs checked against the original."""
    with user_errors():
        sizes = _batch_sizes(batch_sizes)
        bits = int(int8_activation_bits) if int8_activation_bits.isdigit() else int8_activation_bits
        if model_file.is_dir():
            check_output_dir(out)
            with console.status(f"timing dense vs sparse layers of {model_file}"):
                model, tokenizer, report = convert_transformers(model_file, batch_sizes=sizes, min_speedup=min_speedup,
                                                                max_density=max_density, int8=int8,
                                                                int8_activation_bits=bits,
                                                                fuse_activations=fuse_activations)
            size = save_transformers(model, out, source_dir=model_file, tokenizer=tokenizer, report=report)
        else:
            if int8 or bits != "auto":
                given = "--int8" if int8 else f"--int8-activation-bits {int8_activation_bits}"
                raise ValueError(f"{given}: --int8 and --int8-activation-bits are for transformers model "
                                 "directories; a state dict file has no model to check the int8 outputs against")
            with console.status(f"timing dense vs sparse layers of {model_file}"):
                report, size = convert_file(model_file, out, batch_sizes=sizes, min_speedup=min_speedup,
                                            max_density=max_density)
    title = f"{out}: {size:,} bytes, {len(report.sparse_layers)} of {len(report.layers)} 2-D weights "
    title += "run sparse" if model_file.is_dir() else "stored sparse"
    table = Table(title=title)
    for column in ("layer", "shape", "density", "kept as", "reason"):
        table.add_column(column)
    for d in report.layers:
        table.add_row(d.name, "x".join(map(str, d.shape)), f"{d.density:.3f}", "sparse" if d.sparse else "dense",
                      d.reason)
    console.print(table)
    for line in report.fusion_lines():
        console.print(line)
    console.print(f"Outputs: {report.output_check}.")
