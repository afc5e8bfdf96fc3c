"""The pipeline engine: stages, manifests, crash-safe outputs and resume.

A stage's *input hash* covers its code version, the config subset it reads, the *output hashes* of
the stages it needs, and the content of the external files it reads (``reclm.pipeline.hashing``). A
stage is skipped when ``RUN/manifests/<stage>.json`` is complete, has the same input hash, and the
output folder still holds exactly the files it recorded. Because downstream keys use upstream
*output* hashes, a stage that reruns and writes the same bytes does not invalidate anything after it.

Crash safety: a stage writes into ``RUN/.work/<folder>``; only when it returns is the old output
moved aside, the new one renamed into place, and the manifest written (the manifest is the commit
point). A stage that crashes leaves its work folder; the next run with the same input hash resumes
in it (``ctx.resumed``), so stages with their own resume logic (generation caches, per-run units)
lose nothing. ``ctx.unit`` gives the same guarantee to sub-units of a stage (one CF run, one
profile variant) and reuses units of the previous output whose key is unchanged. Every rename that
publishes a result (``publish``) comes after an fsync of what it publishes and before one of its folder,
so a power loss cannot leave empty files behind a manifest or marker that says complete.

Around it: ``hashing`` (content hashes), ``memory`` (peak memory, CPU time), ``speed`` (the speed
book a finished stage teaches) and ``formatting`` (its progress lines).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console

from reclm.cachekeys import every_field
from reclm.pipeline.config import PipelineConfig, stable_hash
from reclm.pipeline.formatting import format_cost, now
from reclm.pipeline.hashing import describe_outputs, outputs_hash, outputs_intact, path_hash
from reclm.pipeline.memory import PeakMemory, cpu_seconds
from reclm.pipeline.speed import SpeedBook
from reclm.rundir import RunDir
from reclm.utils import fsync_path, fsync_tree, publish, read_json, write_text_atomic

MANIFEST_VERSION = 1
PACKAGES = (
    "reclm",
    "torch",
    "numpy",
    "scipy",
    "transformers",
    "peft",
    "trl",
    "sentence-transformers",
    "ctranslate2",
    "pydantic",
)
UNIT_MARKER = ".unit.json"
PARTIAL_MARKER = ".unit-partial.json"  # the key of a unit's folder while it is being written


class StageError(RuntimeError):
    """A stage could not run; the message is one line for the user."""


class StageUnavailable(StageError):
    """The code a stage needs is not part of this installation yet."""


# ---------------------------------------------------------------- package versions (manifests record them)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


# ---------------------------------------------------------------- stages and their context


@dataclass
class Estimate:
    """Dry-run estimate of one stage on this machine."""

    seconds: float
    tokens: int = 0
    units: float = 0
    unit: str = ""
    basis: str = "default"  # "default" constants or "measured" on this machine


@dataclass
class Stage:
    """One pipeline stage. ``run(ctx)`` writes into ``ctx.out`` and may return a summary dict with
    ``tokens`` (int or {kind: int}) and ``units`` (work done, for speed calibration)."""

    name: str
    folder: str
    run: Callable[[StageContext], dict[str, Any] | None]
    needs: tuple[str, ...] = ()
    config: Callable[[PipelineConfig], Any] = lambda cfg: {}
    files: Callable[[PipelineConfig], list[Path]] = lambda cfg: []
    enabled: Callable[[PipelineConfig], bool] = lambda cfg: True
    estimate: Callable[[PipelineConfig, Any], Estimate] | None = None
    version: int = 1
    description: str = ""


@dataclass
class Unit:
    """A sub-result of a stage (one CF run, one profile variant) committed on its own."""

    path: Path
    key: str
    done: bool
    older: frozenset[str] = frozenset()  # older keys of the same work (reclm.cachekeys)

    def scratch(self) -> Path:
        """The folder to write the unit into; ``commit()`` moves it into place. An interrupted attempt's
        folder for the same key is kept (a CF run resumes from the state it saved there); any other
        is emptied."""
        tmp = self.path.with_name(self.path.name + ".partial")
        if unit_key(tmp, PARTIAL_MARKER) in {self.key, *self.older}:
            return tmp
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / PARTIAL_MARKER).write_text(json.dumps({"key": self.key}))
        return tmp

    def commit(self) -> None:
        """Mark the finished folder complete, then move it into place. A kill between the two leaves a
        ``.partial`` folder marked complete, which ``StageContext.unit`` moves into place (before, the
        in-progress marker went first, and a kill there made the next run delete a finished unit)."""
        tmp = self.path.with_name(self.path.name + ".partial")
        fsync_tree(tmp)  # the outputs reach the disk before the marker that says they are complete
        write_marker(tmp / UNIT_MARKER, self.key)
        shutil.rmtree(self.path, ignore_errors=True)
        tmp.rename(self.path)
        fsync_path(self.path.parent)
        (self.path / PARTIAL_MARKER).unlink(missing_ok=True)
        self.done = True


def write_marker(path: Path, key: str) -> None:
    write_text_atomic(path, json.dumps({"key": key}))


def unit_key(path: Path, marker: str = UNIT_MARKER) -> str | None:
    try:
        return json.loads((path / marker).read_text())["key"]
    except (OSError, ValueError, KeyError):
        return None


@dataclass
class StageContext:
    config: PipelineConfig
    root: Path  # the run directory
    out: Path  # where this stage writes (its work folder)
    previous: Path | None  # the last completed output of this stage, for unit reuse
    resumed: bool  # the work folder was kept from an interrupted attempt with the same inputs
    console: Console
    shared: dict[str, Any]  # objects loaded once per pipeline process (dataset, split)
    stage: str = ""
    inputs: dict[str, Any] = field(default_factory=dict)  # config subset, upstream output hashes, file hashes
    notes: list[str] = field(default_factory=list)

    @property
    def run(self) -> RunDir:
        """The run directory as upstream stages left it (this stage's own folder is ``out``)."""
        return RunDir(self.root)

    def data(self):
        """(RecDataset, Split) of this run, loaded once."""
        if "data" not in self.shared:
            self.shared["data"] = RunDir(self.root).load()
        return self.shared["data"]

    def unit(self, relative: str, key: Any, *older: Any) -> Unit:
        """``out/relative`` as a cached unit: done when it (or the previous output's copy) was
        committed with the same key, or one of the ``older`` keys of the same work."""
        digest = key if isinstance(key, str) else stable_hash(key)
        accepted = frozenset({digest, *(k if isinstance(k, str) else stable_hash(k) for k in older)})
        path = self.out / relative
        if path.is_dir() and unit_key(path) in accepted:
            return Unit(path, digest, True)
        finished = path.with_name(path.name + ".partial")
        if finished.is_dir() and unit_key(finished) in accepted:  # committed, but killed before the rename
            shutil.rmtree(path, ignore_errors=True)
            publish(finished, path)
            return Unit(path, digest, True)
        old = self.previous / relative if self.previous else None
        if old is not None and old.is_dir() and unit_key(old) in accepted:
            tmp = path.with_name(path.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(old, tmp)
            shutil.rmtree(path, ignore_errors=True)
            publish(tmp, path)
            return Unit(path, digest, True)
        return Unit(path, digest, False, accepted - {digest})

    def note(self, text: str) -> None:
        self.notes.append(text)


# ---------------------------------------------------------------- the runner


@dataclass
class StagePlan:
    stage: Stage
    action: str  # "cached" | "run" | "off" | "skip" (not selected by --only)
    reason: str = ""
    input_hash: str | None = None
    inputs: dict[str, Any] | None = None


@dataclass
class StageOutcome:
    name: str
    action: str  # "cached" | "ran" | "off" | "skip"
    seconds: float = 0.0
    manifest: dict[str, Any] | None = None


class Pipeline:
    """Runs stages in order into one run directory, skipping those whose inputs are unchanged."""

    def __init__(
        self,
        config: PipelineConfig,
        root: str | Path,
        stages: list[Stage],
        console: Console | None = None,
        speeds: SpeedBook | None = None,
        speed_setup: Callable[[str], str] | None = None,
        speed_local: Callable[[str], bool] | None = None,
    ):
        self.config = config
        self.speed_setup = speed_setup or (lambda stage: "")
        self.speed_local = speed_local or (lambda stage: True)
        self.root = Path(root)
        self.stages = stages
        self.by_name = {s.name: s for s in stages}
        self.console = console or Console()
        self.shared: dict[str, Any] = {}
        self.speeds = speeds
        for stage in stages:
            for need in stage.needs:
                if need not in self.by_name:
                    raise ValueError(f"stage {stage.name!r} needs unknown stage {need!r}")

    # ------------------------------------------------------------ manifests

    def manifest_path(self, name: str) -> Path:
        return self.root / "manifests" / f"{name}.json"

    def manifest(self, name: str) -> dict[str, Any] | None:
        path = self.manifest_path(name)
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def write_manifest(self, name: str, record: dict[str, Any]) -> None:
        path = self.manifest_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(record, indent=2, default=str))

    # ------------------------------------------------------------ planning

    def stage_inputs(self, stage: Stage, upstream: dict[str, str]) -> dict[str, Any]:
        return {
            "stage": stage.name,
            "version": stage.version,
            "manifest_version": MANIFEST_VERSION,
            "config": stage.config(self.config),
            # .get: with --only, a later stage's upstream may be incomplete (it is skipped then)
            "upstream": {need: upstream.get(need) for need in stage.needs},
            "files": {str(p): path_hash(Path(p)) for p in stage.files(self.config)},
        }

    def stage_key(self, stage: Stage, upstream: dict[str, str]) -> tuple[dict[str, Any], str, frozenset[str]]:
        """The stage's inputs, their hash, and every hash a cached output may carry for the same work (the
        one from before ``added_later`` fields left the keys, reclm.cachekeys)."""
        inputs = self.stage_inputs(stage, upstream)
        with every_field():
            older_config = stage.config(self.config)
        input_hash = stable_hash(inputs)
        return inputs, input_hash, frozenset({input_hash, stable_hash({**inputs, "config": older_config})})

    def cached_output(self, stage: Stage, accepted: Collection[str], restore: bool = False) -> dict[str, Any] | None:
        """The manifest of a complete output under one of the ``accepted`` input hashes: in place, or parked
        while the stage was switched off (moved back when ``restore``)."""
        record = self.manifest(stage.name)
        if self.usable(record, accepted, self.root / stage.folder):
            return record
        parked_record = read_json(self.parked / f"{stage.name}.json")
        if not self.usable(parked_record, accepted, self.parked / stage.folder):
            return None
        if restore:
            shutil.rmtree(self.root / stage.folder, ignore_errors=True)
            publish(self.parked / stage.folder, self.root / stage.folder)
            self.write_manifest(stage.name, parked_record)  # type: ignore[arg-type]
            (self.parked / f"{stage.name}.json").unlink()
        return parked_record

    @staticmethod
    def usable(record: dict[str, Any] | None, accepted: Collection[str], folder: Path) -> bool:
        if not record or record.get("status") != "complete" or record.get("input_hash") not in accepted:
            return False
        return outputs_intact(folder, record.get("outputs", {}))

    @property
    def parked(self) -> Path:
        return self.root / ".off"

    def park(self, stage: Stage) -> None:
        """A stage switched off: its output leaves the run directory (so that no later stage reads a
        stale folder) and waits in ``.off/`` to be restored if the stage is switched on unchanged."""
        folder = self.root / stage.folder
        record = self.manifest(stage.name)
        if folder.exists():
            self.parked.mkdir(exist_ok=True)
            shutil.rmtree(self.parked / stage.folder, ignore_errors=True)
            if record and record.get("status") == "complete":
                publish(folder, self.parked / stage.folder)
                write_text_atomic(self.parked / f"{stage.name}.json", json.dumps(record, indent=2, default=str))
            else:
                shutil.rmtree(folder)
        self.write_manifest(stage.name, {"stage": stage.name, "status": "off"})

    def plan(self, force: set[str] | None = None, only: str | None = None) -> list[StagePlan]:
        """What ``run`` would do now: a stage runs when forced, when its inputs changed, or when an
        upstream stage runs (its output is not known before)."""
        force = force or set()
        known: dict[str, str | None] = {}
        plans = []
        for stage in self.stages:
            if not stage.enabled(self.config):
                known[stage.name] = "off"
                plans.append(StagePlan(stage, "off", "switched off in the config"))
                continue
            pending = [n for n in stage.needs if known.get(n) is None]
            if pending:
                known[stage.name] = None
                action = "skip" if only and stage.name != only else "run"
                plans.append(StagePlan(stage, action, f"after {pending[-1]}"))
                continue
            inputs, input_hash, accepted = self.stage_key(stage, known)  # type: ignore[arg-type]
            record = self.cached_output(stage, accepted)
            if only and stage.name != only:
                known[stage.name] = record["output_hash"] if record else None
                plans.append(StagePlan(stage, "skip", "" if record else "not complete", input_hash, inputs))
            elif record and stage.name not in force:
                known[stage.name] = record["output_hash"]
                plans.append(StagePlan(stage, "cached", "inputs unchanged", input_hash, inputs))
            else:
                known[stage.name] = None
                reason = "forced" if stage.name in force else self.why_run(stage, input_hash, inputs)
                plans.append(StagePlan(stage, "run", reason, input_hash, inputs))
        return plans

    def why_run(self, stage: Stage, input_hash: str, inputs: dict[str, Any]) -> str:
        record = self.manifest(stage.name)
        if record is None:
            return "never ran"
        if record.get("status") != "complete":
            return f"last attempt {record.get('status', 'unknown')}"
        if record.get("input_hash") != input_hash:
            old = record.get("inputs", {})
            changed = [k for k in ("config", "upstream", "files", "version") if old.get(k) != inputs.get(k)]
            if "upstream" in changed:
                ups = [n for n, h in inputs["upstream"].items() if old.get("upstream", {}).get(n) != h]
                changed[changed.index("upstream")] = "output of " + ", ".join(ups)
            return "changed: " + ", ".join(changed) if changed else "inputs changed"
        return "outputs missing or modified"

    # ------------------------------------------------------------ running

    def run(
        self, from_stage: str | None = None, only: str | None = None, on_locked: Callable[[], None] | None = None
    ) -> list[StageOutcome]:
        """Run the stages; ``on_locked`` runs first once this process holds the run's lock (a run refused
        by the lock changes nothing in the folder)."""
        for name in (from_stage, only):
            if name is not None and name not in self.by_name:
                raise StageError(f"unknown stage {name!r}: expected one of {', '.join(self.by_name)}")
        force: set[str] = set()
        if from_stage:
            start = [s.name for s in self.stages].index(from_stage)
            force = {s.name for s in self.stages[start:]}
        if only:
            force = {only}
            if not self.by_name[only].enabled(self.config):
                raise StageError(f"stage {only!r} is switched off in the config")
        self.root.mkdir(parents=True, exist_ok=True)
        outcomes: list[StageOutcome] = []
        with self.locked():
            if on_locked is not None:
                on_locked()
            known: dict[str, str] = {}
            for index, stage in enumerate(self.stages, 1):
                label = f"[{index:>2}/{len(self.stages)}] {stage.name:<12}"
                if not stage.enabled(self.config):
                    known[stage.name] = "off"
                    self.park(stage)
                    outcomes.append(StageOutcome(stage.name, "off"))
                    self.console.print(f"{label} off", highlight=False)
                    continue
                inputs, input_hash, accepted = self.stage_key(stage, known)
                record = self.cached_output(stage, accepted, restore=stage.name not in force)
                if only and stage.name != only:
                    if stage.name in {n for s in self.stages if s.name == only for n in s.needs} and not record:
                        raise StageError(
                            f"--only {only}: stage {stage.name!r} is not complete for this config; "
                            f"run without --only first"
                        )
                    if record:
                        known[stage.name] = record["output_hash"]
                    outcomes.append(StageOutcome(stage.name, "skip"))
                    continue
                if record and stage.name not in force:
                    known[stage.name] = record["output_hash"]
                    outcomes.append(StageOutcome(stage.name, "cached", record.get("seconds", 0.0), record))
                    self.console.print(f"{label} cached", highlight=False)
                    continue
                record = self.execute(stage, inputs, input_hash, accepted)
                known[stage.name] = record["output_hash"]
                outcomes.append(StageOutcome(stage.name, "ran", record["seconds"], record))
                self.console.print(f"{label} done   {format_cost(record)}", highlight=False)
        return outcomes

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        handle = (self.root / ".lock").open("w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise StageError(f"{self.root}: another `reclm run` is using this run directory") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

    def execute(
        self, stage: Stage, inputs: dict[str, Any], input_hash: str, accepted: Collection[str] = ()
    ) -> dict[str, Any]:
        accepted = {input_hash, *accepted}
        work_root = self.root / ".work"
        work = work_root / stage.folder
        key_file = work_root / f"{stage.folder}.key"
        resumed = work.is_dir() and key_file.is_file() and key_file.read_text() in accepted
        if not resumed:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
        key_file.write_text(input_hash)
        earlier = self.earlier_attempts(stage.name, accepted) if resumed else []
        final = self.root / stage.folder
        record: dict[str, Any] = {
            "stage": stage.name,
            "status": "running",
            "folder": stage.folder,
            "config_hash": stable_hash(inputs["config"]),
            "input_hash": input_hash,
            "inputs": inputs,
            "packages": package_versions(),
            "host": {"cores": len(os.sched_getaffinity(0)), "machine": platform.machine()},
            "started": now(),
            "resumed": resumed,
        }
        if earlier:  # kept while this attempt runs, so a kill -9 now does not lose them (reclm status shows them)
            record["attempts"] = earlier
        self.write_manifest(stage.name, record)
        ctx = StageContext(
            config=self.config,
            root=self.root,
            out=work,
            previous=final if final.is_dir() else None,
            resumed=resumed,
            console=self.console,
            shared=self.shared,
            stage=stage.name,
            inputs=inputs,
        )
        start, cpu_start = time.perf_counter(), cpu_seconds()
        try:
            with PeakMemory() as memory:
                summary = stage.run(ctx) or {}
        except BaseException as exc:
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            spent = time.perf_counter() - start, cpu_seconds() - cpu_start
            attempts = earlier + [attempt(record["started"], status, *spent, memory.rss_mb)]
            record.update(status=status, error=f"{type(exc).__name__}: {exc}", **attempts_summary(attempts))
            self.write_manifest(stage.name, record)
            if isinstance(exc, StageError | KeyboardInterrupt):
                raise
            raise StageError(f"stage {stage.name!r} failed: {type(exc).__name__}: {exc}") from exc
        spent = time.perf_counter() - start, cpu_seconds() - cpu_start
        attempts = earlier + [attempt(record["started"], "complete", *spent, memory.rss_mb)]
        self.swap_into_place(work, final)
        key_file.unlink(missing_ok=True)
        files = describe_outputs(final)
        tokens = summary.pop("tokens", 0)
        record.update(
            status="complete",
            finished=now(),
            **attempts_summary(attempts),
            tokens=tokens if isinstance(tokens, dict) else {"total": int(tokens)},
            tokens_total=sum(tokens.values()) if isinstance(tokens, dict) else int(tokens),
            peak_gpu_memory_mb=None if memory.gpu_mb is None else round(memory.gpu_mb, 1),
            units=summary.pop("units", None),
            unit=summary.pop("unit", None),
            summary=summary,
            notes=ctx.notes,
            output_hash=outputs_hash(files),
            outputs=files,
        )
        self.write_manifest(stage.name, record)
        if self.speeds is not None:
            self.speeds.record(stage.name, record, self.speed_setup(stage.name), self.speed_local(stage.name))
        return record

    def earlier_attempts(self, name: str, accepted: Collection[str]) -> list[dict[str, Any]]:
        """The interrupted or failed attempts whose kept work this attempt resumes: their time counts too,
        so a stage resumed across sessions reports (and teaches the speed book) its whole cost."""
        old = self.manifest(name)
        if not old or old.get("input_hash") not in accepted:
            return []
        if old.get("status") == "running":  # killed (we hold the lock): its own time is unknown, earlier ones kept
            return list(old.get("attempts", []))
        if old.get("status") not in ("interrupted", "failed"):
            return []
        if "attempts" in old:
            return list(old["attempts"])
        return [attempt(old.get("started", ""), old["status"], float(old.get("seconds", 0.0)), None, None)]

    def swap_into_place(self, work: Path, final: Path) -> None:
        """Replace ``final`` with ``work``: the old output is moved aside first, so at no moment
        does a half-written folder sit at ``final`` (the manifest, written after, commits)."""
        trash = self.root / ".work" / f"{final.name}.old"
        shutil.rmtree(trash, ignore_errors=True)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            final.rename(trash)
        publish(work, final)
        shutil.rmtree(trash, ignore_errors=True)


def attempt(
    started: str, status: str, seconds: float, cpu: float | None, peak_memory_mb: float | None
) -> dict[str, Any]:
    return {
        "started": started,
        "status": status,
        "seconds": round(seconds, 3),
        "cpu_seconds": None if cpu is None else round(cpu, 3),
        "peak_memory_mb": None if not peak_memory_mb else round(peak_memory_mb, 1),
    }


def attempts_summary(attempts: list[dict[str, Any]]) -> dict[str, Any]:
    """A stage's cost over all its attempts: seconds summed, memory the highest peak."""
    peaks = [a["peak_memory_mb"] for a in attempts if a.get("peak_memory_mb")]
    return {
        "seconds": round(sum(float(a["seconds"]) for a in attempts), 3),
        "cpu_seconds": round(sum(float(a.get("cpu_seconds") or 0.0) for a in attempts), 3),
        "peak_memory_mb": max(peaks) if peaks else None,
        "attempts": attempts,
    }
