"""Shared CLI pieces: the app, one-line error reporting, console."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

from reclm.data.errors import DataError

app = typer.Typer(
    name="reclm",
    help="RecLM: LLM-written user/item profiles fused into collaborative-filtering recommenders.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=False)
err_console = Console(stderr=True)

# Errors a user can fix from the message alone: printed as one line, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (DataError, FileNotFoundError, ValueError)


def friendly_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn input errors into ``error: <message>`` and exit 2 (set RECLM_DEBUG=1 for the traceback)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except USER_ERRORS as exc:
            if os.environ.get("RECLM_DEBUG"):
                raise
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper
