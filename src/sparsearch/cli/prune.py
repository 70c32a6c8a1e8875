"""The ``sparsearch prune`` command (registered on the app in ``sparsearch.cli``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sparsearch.cli.errors import user_errors
from sparsearch.oneshot.calibration import read_calibration_file
from sparsearch.oneshot.config import OneShotConfig

console = Console()


def prune_command(
    model_dir: Annotated[Path, typer.Argument(help="Hugging Face model directory (config.json, weights, tokenizer).")],
    out: Annotated[Path, typer.Option("--out", help="New (or empty) directory for the pruned model.")],
    calib: Annotated[Path, typer.Option("--calib", help="UTF-8 text file of calibration text.")],
    method: Annotated[str, typer.Option(help="magnitude, wanda or sparsegpt.")] = "wanda",
    sparsity: Annotated[
        float | None, typer.Option(help="Fraction of zero weights per pruned layer, in [0, 1).")
    ] = None,
    pattern: Annotated[str | None, typer.Option(help="N:M pattern such as 2:4 (sets the sparsity).")] = None,
    budget: Annotated[
        str | None, typer.Option(help="Unstructured budget: 'layer' or 'row' (default: the method's usual).")
    ] = None,
    dsnot: Annotated[bool, typer.Option("--dsnot", help="Refine the mask with DSnoT.")] = False,
    owl: Annotated[
        bool, typer.Option("--owl", help="Per-block sparsity from outlier ratios (OWL), same overall sparsity.")
    ] = False,
    owl_m: Annotated[float, typer.Option(help="OWL: outliers score above M times their block's mean.")] = 5.0,
    owl_lambda: Annotated[
        float, typer.Option(help="OWL: block sparsities stay within target +- lambda.")
    ] = 0.08,
    calib_tokens: Annotated[int, typer.Option(help="Calibration token budget.")] = 8192,
    seq_len: Annotated[
        int | None, typer.Option(help="Tokens per calibration window (default: 128 or the model's maximum).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for drawing calibration windows.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Allow a non-empty --out directory.")] = False,
    report: Annotated[
        Path | None, typer.Option(help="Where to write the JSON report (default: inside --out).")
    ] = None,
) -> None:
    """Prune a pretrained transformers model in one shot and save a copy that loads with transformers."""
    with user_errors():
        # imported here: sparsearch.oneshot.hf imports transformers, which takes seconds, for this command only
        from sparsearch.oneshot.hf import REPORT_NAME, prune_pretrained

        config = OneShotConfig(
            method=method, sparsity=sparsity, pattern=pattern, budget=budget, dsnot=dsnot, owl=owl, owl_m=owl_m,
            owl_lambda=owl_lambda,
        )
        texts = read_calibration_file(calib)
        with console.status(f"pruning {model_dir} ({config.label})"):
            result = prune_pretrained(
                model_dir, out, config, texts, n_tokens=calib_tokens, seq_len=seq_len, seed=seed,
                overwrite=overwrite, report_path=report,
            )
    table = Table(title=f"{config.label}: {len(result.layers)} layers")
    for column in ("layer", "shape", "target", "sparsity", "rel. error", "seconds"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for layer in result.layers:
        table.add_row(
            layer.name, f"{layer.shape[0]}x{layer.shape[1]}", f"{layer.target_sparsity:.3f}",
            f"{layer.actual_sparsity:.3f}",
            f"{layer.reconstruction_error:.4f}", f"{layer.seconds:.2f}",
        )
    console.print(table)
    console.print(
        f"sparsity {result.actual_sparsity:.4f} of {result.pruned_parameters} weights in pruned layers "
        f"(target {result.target_sparsity:g}), mean reconstruction error {result.mean_reconstruction_error:.4f}, "
        f"{result.seconds:.1f} s on {result.calibration_tokens} calibration tokens",
        highlight=False,
        soft_wrap=True,
    )
    console.print(f"model: {out}\nreport: {report or out / REPORT_NAME}", highlight=False, soft_wrap=True)
