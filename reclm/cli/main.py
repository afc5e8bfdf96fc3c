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
    "reclm.cli.writer",
    "reclm.cli.profiles",
    "reclm.cli.tuning",
    "reclm.cli.pipeline",
    "reclm.cli.archive",
    "reclm.cli.serve",
    "reclm.cli.status",
)

for module in COMMAND_MODULES:
    importlib.import_module(module)


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
