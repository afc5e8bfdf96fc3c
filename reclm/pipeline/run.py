"""``reclm run``: the plan (``--dry-run``), then the stages, then where the report is."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from reclm.pipeline import estimate as est
from reclm.pipeline.cache import Pipeline, SpeedBook, StageError, StageOutcome, StagePlan, format_seconds
from reclm.pipeline.config import PipelineConfig
from reclm.pipeline.stages import STAGES
from reclm.utils import cache_root


def speed_book() -> SpeedBook:
    return SpeedBook(cache_root() / "pipeline" / "speeds.json")


def make_pipeline(config: PipelineConfig, out: str | Path, console: Console | None = None) -> Pipeline:
    return Pipeline(
        config,
        out,
        STAGES,
        console=console,
        speeds=speed_book(),
        speed_setup=lambda name: est.speed_setup(name, config),
    )


def save_config(config: PipelineConfig, out: Path) -> None:
    """The effective config beside the results, so a run directory says how it was made."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    tmp.replace(out / "config.yaml")


def forced(pipeline: Pipeline, from_stage: str | None, only: str | None) -> set[str]:
    names = [s.name for s in pipeline.stages]
    for name in (from_stage, only):
        if name is not None and name not in names:
            raise StageError(f"unknown stage {name!r}: expected one of {', '.join(names)}")
    if only:
        return {only}
    if from_stage:
        return set(names[names.index(from_stage) :])
    return set()


def dry_run(
    pipeline: Pipeline, console: Console, from_stage: str | None = None, only: str | None = None
) -> list[StagePlan]:
    """Print which stages would run or come from cache, with time and token estimates."""
    plans = pipeline.plan(force=forced(pipeline, from_stage, only), only=only)
    size = est.data_size(pipeline.config, pipeline.root)
    table = Table(title=f"plan for {pipeline.root}", title_justify="left")
    for column in ("#", "stage", "action", "why", "work", "est. time", "est. tokens", "basis"):
        table.add_column(column, justify="right" if column in ("#", "est. time", "est. tokens") else "left")
    total_seconds = total_tokens = 0.0
    defaults = False
    for index, plan in enumerate(plans, 1):
        stage = plan.stage
        if plan.action != "run" or stage.estimate is None:
            table.add_row(str(index), stage.name, plan.action, plan.reason, "", "", "", "")
            continue
        guess = stage.estimate(pipeline.config, size, pipeline.speeds)
        reason = plan.reason
        step = est.saved_step(pipeline.root, stage.folder, plan.input_hash) if stage.name in est.LLM_STAGES else None
        if step is not None:
            guess = est.remaining(stage.name, pipeline.config, size, pipeline.speeds, step)
            reason += f", resumes at step {step}"
        if stage.name == "profiles":
            rerun = {p.stage.name for p in plans if p.action == "run"}
            cached = est.cached_user_profiles(pipeline.config, pipeline.root, size, rerun)
            if cached:
                guess = est.profiles(pipeline.config, size, pipeline.speeds, cached=cached)
                reason += f", {cached:,} cached"
        total_seconds += guess.seconds
        total_tokens += guess.tokens
        defaults = defaults or guess.basis == "default"
        work = f"{guess.units:,.0f} {guess.unit}" if guess.unit else ""
        tokens = f"{guess.tokens:,}" if guess.tokens else "-"
        table.add_row(str(index), stage.name, "run", reason, work, format_seconds(guess.seconds), tokens, guess.basis)
    console.print(table)
    where = "the run's saved split" if size.measured else "the split this config makes"
    prompts = "" if size.user_prompts is None else f", {size.user_prompts:,} distinct user prompts"
    console.print(
        f"estimated total: {format_seconds(total_seconds)}, {int(total_tokens):,} LLM tokens "
        f"({size.users:,} users, {size.items:,} items, {size.train:,} train pairs{prompts}, from {where}; "
        f"constants in reclm/pipeline/estimate.py)",
        highlight=False,
        soft_wrap=True,
    )
    if defaults:
        console.print(speed_note(), highlight=False, soft_wrap=True)
    return plans


def speed_note() -> str:
    """What the ``default`` basis means on this machine: the reference speeds times :func:`est.speed_factor`."""
    factor, why = est.speed_basis()
    return f"default speeds: the reference machine's x{factor:.2f} ({why}); a finished stage measures its own"


@contextlib.contextmanager
def thread_count(threads: int | None) -> Iterator[None]:
    """``threads`` for every stage: torch's thread count and RECLM_THREADS (which the CF trainer and
    the LLM code read), restored afterwards."""
    if threads is None:
        yield
        return
    import torch

    saved_env, saved_torch = os.environ.get("RECLM_THREADS"), torch.get_num_threads()
    os.environ["RECLM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop("RECLM_THREADS", None)
        else:
            os.environ["RECLM_THREADS"] = saved_env
        torch.set_num_threads(saved_torch)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a batch scheduler's time limit, ``kill``) stops a run as Ctrl-C does: the stage in
    progress is marked interrupted and resumes on the next run. (A job started in the background by a
    non-interactive shell ignores SIGINT, so SIGTERM is the signal that reaches it.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(
    config: PipelineConfig,
    out: str | Path,
    console: Console | None = None,
    from_stage: str | None = None,
    only: str | None = None,
) -> list[StageOutcome]:
    console = console or Console()
    pipeline = make_pipeline(config, out, console)
    console.print(
        f"reclm run: {config.dataset} -> {out} (effective config in {Path(out) / 'config.yaml'})", highlight=False
    )
    with thread_count(config.threads), terminate_as_interrupt():
        try:
            outcomes = pipeline.run(from_stage=from_stage, only=only, on_locked=lambda: save_config(config, Path(out)))
        except KeyboardInterrupt:
            console.print(
                f"interrupted: the stage in progress is kept in {Path(out) / '.work'}; the same command resumes it",
                highlight=False,
            )
            raise
    ran = sum(o.seconds for o in outcomes if o.action == "ran")
    cached = sum(o.action == "cached" for o in outcomes)
    console.print(f"finished in {format_seconds(ran)} of stage work ({cached} stages from cache)", highlight=False)
    report = Path(out) / "report" / "report.html"
    if report.is_file():
        console.print(f"report: {report}", highlight=False)
    return outcomes
