"""``reclm status``: where a run stands, read from its manifests and work folders without touching it.

Nothing here takes the run's lock or writes into the run directory, so it is safe beside a ``reclm run``
in progress: the lock is only tested (a shared ``flock`` with ``LOCK_NB``, released at once), manifests
and unit markers are read, and the estimate of what is left plans the run as ``--dry-run`` does.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from reclm.data.errors import DataError
from reclm.pipeline.config import PipelineConfig, load_config
from reclm.pipeline.engine import PARTIAL_MARKER, UNIT_MARKER, Estimate, Stage, StagePlan
from reclm.pipeline.table import STAGES
from reclm.utils import read_json

# a stage's work folder holds these while it runs; the next run resumes from them
IN_PROGRESS = ("running", "interrupted", "failed")
# stages whose estimate needs the prompts measured (est.data_size); the others need the split's counts only
PROMPT_STAGES = {"teacher", "sft", "collab", "reward", "rl", "item_side", "profiles", "encode"}


@dataclass
class Progress:
    """What a stage in progress has done so far, from ``RUN/.work/<folder>``."""

    resumable: bool  # the work folder was made for the inputs of the manifest (a next run keeps it)
    units_done: list[str] = field(default_factory=list)  # committed units (``.unit.json``)
    units_started: dict[str, int | None] = field(default_factory=dict)  # unit -> epochs in its history.json
    units_total: int | None = None  # units the config asks for (train_cf: its CF runs)
    records: dict[str, int] = field(default_factory=dict)  # lines of each JSON Lines file written so far
    step: int | None = None  # checkpoint step of a training stage (with estimates)
    steps: int | None = None


@dataclass
class StageStatus:
    name: str
    folder: str
    state: str  # complete | running | interrupted | failed | off | not started
    seconds: float = 0.0  # over every attempt the manifest knows (a running one: its elapsed time too)
    running_for: float | None = None  # seconds of the attempt in progress
    attempts: int = 0
    started: str | None = None
    error: str | None = None
    progress: Progress | None = None
    plan: str | None = None  # what `reclm run` would do now: cached | run | off (with estimates)
    reason: str = ""
    left: float | None = None  # estimated seconds left (with estimates)
    basis: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class RunStatus:
    root: Path
    locked: bool  # a `reclm run` holds the run's lock now
    stages: list[StageStatus]
    estimated: bool = False
    note: str = ""  # why there is no estimate, or what it was made from

    @property
    def left(self) -> float | None:
        return sum(s.left or 0.0 for s in self.stages) if self.estimated else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "root": str(self.root), "left": self.left}


def run_status(root: str | Path, estimate: bool = True, now: dt.datetime | None = None) -> RunStatus:
    """Each stage's state, time and progress; with ``estimate`` also the plan and the time left."""
    root = Path(root)
    check_run(root)
    locked = lock_held(root)
    cfg, problem = run_config(root)
    now = now or dt.datetime.now(dt.timezone.utc)
    stages = [stage_status(root, stage, cfg, locked, now) for stage in STAGES]
    status = RunStatus(root, locked, stages, note=problem)
    if estimate and cfg is not None:
        try:
            add_estimates(status, cfg)
        except (DataError, OSError, ValueError) as exc:  # the run itself is fine; say why there is no estimate
            status.note = f"no estimate: {exc}"
    return status


def check_run(root: Path) -> None:
    if not root.is_dir():
        raise DataError("no such run directory", root)
    if not (root / "manifests").is_dir() and not (root / "config.yaml").is_file():
        raise DataError("not a run directory (no manifests/ or config.yaml: `reclm run` makes them)", root)


def lock_held(root: Path) -> bool:
    """Whether another process holds the run's lock (``RUN/.lock``, which ``Pipeline.locked`` takes): a shared
    lock is tried without waiting and released at once; the file is opened read-only, never created."""
    try:
        fd = os.open(root / ".lock", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def run_config(root: Path) -> tuple[PipelineConfig | None, str]:
    """The effective config the last `reclm run` saved (``RUN/config.yaml``), or None and why not."""
    path = root / "config.yaml"
    if not path.is_file():
        return None, "no config.yaml: no estimate"
    try:
        return load_config(path), ""
    except (OSError, ValueError) as exc:
        return None, f"config.yaml unreadable ({exc}): no estimate"


def stage_status(root: Path, stage: Stage, cfg: PipelineConfig | None, locked: bool, now: dt.datetime) -> StageStatus:
    """A stage's state and time from its manifest; a manifest that says running counts only while the lock is held."""
    record = read_json(root / "manifests" / f"{stage.name}.json") or {}
    status = StageStatus(stage.name, stage.folder, record.get("status", "not started"), started=record.get("started"))
    on = stage.enabled(cfg) if cfg is not None else None
    if status.state == "off" or on is False:
        status.state = "off" if on is not True else "not started"  # switched on since: the run comes to it
        return status
    attempts = list(record.get("attempts") or [])
    status.attempts = len(attempts)
    known = sum(float(a.get("seconds") or 0.0) for a in attempts) or float(record.get("seconds") or 0.0)
    status.seconds = round(known, 3)
    if status.state == "running":
        if locked:
            status.attempts += 1
            status.running_for = elapsed(record.get("started"), now)
            status.seconds = round(status.seconds + status.running_for, 3)
            if record.get("resumed") and not attempts:
                status.notes.append("resumed: earlier attempts' time is in the manifest only once the stage ends")
        else:
            status.state = "interrupted"
            status.notes.append("its process ended without marking it (killed?); the next run resumes it")
    if status.state == "failed":
        status.error = record.get("error")
    if status.state in IN_PROGRESS:
        status.progress = work_progress(root, stage.name, stage.folder, record.get("input_hash"), cfg)
    return status


def elapsed(started: str | None, now: dt.datetime) -> float:
    try:
        return max(0.0, (now - dt.datetime.fromisoformat(started or "")).total_seconds())
    except (TypeError, ValueError):
        return 0.0


def work_progress(
    root: Path, name: str, folder: str, input_hash: str | None, cfg: PipelineConfig | None
) -> Progress | None:
    """Units committed or started and records written in ``RUN/.work/<folder>`` (read only)."""
    work = root / ".work" / folder
    if not work.is_dir():
        return None
    key = root / ".work" / f"{folder}.key"
    progress = Progress(resumable=key.is_file() and key.read_text() == input_hash)
    for marker in sorted(work.rglob(UNIT_MARKER)):  # committed; a ".partial" one was killed before its rename
        progress.units_done.append(unit_name(work, marker.parent))
    for marker in sorted(work.rglob(PARTIAL_MARKER)):  # made for every pending unit; started once it holds more
        unit = unit_name(work, marker.parent)
        if unit not in progress.units_done and any(p.name != PARTIAL_MARKER for p in marker.parent.iterdir()):
            progress.units_started[unit] = history_epochs(marker.parent / "history.json")
    if name == "train_cf" and cfg is not None:
        from reclm.pipeline.stages.cf import cf_runs

        progress.units_total = len(cf_runs(cfg))
    for file in sorted(work.rglob("*.jsonl")):
        progress.records[str(file.relative_to(work))] = count_lines(file)
    return progress


def unit_name(work: Path, folder: Path) -> str:
    name = str(folder.relative_to(work))
    return name.removesuffix(".partial")


def history_epochs(path: Path) -> int | None:
    """Epochs a CF run in progress has trained (its ``history.json`` is rewritten after each)."""
    history = read_json(path)
    if not isinstance(history, list) or not history:
        return None
    last = history[-1]
    return int(last["epoch"]) if isinstance(last, dict) and isinstance(last.get("epoch"), int) else len(history)


def count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))


# ---------------------------------------------------------------- estimates


def add_estimates(status: RunStatus, cfg: PipelineConfig) -> None:
    """The plan of ``reclm run --dry-run`` and the time left of each stage that would run. The dataset is
    loaded only when a stage is left to run (its split's counts; the prompts only for LLM stages)."""
    from reclm.pipeline import estimate as est
    from reclm.pipeline.run import make_pipeline

    pipeline = make_pipeline(cfg, status.root)
    plans = pipeline.plan()
    pending = {p.stage.name for p in plans if p.action == "run"}
    size = data_size(cfg, status.root, pending) if pending else None
    for plan, stage in zip(plans, status.stages, strict=True):
        stage.plan, stage.reason = plan.action, plan.reason
        if plan.action != "run" or size is None or plan.stage.estimate is None:
            stage.left = 0.0 if plan.action != "run" else None
            continue
        guess = stage_left(pipeline, plan, plans, size, stage)
        stage.left, stage.basis = guess.seconds, guess.basis
    status.estimated = True
    if size is not None:
        where = "the run's saved split" if size.measured else "the split this config makes"
        factor, why = est.speed_basis()
        status.note = (
            f"estimates from {where}; default speeds x{factor:.2f} ({why}); CF: epochs as this run's finished "
            "runs of each backbone took, else the cap (an upper bound)"
        )


def data_size(cfg: PipelineConfig, root: Path, pending: set[str]) -> Any:
    from reclm.pipeline import estimate as est

    if pending & PROMPT_STAGES:
        return est.data_size(cfg, root)
    data, split, saved = est.split_of(cfg, root)
    stats = split.stats()
    interactions = stats["train"] + stats["valid"] + stats["test"]
    return est.DataSize(data.n_users, data.n_items, interactions, stats["train"], saved)


def stage_left(pipeline: Any, plan: StagePlan, plans: list[StagePlan], size: Any, status: StageStatus) -> Estimate:
    """As ``dry_run`` prices a stage, less what its kept work folder already holds: a training stage from
    its checkpoint's step, profiles less those cached, CF less the runs (and epochs) done; another stage
    running now less the time it has run."""
    from reclm.pipeline import estimate as est

    cfg, root, name = pipeline.config, pipeline.root, plan.stage.name
    progress, key = status.progress, root / ".work" / f"{plan.stage.folder}.key"
    kept = progress is not None and key.is_file() and key.read_text() == plan.input_hash
    rerun = {p.stage.name for p in plans if p.action == "run"}
    left = est.left_to_run(plan.stage, cfg, root, size, pipeline.speeds, plan.input_hash, rerun)
    if left.step is not None and progress is not None:
        progress.step, progress.steps = left.step, getattr(cfg.llm, name).steps
    if left.step is not None or left.cached:
        return left.estimate
    if name == "train_cf" and kept and progress is not None:
        return cf_left(cfg, size, pipeline.speeds, progress, root / ".work" / plan.stage.folder)
    guess = left.estimate
    if status.running_for is not None:
        guess.seconds = max(0.0, guess.seconds - status.running_for)
        guess.basis += ", less the time it has run"
    return guess


@dataclass
class CFHistory:
    """What one CF run's ``history.json`` shows: the mean seconds of an epoch (training and evaluation), the
    epochs trained and whether the run is committed (then ``epochs`` is where it stopped)."""

    epoch_seconds: float
    epochs: int
    finished: bool


def cf_histories(work: Path) -> dict[str, CFHistory]:
    """Every CF run of the work folder with at least one epoch in its history, committed or in progress."""
    found: dict[str, CFHistory] = {}
    for path in sorted(work.glob("*/history.json")):
        history = read_json(path)
        if not isinstance(history, list) or not all(isinstance(e, dict) for e in history) or not history:
            continue
        seconds = [float(e.get("train_seconds") or 0.0) + float(e.get("eval_seconds") or 0.0) for e in history]
        finished = not path.parent.name.endswith(".partial")
        found[unit_name(work, path.parent)] = CFHistory(sum(seconds) / len(seconds), len(history), finished)
    return found


def resumes_at(name: str, progress: Progress, work: Path) -> int:
    """Epochs a pending CF run keeps: those of its saved checkpoint (none saved: it starts again)."""
    if not (work / f"{name}.partial" / "checkpoint.pt").is_file():
        return 0
    return progress.units_started.get(name) or 0


def cf_left(cfg: PipelineConfig, size: Any, speeds: Any, progress: Progress, work: Path) -> Estimate:
    """The CF runs not committed yet. Where this run's CF histories show how long an epoch of a backbone takes
    (the run's own, else another run of its backbone) the runs are priced from them, at as many epochs as the
    longest committed run of the backbone took (else the epoch cap), summed and shared among the runs at once;
    the others at the dry run's price for their full epoch count (an upper bound)."""
    from reclm.pipeline import estimate as est
    from reclm.pipeline.cf_jobs import job_plan
    from reclm.pipeline.stages.cf import cf_runs

    histories, runs = cf_histories(work), cf_runs(cfg)
    backbone_of = {run["name"]: run["backbone"] for run in runs}
    pending = [run for run in runs if run["name"] not in progress.units_done]
    measured, unmeasured, epoch_pairs = 0.0, 0, {}
    for run in pending:
        backbone, own = run["backbone"], histories.get(run["name"])
        cap = (cfg.cf.params | cfg.cf.per_backbone.get(backbone, {})).get("epochs", est.CF_DEFAULT_EPOCHS)
        done = resumes_at(run["name"], progress, work)
        peers = [h for name, h in histories.items() if backbone_of.get(name) == backbone and name != run["name"]]
        seconds = own.epoch_seconds if own else (sum(h.epoch_seconds for h in peers) / len(peers) if peers else None)
        if seconds is None:
            unmeasured += 1
            share = max(0.0, 1 - done / cap) if cap else 0.0
            epoch_pairs[backbone] = epoch_pairs.get(backbone, 0.0) + est.cf_epoch_pairs(cfg, size, backbone) * share
            continue
        stopped = [h.epochs for h in peers if h.finished]
        expected = min(cap, max(stopped)) if stopped else cap
        measured += seconds * max(expected - done, 1 if expected else 0)
    jobs, _ = job_plan(cfg.cf.jobs, str(cfg.cf.params.get("device", "auto")), max(len(pending), 1))
    default, basis = est.cf_estimate("train_cf", cfg, size, epoch_pairs, speeds) if epoch_pairs else (0.0, "")
    if not unmeasured:
        basis = "this run's CF epochs"
    elif measured:
        basis = f"this run's CF epochs, {basis} for {unmeasured} run(s)"
    return Estimate(measured / jobs + default, 0, sum(epoch_pairs.values()), "epoch (CF runs)", basis)


def to_json(status: RunStatus) -> str:
    return json.dumps(status.to_dict(), indent=2, default=str)


__all__ = ["Progress", "RunStatus", "StageStatus", "lock_held", "run_status", "to_json"]
