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


def main() -> None:
    if not sys.stderr.isatty():  # a log file: no tqdm bars from transformers ("Loading weights") there
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    app()


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["app", "main", "typer"]
