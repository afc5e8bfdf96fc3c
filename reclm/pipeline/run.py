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

from reclm.data.dataset import RecDataset
from reclm.data.errors import DataError
from reclm.data.split import Split
from reclm.distributed import refuse_data_parallel
from reclm.pipeline import estimate as est
from reclm.pipeline.config import PipelineConfig
from reclm.pipeline.engine import Pipeline, StageError, StageOutcome, StagePlan
from reclm.pipeline.formatting import format_seconds
from reclm.pipeline.speed import SpeedBook
from reclm.pipeline.table import STAGES
from reclm.utils import cache_root, write_text_atomic


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
        speed_local=lambda name: est.runs_here(name, config),
    )


def save_config(config: PipelineConfig, out: Path) -> None:
    """The effective config beside the results, so a run directory says how it was made (its ``out`` is
    the folder actually used, so ``reclm run RUN/config.yaml`` resumes this run, not the config's own)."""
    out.mkdir(parents=True, exist_ok=True)
    effective = config.model_dump(mode="json") | {"out": str(out.resolve())}
    write_text_atomic(out / "config.yaml", yaml.safe_dump(effective, sort_keys=False))


def preflight(config: PipelineConfig) -> tuple[RecDataset, Split]:
    """The whole effective config checked against the data it will run on, before stage 1: a run that
    could not finish stops here with one line (a DataError: exit code 2) instead of at a late stage.
    Returns the dataset and the split the config makes (a dry run's estimates reuse them)."""
    from reclm.data.loaders import load_dataset
    from reclm.data.split import make_split

    refuse_data_parallel("reclm run")
    data = load_dataset(str(config.dataset), item_text=config.item_text)
    split = make_split(data, config.split.spec())
    problem = data_problem(config, data) or split_problem(config, data, split)
    if problem:
        raise DataError(problem, config.dataset)
    return data, split


def data_problem(config: PipelineConfig, data: RecDataset) -> str | None:
    """What the dataset lacks for this config: item text (every prompt and every text feature mode reads
    it) and the file teacher's profile files."""
    if not any(data.item_texts()):
        modes = [m for m in config.cf.features if m != "none"]
        needs = f" and cf.features {', '.join(modes)} need" if modes else " needs"
        fields = ", ".join(data.item_fields)
        what = f"every item's text is empty (fields {fields})" if fields else "no item text"
        return (
            f"{what}: every profile prompt of `reclm run`{needs} it; give --item-text FILE (CSV or JSON Lines "
            "keyed by 'item'; `item_text:` in a config), or train CF without text: `reclm train-cf --features none`"
        )
    if config.stages.teacher == "file":
        for side, given in (("user", config.teacher.user_file), ("item", config.teacher.item_file)):
            resource = f"teacher_{side}_profiles"
            if given and not Path(given).expanduser().is_file():
                return f"teacher.{side}_file {given!r}: no such file"
            if not given and resource not in data.resources:
                return (
                    f"stages.teacher: file needs {side} profiles: the dataset ships no {resource}.jsonl; "
                    f"give teacher.{side}_file, or use the offline or openai teacher"
                )
    return None


def split_problem(config: PipelineConfig, data: RecDataset, split: Split) -> str | None:
    """What the split this config makes lacks: train, validation (CF model selection) and full-shot test
    pairs, and zero-shot items when a share of them is asked for."""
    stats, options = split.stats(), config.split
    made = f"split {split.meta['method']} {list(options.ratios)} of {data.n_interactions:,} interactions"
    for part, why in (("train", "every model trains on them"), ("valid", "CF model selection needs them")):
        if not stats[part]:
            return f"the {made} leaves no {part} pairs ({why}); change split.ratios (--ratios)"
    if not stats["test_full_shot"]:
        return f"the {made} leaves no full-shot test pairs (the report's main task); change split.ratios (--ratios)"
    own_items = data.new_items is not None or split.meta["method"] == "snapshot"
    if options.zero_shot_fraction > 0 and not own_items and not stats["zero_shot_items"]:
        return (
            f"split.zero_shot_fraction {options.zero_shot_fraction} of {data.n_items:,} items holds out no item; "
            "expected at least one zero-shot item (raise --zero-shot, or set it to 0 to skip zero-shot evaluation)"
        )
    return None


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
    """Check the config against the data (:func:`preflight`), then print which stages would run or come
    from cache, with time and token estimates."""
    made = preflight(pipeline.config)
    plans = pipeline.plan(force=forced(pipeline, from_stage, only), only=only)
    size = est.data_size(pipeline.config, pipeline.root, made)
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
        rerun = {p.stage.name for p in plans if p.action == "run"}
        left = est.left_to_run(stage, pipeline.config, pipeline.root, size, pipeline.speeds, plan.input_hash, rerun)
        guess, reason = left.estimate, plan.reason
        if left.step is not None:
            reason += f", resumes at step {left.step}"
        if left.cached:
            reason += f", {left.cached:,} cached"
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
    preflight(config)
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
