"""The `sparsearch` command line: thin Typer commands over the library layers, no logic of its own.

This package is the top layer: no library module imports it. Every command reports bad input through
``user_errors`` (``sparsearch.cli.errors``): a one-line message naming the bad value and what is allowed,
exit code 2, no traceback.
"""

from __future__ import annotations

import typer

from sparsearch.cli.convert import convert_command
from sparsearch.cli.errors import user_errors
from sparsearch.cli.prune import prune_command
from sparsearch.cli.study import report_command, study_command

app = typer.Typer(
    name="sparsearch",
    help="Find, train, compare and ship sparse neural networks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command("study")(study_command)
app.command("report")(report_command)
app.command("prune")(prune_command)
app.command("convert")(convert_command)

__all__ = ["app", "main", "user_errors"]


@app.callback()
def _root() -> None:
    """Find, train, compare and ship sparse neural networks."""


def main() -> None:
    """Console-script entry point."""
    app()
