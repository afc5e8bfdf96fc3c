"""The ``reclm`` command. Each sub-module registers its commands on the one Typer app."""

from __future__ import annotations

import importlib
import os
import sys

import typer

from reclm.cli.common import app

# Modules that add commands to ``app``; each owns one area (data/cf, llm, pipeline, serve).
COMMAND_MODULES = (
    "reclm.cli.data",
    "reclm.cli.cf",
    "reclm.cli.llm",
    "reclm.cli.llm_data",
    "reclm.cli.llm_stages",
    "reclm.cli.pipeline",
    "reclm.cli.serve",
)

for module in COMMAND_MODULES:
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:  # an area not built yet must not break the others
        if exc.name != module:
            raise


def quiet_library_bars() -> None:
    """In a log file, no tqdm bars from transformers ("Loading weights"): reclm prints its own lines.
    Set before transformers is imported (it reads the variable once); the script entry point is ``app``."""
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


quiet_library_bars()


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["app", "main", "typer"]
