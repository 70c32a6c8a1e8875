"""The ``sparsearch study`` and ``sparsearch report`` commands (registered on the app in ``sparsearch.cli``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from sparsearch.cli.errors import user_errors
from sparsearch.report import rich_comparison, rich_methods, rich_table, write_report
from sparsearch.study import DEFAULT_STORE_DIR, default_study_config, load_study_config, run_study

# output written to a file or a pipe gets room for the table's columns instead of the 80 Rich assumes there
PIPE_WIDTH = 140


def _console() -> Console:
    console = Console()
    return console if console.is_terminal else Console(width=PIPE_WIDTH)


def _show_report(console: Console, store_path: Path, study: str | None, folder: Path | None) -> Path:
    report = write_report(store_path, study, folder)
    console.print(rich_table(report.rows, title=f"study {report.study}"))
    if report.comparison:
        console.print(rich_comparison(report.comparison))
    if report.methods:
        console.print(rich_methods(report.methods))
    for arm, notes in report.notes.items():
        for note in notes:
            console.print(f"note ({arm}): {note}", highlight=False, soft_wrap=True)
    console.print(f"report: {report.files.html}", highlight=False, soft_wrap=True)
    console.print(
        f"        (plots, summary.csv, results.json and summary.md in {report.files.folder})", highlight=False
    )
    return report.files.html


def study_command(
    config: Annotated[
        Path | None, typer.Argument(help="Study file (TOML). Without it: the Random Search baseline on MNIST-1D.")
    ] = None,
    store: Annotated[Path | None, typer.Option(help="SQLite results store (default: from the study file).")] = None,
    workers: Annotated[int | None, typer.Option(help="Parallel trials (default: every core).")] = None,
    report: Annotated[bool, typer.Option(help="Write the report when the study is done.")] = True,
    progress: Annotated[bool, typer.Option(help="Show a progress bar with ETA.")] = True,
    sparse_kernels: Annotated[
        bool | None,
        typer.Option(help="Train masked layers on the sparse kernels: static masks, dynamic methods between updates, "
                     "search candidates' short trainings (default: from the study file, else off)."),
    ] = None,
) -> None:
    """Run a sparse-architecture study; re-running the same command resumes it."""
    console = _console()
    # a study file's model = "my_models:resnet" / dataset = "my_data:load" import from the current folder
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    with user_errors():
        study = load_study_config(config) if config is not None else default_study_config()
        if sparse_kernels is not None:
            study = study.model_copy(update={"sparse_kernels": sparse_kernels})
        store_path = study.store_path(store)
        console.print(
            f"study [bold]{study.name}[/] -> {store_path} "
            f"(workers: {study.worker_count(workers)}" + (", on Ray)" if study.executor == "ray" else ")"),
            highlight=False,
        )
        try:
            run = run_study(study, store_path=store, workers=workers, console=console, show_progress=progress)
        except KeyboardInterrupt:
            console.print("interrupted: finished trials are stored; re-run the same command to resume")
            raise typer.Exit(code=130) from None
        by_others = f", {run.by_others} run by other processes" if run.by_others else ""
        console.print(
            f"{len(run.finished)} trials run, {run.already_done} already done, {len(run.failed)} failed{by_others} "
            f"({run.total_trials} in the study) in {run.seconds:.1f} s",
            highlight=False,
        )
        if report and (run.finished or run.already_done or run.by_others):
            _show_report(console, store_path, study.name, None)
        if run.failed:
            first_key, first_error = next(iter(run.failed.items()))
            last_line = first_error.strip().splitlines()[-1]
            console.print(
                f"[bold red]{len(run.failed)} trials failed[/] (first: {first_key}: {last_line}); "
                "the errors are in the store; re-run the same command to retry them",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(code=1)


def _resolve_store(target: str | None) -> Path:
    if target is None:
        return DEFAULT_STORE_DIR / f"{default_study_config().name}.sqlite"
    path = Path(target)
    if path.exists() or path.suffix in (".sqlite", ".db", ".sqlite3"):
        return path
    by_name = DEFAULT_STORE_DIR / f"{target}.sqlite"
    if not by_name.exists():
        raise FileNotFoundError(
            f"no results store {target!r} and no study named {target!r} in {DEFAULT_STORE_DIR}/; "
            "give the path of a .sqlite store or the name of a study run from this folder"
        )
    return by_name


def report_command(
    target: Annotated[
        str | None,
        typer.Argument(help="Results store (.sqlite) or study name (default: the default study's store)."),
    ] = None,
    study: Annotated[str | None, typer.Option(help="Study to report when the store holds several.")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for the report (default: next to the store).")] = None,
) -> None:
    """Render a study's table, plots, HTML, CSV and JSON from its results store alone."""
    with user_errors():
        _show_report(_console(), _resolve_store(target), study, out)
