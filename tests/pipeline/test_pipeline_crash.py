"""Crash safety of ``reclm run`` and ``reclm train-cf`` with real processes and real ``kill -9`` (issue 21:
items 4, 6 and 7, and the kill test).

- ``kill -9`` of ``reclm run`` at seeded random moments, several times: after each kill no stage is marked
  complete with missing or torn outputs and no CF run folder that says finished (a ``.unit.json`` or a
  ``metrics.json``) holds a torn model; the resume then ends with the uninterrupted run's results.
- The CF worker processes die with the ``reclm run`` that spawned them.
- ``train-cf`` killed while it writes ``model.pt`` leaves no folder that the report or ``serve`` takes as
  a finished run.
- Every rename that publishes a result comes after an fsync of what it publishes (traced with strace).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from test_pipeline_end_to_end import FAST_CF, tiny_config

CLI = "from reclm.cli.main import app; app()"
KILLS = 5
KILL_SEED = 128  # kills aimed at teacher, encode (twice), train_cf and report
WORK_STAGES = ("prepare", "teacher", "profiles", "encode", "train_cf", "report")  # the stages on in this run
CF_OUTPUTS = {"metrics.json", "history.json", "config.yaml", "per_user.csv", "model.pt"}

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds processes through /proc")


def crash_config(dataset: Path, out: Path, jobs: int = 1, **params) -> dict:
    """The end-to-end test's tiny run (offline teacher, no LLM training) with three BiasMF runs, trained in
    the pipeline's process (``jobs: 1``) or ``jobs`` at a time in worker processes."""
    cf = {"features": ["none", "text", "text+profiles"], "side_ablation": False, "jobs": jobs}
    config = tiny_config(dataset, out, **cf, backbones=["bias-mf"], params={**FAST_CF, **params})
    return {**config, "report": {"examples": 1}}


def write_config(path: Path, dataset: Path, out: Path, jobs: int = 1, **params) -> Path:
    path.write_text(yaml.safe_dump(crash_config(dataset, out, jobs, **params)))
    return path


def start(*args: str, script: str = CLI) -> subprocess.Popen:
    """The CLI in a new process (its output goes to a file: a pipe nobody reads could block it)."""
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed by finish()
    child = subprocess.Popen([sys.executable, "-c", script, *args], stdout=log, stderr=subprocess.STDOUT, text=True)
    child.log = log  # type: ignore[attr-defined]
    return child


def finish(child: subprocess.Popen, timeout: float = 300) -> str:
    """Wait for ``child`` (killed if it takes longer than ``timeout``); its output ("" after the first call)."""
    log = child.log  # type: ignore[attr-defined]
    try:
        child.wait(timeout=timeout)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if log.closed:
        return ""
    log.seek(0)
    output = log.read()
    log.close()
    return output


def run_to_end(*args: str, timeout: float = 300) -> str:
    child = start(*args)
    output = finish(child, timeout)
    assert child.returncode == 0, output
    return output


# ---------------------------------------------------------------- processes


def parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def descendants(pid: int) -> list[int]:
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    parents = {p: parent_of(p) for p in pids}
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid``, of its children it reaped and of its live descendants: the clock the kills go
    by, so that they land at the same points of the run however loaded the machine is."""
    total = 0.0
    for index, process in enumerate([pid, *descendants(pid)]):
        try:
            fields = Path(f"/proc/{process}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11 : 15 if index == 0 else 13])  # utime stime (cutime cstime)
    return total / os.sysconf("SC_CLK_TCK")


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------- what a kill may leave


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_consistent(root: Path) -> list[str]:
    """No stage marked complete with missing, extra or changed outputs; every CF run folder that says it is
    finished holds every output and a model that loads. Returns the stages marked running (killed there)."""
    from reclm.cf.trainer import load_model

    running = []
    for manifest in sorted((root / "manifests").glob("*.json")):
        record = json.loads(manifest.read_text())  # a torn manifest raises here
        if record["status"] == "running":
            running.append(record["stage"])
        if record["status"] != "complete":
            continue
        folder = root / record["folder"]
        present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
        assert present == set(record["outputs"]), f"{record['stage']}: outputs differ from its complete manifest"
        for name, info in record["outputs"].items():
            assert sha256(folder / name) == info["sha256"], f"{record['stage']}: {name} is not what was recorded"
    marked = (p.parent for name in (".unit.json", "metrics.json") for p in root.rglob(name))
    for folder in sorted({f for f in marked if f.parent.name == "cf"}):  # cf/<run>, .work/cf/<run>(.partial)
        files = {p.name for p in folder.iterdir()}
        assert files >= CF_OUTPUTS, f"{folder} says finished but lacks {sorted(CF_OUTPUTS - files)}"
        json.loads((folder / "metrics.json").read_text())
        load_model(folder / "model.pt")
    return running


def stage_record(root: Path, stage: str) -> dict:
    path = root / "manifests" / f"{stage}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def cf_results(root: Path) -> dict[str, dict]:
    runs = json.loads((root / "cf" / "runs.json").read_text())
    out = {}
    for run in runs:
        metrics = json.loads((root / "cf" / run["name"] / "metrics.json").read_text())
        out[run["name"]] = {k: metrics[k] for k in ("valid", "test", "zero_shot", "best_epoch", "epochs_run")}
    return out


def deterministic_outputs(root: Path) -> dict[str, str]:
    """Output hashes of the stages whose bytes do not depend on timing or the run's path, and the profiles."""
    hashes = {stage: json.loads((root / "manifests" / f"{stage}.json").read_text()) for stage in ("prepare", "encode")}
    out = {stage: record["output_hash"] for stage, record in hashes.items()}
    return out | {name: sha256(root / "profiles" / name) for name in ("users.jsonl", "items.jsonl")}


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_dataset):
    """The uninterrupted run: (dataset, run directory)."""
    base = tmp_path_factory.mktemp("crash-reference")
    run_to_end("run", str(write_config(base / "run.yaml", tiny_dataset, base / "run")))
    return tiny_dataset, base / "run"


def run_and_kill(config: Path, manifest: Path, cpu_seconds_in: float) -> bool:
    """``reclm run config``, killed -9 once it has spent ``cpu_seconds_in`` CPU seconds since it began the
    stage of ``manifest`` (rewritten when a stage starts); False when it finished first."""
    launched = time.time_ns()
    child = start("run", str(config))
    workers: list[int] | None = None
    try:
        began = None  # the run's CPU seconds when it began the stage
        while child.poll() is None:
            if began is None and manifest.is_file() and manifest.stat().st_mtime_ns >= launched:
                began = cpu_seconds(child.pid)
            if began is not None and cpu_seconds(child.pid) >= began + cpu_seconds_in:
                workers = descendants(child.pid)
                os.kill(child.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        if child.poll() is None:
            child.kill()  # killed above, or the test failed
        output = finish(child)
    if workers is not None:
        kill_all(workers)  # none with jobs: 1 (and none outlives it: item 4, tested below)
        return True
    assert child.returncode == 0, output
    return False


# ---------------------------------------------------------------- tests


def test_kill_9_at_random_moments_never_leaves_torn_results_and_the_resume_matches(reference, tmp_path):
    dataset, reference_root = reference
    root = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", dataset, root)
    rng = random.Random(KILL_SEED)
    stage_cpu = {s: stage_record(reference_root, s)["cpu_seconds"] for s in WORK_STAGES}
    killed_in: list[str] = []
    for _ in range(KILLS):
        pending = [s for s in WORK_STAGES if stage_record(root, s).get("status") != "complete"]
        target, fraction = rng.choice(pending), rng.random()  # a moment of the work left
        if not run_and_kill(config, root / "manifests" / f"{target}.json", fraction * stage_cpu[target]):
            break  # finished before its kill
        running = assert_consistent(root)
        killed_in.append(f"{target} +{fraction:.0%}: {','.join(running) or 'between stages'}")
    print(f"\nkills survived: {len(killed_in)} (target stage + share of its CPU: stage running) {killed_in}")
    assert len(killed_in) == KILLS
    output = run_to_end("run", str(config))
    assert assert_consistent(root) == []
    assert "finished in" in output
    assert deterministic_outputs(root) == deterministic_outputs(reference_root)
    assert cf_results(root) == cf_results(reference_root)


def test_cf_workers_die_with_a_killed_run(reference, tmp_path):
    """Item 4: the run is killed while its two workers train (runs of 100,000 epochs); the workers must
    not go on writing into the units' .partial folders that a restarted run resumes."""
    dataset, reference_root = reference
    root = tmp_path / "run"
    shutil.copytree(reference_root, root)  # every stage but train_cf and report stays cached
    config = write_config(tmp_path / "slow.yaml", dataset, root, jobs=2, epochs=100_000, patience=100_000)
    child = start("run", str(config))
    workers: list[int] = []
    spawned: list[int] = []  # every process under the run (workers, multiprocessing's resource tracker)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            training = list((root / ".work" / "cf").glob("*.partial/history.json"))
            workers = [p for p in descendants(child.pid) if "spawn_main" in cmdline(p)]
            if len(training) == 2 and len(workers) == 2:
                break
            time.sleep(0.2)
        assert len(workers) == 2 and child.poll() is None, "the two CF workers never started training"
        spawned = descendants(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        finish(child)
        deadline = time.monotonic() + 5
        while any(alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [p for p in workers if alive(p)]
        assert not survivors, f"CF workers {survivors} outlived the killed run"
    finally:
        if child.poll() is None:
            child.kill()
        finish(child)
        kill_all(workers + spawned)


KILL_DURING_MODEL_SAVE = """
import os, signal, sys

def kill_in_write_record(frame, event, arg):  # torch.save writes each record of model.pt
    if event == "c_call" and getattr(arg, "__name__", "") == "write_record":
        os.kill(os.getpid(), signal.SIGKILL)

def audit(event, args):  # per_user.csv is the file written just before model.pt
    if event == "open" and str(args[0]).endswith("per_user.csv") and "w" in str(args[1]):
        sys.setprofile(kill_in_write_record)

sys.addaudithook(audit)
from reclm.cli.main import app
app()
"""


def test_train_cf_killed_while_writing_its_model_leaves_no_finished_looking_run(reference, tmp_path):
    """Item 6: a kill -9 in the middle of writing model.pt. Before, metrics.json was already there (the
    report's and serve's sign of a finished run) beside a torn model.pt that serve picked and failed to load."""
    from reclm.serve.runinfo import read_model_choice

    _, reference_root = reference
    out = tmp_path / "bias-mf-none"
    args = ["train-cf", "--run", str(reference_root), "--backbone", "bias-mf", "--features", "none"]
    args += ["--epochs", "2", "--dim", "8", "--batch-size", "128", "--out", str(out), "--quiet"]
    child = start(*args, script=KILL_DURING_MODEL_SAVE)
    output = finish(child)
    assert child.returncode == -signal.SIGKILL, f"not killed while saving the model:\n{output}"
    assert (out / "model.pt").exists() or (out / "model.pt.tmp").exists(), "killed before the model was written"
    assert not (out / "metrics.json").exists(), "a half-written run looks finished"
    assert read_model_choice(out) is None


PUBLISH_SCRIPT = """
import sys
from pathlib import Path
from rich.console import Console
from reclm.pipeline.engine import Pipeline, Stage
from reclm.pipeline.config import PipelineConfig

def body(ctx):
    (ctx.out / "runs.json").write_text("[]")
    for name in ("a", "b"):
        unit = ctx.unit(name, {"name": name})
        scratch = unit.scratch()
        (scratch / "metrics.json").write_text("{}")
        (scratch / "model.pt").write_bytes(b"weights")
        unit.commit()

Pipeline(PipelineConfig(), Path(sys.argv[1]), [Stage("train_cf", "cf", body)], Console(quiet=True)).run()
"""
SYSCALL = re.compile(r"^(\w+)\((.*)\)\s+=\s+(-?\d+)(?:<([^>]*)>)?")


def parse_trace(text: str) -> list[tuple[str, str, list[str], list[str], str]]:
    """Per successful call: (name, arguments, their quoted strings, their <fd paths>, <path> of the result)."""
    calls = []
    for line in text.splitlines():
        found = SYSCALL.match(line.strip())
        if found and int(found.group(3)) >= 0:
            arguments = found.group(2)
            quoted, fds = re.findall(r'"([^"]*)"', arguments), re.findall(r"<([^>]*)>", arguments)
            calls.append((found.group(1), arguments, quoted, fds, found.group(4) or ""))
    return calls


def renamed(name: str, src: str, dst: str) -> str:
    """``name`` after ``src`` was renamed to ``dst``."""
    return dst + name[len(src) :] if name == src or name.startswith(src + "/") else name


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_every_publishing_rename_comes_after_an_fsync_of_what_it_publishes(tmp_path):
    """Item 7: a unit's files, its marker, the stage folder and the manifests are flushed to disk before
    the rename that publishes them, and the folder holding the new name after it (a power loss cannot
    leave empty files behind a name that says complete)."""
    if subprocess.run(["strace", "-o", os.devnull, "true"], capture_output=True).returncode != 0:
        pytest.skip("strace cannot trace here")
    root, trace = (tmp_path / "run").resolve(), tmp_path / "trace.txt"
    command = ["strace", "-y", "-qq", "-s", "4096", "-o", str(trace)]
    command += ["-e", "trace=openat,open,creat,fsync,fdatasync,rename,renameat,renameat2"]
    subprocess.run([*command, sys.executable, "-c", PUBLISH_SCRIPT, str(root)], check=True)
    written: dict[str, int] = {}  # path -> index of its last open for writing
    synced: dict[str, int] = {}  # path -> index of its last fsync
    unsynced_folders: list[str] = []  # folders that got a new name and were not fsynced since
    renames = 0
    for index, (call, arguments, quoted, fds, result) in enumerate(parse_trace(trace.read_text())):
        if call in ("openat", "open", "creat") and re.search(r"O_WRONLY|O_RDWR|O_CREAT", arguments) and result:
            written[result] = index
        elif call in ("fsync", "fdatasync") and fds:
            synced[fds[0]] = index
            unsynced_folders = [f for f in unsynced_folders if f != fds[0]]
        elif call.startswith("rename") and quoted[0].startswith(str(root)):
            src, dst = quoted
            under = [name for name in written if name == src or name.startswith(src + "/")]
            for name in under:
                assert synced.get(name, -1) > written[name], f"{name} was renamed into {dst} before an fsync"
            renames += 1
            for table in (written, synced):  # the files live under the new name now
                for name in list(table):
                    table[renamed(name, src, dst)] = table.pop(name)
            unsynced_folders = [renamed(f, src, dst) for f in unsynced_folders] + [str(Path(dst).parent)]
    assert renames >= 6  # two units and their markers, the stage folder, the manifests
    assert not unsynced_folders, f"not fsynced after a rename into them: {unsynced_folders}"
