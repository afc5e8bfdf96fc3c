"""Shared CLI pieces: the app, one-line error reporting, console."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Mapping
from typing import IO, Any

import typer
from rich.console import Console
from rich.markup import escape

from reclm.data.errors import DataError

app = typer.Typer(
    name="reclm",
    help="RecLM: LLM-written user/item profiles fused into collaborative-filtering recommenders.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
LOG_WIDTH = 160  # columns of tables and lines written to a file or a pipe (rich would wrap them at 80)


def log_width(stream: IO[str], environ: Mapping[str, str] | None = None) -> int | None:
    """``None`` (rich sizes to the terminal, or honours ``COLUMNS``) on a terminal or where ``COLUMNS`` is
    set; else :data:`LOG_WIDTH`, so a log or CI output keeps each plan row and stage line on one line."""
    environ = os.environ if environ is None else environ
    isatty = getattr(stream, "isatty", None)
    if environ.get("COLUMNS") or (isatty is not None and isatty()):
        return None
    return LOG_WIDTH


console = Console(stderr=False, width=log_width(sys.stdout))
err_console = Console(stderr=True, width=log_width(sys.stderr))

# Errors a user can fix from the message alone: printed as one line, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (DataError, FileNotFoundError, ValueError)


def friendly_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn input errors into ``error: <message>`` and exit 2, and errors of the machine (``OSError``: disk
    full, permissions, a file system without locks) into one line and exit 1; RECLM_DEBUG=1 re-raises."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except USER_ERRORS as exc:
            if os.environ.get("RECLM_DEBUG"):
                raise
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as exc:  # the machine, not the input: a full disk, a read-only or network file system
            if os.environ.get("RECLM_DEBUG"):
                raise
            message = f"{type(exc).__name__}: {exc} (RECLM_DEBUG=1 shows the traceback)"
            err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper
