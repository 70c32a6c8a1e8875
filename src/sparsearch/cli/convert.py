"""The `sparsearch convert` command (registered on the app in `sparsearch.cli`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sparsearch.cli.errors import user_errors
from sparsearch.runtime.convert import convert_file

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
    model_file: Annotated[Path, typer.Argument(help="safetensors state dict or sparsearch checkpoint.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Sparse safetensors file to write.")],
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes to time, comma-separated.")] = "1,64,256",
    min_speedup: Annotated[float, typer.Option(help="Sparse must beat dense by this factor at every batch size.")]
    = 1.05,
    max_density: Annotated[float, typer.Option(help="Layers denser than this stay dense without timing.")] = 0.7,
) -> None:
    """Store the Linear weights of a masked/pruned model sparse where the CPU kernels are measured faster."""
    with user_errors():
        sizes = _batch_sizes(batch_sizes)
        with console.status(f"timing dense vs sparse layers of {model_file}"):
            report, size = convert_file(model_file, out, batch_sizes=sizes, min_speedup=min_speedup,
                                        max_density=max_density)
    table = Table(title=f"{out}: {size:,} bytes, {len(report.sparse_layers)} of {len(report.layers)} "
                        "2-D weights stored sparse")
    for column in ("layer", "shape", "density", "kept as", "reason"):
        table.add_column(column)
    for d in report.layers:
        table.add_row(d.name, "x".join(map(str, d.shape)), f"{d.density:.3f}", "sparse" if d.sparse else "dense",
                      d.reason)
    console.print(table)
