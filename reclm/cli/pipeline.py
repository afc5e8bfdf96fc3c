"""``reclm run`` (the whole method, cached and resumable) and ``reclm report``."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from reclm.cli.common import app, console, err_console, friendly_errors
from reclm.cli.data import parse_ratios
from reclm.pipeline.config import default_config, load_config
from reclm.pipeline.engine import StageError
from reclm.pipeline.table import STAGE_NAMES


def stage_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """A failed stage is one line (its manifest keeps the details); exit code 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except StageError as exc:
            if os.environ.get("RECLM_DEBUG"):
                raise
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            if exc.__cause__ is not None:
                err_console.print("(set RECLM_DEBUG=1 for the traceback)", highlight=False)
            raise typer.Exit(1) from None

    return wrapper


@app.command("run")
@friendly_errors
@stage_errors
def run_command(
    config: Path = typer.Argument(None, help="Pipeline config (YAML), e.g. configs/ml-100k.yaml."),
    dataset: str = typer.Option(None, help="Dataset (ml-100k or a path); overrides the config's."),
    item_text: str = typer.Option(None, help="Item text file (CSV or JSON Lines keyed by 'item') for CSV data."),
    split: str = typer.Option(None, help="auto | random | temporal | snapshot (default: the config's, else auto)."),
    ratios: str = typer.Option(None, help="train,valid,test ratios per user (default 0.8,0.1,0.1)."),
    zero_shot: float = typer.Option(None, help="Share of items held out of training entirely (default 0.1)."),
    zero_shot_items: str = typer.Option(None, help="random | latest (the items that appear last in time)."),
    cold_valid: float = typer.Option(None, help="Share of items held out for cold validation (default 0.05)."),
    split_seed: int = typer.Option(None, help="Seed of the split (default 2020; --seeds sets the CF seeds)."),
    out: Path = typer.Option(None, help="Run directory (default: the config's `out`, else runs/<name>)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and estimates; run nothing."),
    seeds: int = typer.Option(None, min=1, help="CF seeds per run: N seeds from the config's first seed."),
    from_stage: str = typer.Option(None, "--from", help=f"Rerun from this stage on ({', '.join(STAGE_NAMES)})."),
    only: str = typer.Option(None, help="Run only this stage (its inputs must be complete)."),
    max_cost: float = typer.Option(
        None, "--max-cost", min=0, help="Spending cap in $ for a paid (openai) teacher (teacher.max_cost)."
    ),
    executor: str = typer.Option(
        None, help="Where the CF runs train: local | ray (Ray tasks; `ray.address` or RAY_ADDRESS) (executor)."
    ),
) -> None:
    """Run every stage of RecLM in order; stages whose inputs did not change come from cache."""
    from reclm.pipeline.run import dry_run as plan
    from reclm.pipeline.run import make_pipeline, run

    for flag, name in (("--from", from_stage), ("--only", only)):
        if name is not None and name not in STAGE_NAMES:
            raise ValueError(f"{flag} {name!r}: expected one of {', '.join(STAGE_NAMES)}")
    overrides = dataset_overrides(dataset, item_text, split, ratios, zero_shot, zero_shot_items, cold_valid, split_seed)
    if max_cost is not None:
        overrides["teacher.max_cost"] = max_cost
    if executor is not None:
        overrides["executor"] = executor
    cfg = load_config(config, overrides) if config else default_config(dataset or "ml-100k", overrides)
    if seeds:
        first = cfg.cf.seeds[0]
        cfg.cf.seeds = [first + i for i in range(seeds)]
    name = config.stem if config else None
    out_dir = out or cfg.default_out(name)
    if dry_run:
        plan(make_pipeline(cfg, out_dir, console), console, from_stage=from_stage, only=only)
        return
    run(cfg, out_dir, console, from_stage=from_stage, only=only)


def dataset_overrides(
    dataset: str | None,
    item_text: str | None,
    split: str | None,
    ratios: str | None,
    zero_shot: float | None,
    zero_shot_items: str | None,
    cold_valid: float | None,
    split_seed: int | None,
) -> dict[str, Any]:
    """The dataset flags `prepare` and `train-cf` take, as config keys (only those given: the rest stay the
    config's or the defaults)."""
    for flag, value, allowed in (
        ("--split", split, ("auto", "random", "temporal", "snapshot")),
        ("--zero-shot-items", zero_shot_items, ("random", "latest")),
    ):
        if value is not None and value not in allowed:
            raise ValueError(f"{flag} {value!r}: expected one of {', '.join(allowed)}")
    flags = {
        "dataset": dataset or None,
        "item_text": item_text,
        "split.method": split,
        "split.ratios": list(parse_ratios(ratios)) if ratios is not None else None,
        "split.zero_shot_fraction": zero_shot,
        "split.zero_shot": zero_shot_items,
        "split.cold_valid_fraction": cold_valid,
        "split.seed": split_seed,
    }
    return {key: value for key, value in flags.items() if value is not None}


@app.command("report")
@friendly_errors
def report_command(
    run_dir: Path = typer.Argument(..., help="A run directory made by `reclm run`."),
    out: Path = typer.Option(None, help="Where to write report.md / report.html (default RUN/report)."),
) -> None:
    """(Re)generate report.md and the self-contained report.html from a run directory."""
    from reclm.pipeline.report import write_report

    paths = write_report(run_dir, out or run_dir / "report")
    for path in paths:
        console.print(f"wrote {path}", highlight=False)
