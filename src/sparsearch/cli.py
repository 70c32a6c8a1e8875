"""The `sparsearch` command line: thin Typer commands over the library layers, no logic of its own.

Every command reports bad input through ``user_errors``: a one-line message naming the bad value and what is
allowed, exit code 2, no traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console
from rich.markup import escape

from sparsearch.oneshot.commands import prune_command
from sparsearch.runtime.commands import convert_command
from sparsearch.study.commands import report_command, study_command

app = typer.Typer(
    name="sparsearch",
    help="Find, train, compare and ship sparse neural networks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
error_console = Console(stderr=True)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's input errors into a clear message and exit code 2 (no traceback)."""
    try:
        yield
    except (ValueError, FileNotFoundError, NotADirectoryError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        error_console.print(f"[bold red]error:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None


app.command("study")(study_command)
app.command("report")(report_command)
app.command("prune")(prune_command)
app.command("convert")(convert_command)


@app.callback()
def _root() -> None:
    """Find, train, compare and ship sparse neural networks."""


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
