"""The command line's one error style: a library input error becomes one red line and exit code 2."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console
from rich.markup import escape

error_console = Console(stderr=True)

# the library raises these for bad input (a value, a file, a name); anything else is a bug and keeps its traceback
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, KeyError)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's input errors into a clear message and exit code 2 (no traceback)."""
    try:
        yield
    except USER_ERRORS as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        error_console.print(f"[bold red]error:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None
