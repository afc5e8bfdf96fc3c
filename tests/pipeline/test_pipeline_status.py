"""``reclm status`` on real runs of the tiny dataset: one stopped in train_cf (a CF run committed, the next
stopped after two epochs, as Ctrl-C stops it), and the same run resumed by a `reclm run` in another process
that holds the lock while status reads it. Status writes nothing and never waits for the lock."""

from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from test_pipeline_end_to_end import tiny_config
from typer.testing import CliRunner

from reclm.cli.main import app
from reclm.pipeline.config import load_config
from reclm.pipeline.status import lock_held, run_status

RUNS = ["bias-mf-none-s1", "bias-mf-text-s1", "bias-mf-text+profiles-s1"]
OFF = ("sft", "neighbours", "collab", "reward", "rl", "item_side")  # the stages this run has off
STATES = {
    **dict.fromkeys(("prepare", "teacher", "profiles", "encode"), "complete"),
    **dict.fromkeys(OFF, "off"),
    "train_cf": "interrupted",
    "report": "not started",
}
# a `reclm run` in another process whose CF training waits (holding the run's lock) until it is stopped
HELD_RUN = """
import sys, time
from pathlib import Path
from reclm.pipeline import cf_jobs
from reclm.pipeline.config import load_config
from reclm.pipeline.run import run

def held(job, *args, **kwargs):
    Path(sys.argv[3]).write_text(job.name)
    time.sleep(300)

cf_jobs.train_job = held
run(load_config(sys.argv[1]), sys.argv[2])
"""


def status_config(dataset: Path, out: Path) -> dict:
    """The end-to-end test's tiny run (offline teacher, no LLM training) with three BiasMF runs in process."""
    cf = {"features": ["none", "text", "text+profiles"], "side_ablation": False, "jobs": 1}
    return {**tiny_config(dataset, out, **cf, backbones=["bias-mf"]), "report": {"examples": 1}}


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, tiny_dataset) -> tuple[Path, Path]:
    """(config, run): a real run stopped by an interrupt in its second CF run's second epoch."""
    from reclm.cf.trainer import Trainer
    from reclm.pipeline.run import run

    base = tmp_path_factory.mktemp("status")
    config, out = base / "tiny.yaml", base / "run"
    config.write_text(yaml.safe_dump(status_config(tiny_dataset, out)))
    original = Trainer.run_epoch

    def stop_in_second_run(self, loop):
        line = original(self, loop)
        if self.config.features == "text" and loop["epoch"] == 2:
            raise KeyboardInterrupt("stopped by the test")
        return line

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "run_epoch", stop_in_second_run)
        with pytest.raises(KeyboardInterrupt):
            run(load_config(config), out, Console(file=io.StringIO()))
    return config, out


def manifest(run: Path, stage: str) -> dict:
    return json.loads((run / "manifests" / f"{stage}.json").read_text())


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")}


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, ["status", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_a_run_stopped_in_train_cf_reads_back_from_its_manifests_and_work_folder(stopped):
    _, run = stopped
    before = snapshot(run)
    status = run_status(run, estimate=False)
    assert snapshot(run) == before, "status wrote into the run"
    assert not status.locked and not status.estimated and status.left is None
    assert {s.name: s.state for s in status.stages} == STATES
    by_name = {s.name: s for s in status.stages}
    for name in ("prepare", "teacher", "profiles", "encode"):
        assert by_name[name].seconds == manifest(run, name)["seconds"] > 0 and by_name[name].attempts == 1
    cf, record = by_name["train_cf"], manifest(run, "train_cf")
    assert record["status"] == "interrupted" and "stopped by the test" in record["error"]
    assert cf.seconds == record["attempts"][0]["seconds"] > 0 and cf.attempts == 1
    assert cf.progress is not None and cf.progress.resumable
    assert cf.progress.units_done == ["bias-mf-none-s1"] and cf.progress.units_total == len(RUNS)
    assert cf.progress.units_started == {"bias-mf-text-s1": 2}  # its history.json after two epochs
    assert by_name["report"].seconds == 0 and by_name["report"].progress is None


def mean_epoch_seconds(history: list[dict]) -> float:
    return sum(e["train_seconds"] + e["eval_seconds"] for e in history) / len(history)


def test_the_estimate_prices_the_cf_runs_left_from_the_runs_own_epochs(stopped):
    from reclm.pipeline import estimate as est

    config, run = stopped
    before = snapshot(run)
    status = run_status(run)
    assert snapshot(run) == before, "the estimate wrote into the run"
    by_name = {s.name: s for s in status.stages}
    assert {s.name for s in status.stages if s.plan == "run"} == {"train_cf", "report"}
    assert all(by_name[n].left == 0 for n in ("prepare", "teacher", "profiles", "encode", *OFF))
    cfg = load_config(config)
    work = run / ".work" / "cf"
    finished = json.loads((work / "bias-mf-none-s1" / "history.json").read_text())
    stopped_early = json.loads((work / "bias-mf-text-s1.partial" / "history.json").read_text())
    epochs = len(finished)  # where the committed run of the backbone stopped
    assert 2 < epochs <= cfg.cf.params["epochs"]
    # the stopped run again from its first epoch (no checkpoint) at its own pace; the last at the two runs' mean
    own, shared = (
        mean_epoch_seconds(stopped_early),
        (mean_epoch_seconds(finished) + mean_epoch_seconds(stopped_early)) / 2,
    )
    assert by_name["train_cf"].left == pytest.approx((own + shared) * epochs)  # one run at a time (cf.jobs 1)
    assert by_name["train_cf"].basis == "this run's CF epochs"
    assert by_name["report"].left == est.report(cfg, est.data_size(cfg, run)).seconds
    assert status.left == pytest.approx(by_name["train_cf"].left + by_name["report"].left)
    assert "saved split" in status.note


def test_without_cf_histories_the_estimate_is_the_dry_runs_upper_bound(stopped, tmp_path):
    from reclm.pipeline import estimate as est
    from reclm.pipeline.run import speed_book

    config, run = stopped
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for history in (copy / ".work" / "cf").glob("*/history.json"):
        history.unlink()
    cfg = load_config(config)
    status = run_status(copy)
    cf = next(s for s in status.stages if s.name == "train_cf")
    whole = est.train_cf(cfg, est.data_size(cfg, copy), speed_book()).seconds  # the three runs; two are left
    assert cf.left == pytest.approx(whole * 2 / 3) and cf.left > 0


def test_the_command_prints_plain_lines_and_json(stopped):
    _, run = stopped
    lines = invoke(str(run), "--no-estimate").splitlines()
    assert lines[0] == f"{run}: no `reclm run` holds it now"
    cf = next(line for line in lines if line.startswith("[11/12] train_cf"))
    assert "interrupted" in cf and "1/3 CF runs done; started: bias-mf-text-s1 at epoch 2" in cf
    assert any(line.startswith("[ 3/12] sft          off") for line in lines)
    data = json.loads(invoke(str(run), "--json"))
    assert data["locked"] is False and data["estimated"] is True and data["left"] > 0
    stages = {s["name"]: s for s in data["stages"]}
    assert {n: s["state"] for n, s in stages.items()} == STATES
    assert stages["train_cf"]["seconds"] == manifest(run, "train_cf")["seconds"]
    assert stages["train_cf"]["progress"]["units_done"] == ["bias-mf-none-s1"]
    assert stages["report"]["plan"] == "run" and stages["report"]["left"] > 0


def test_on_a_terminal_the_command_prints_a_table(stopped, monkeypatch):
    from reclm.cli import status as command

    _, run = stopped
    screen = Console(file=io.StringIO(), force_terminal=True, width=220, color_system=None)
    monkeypatch.setattr(command, "console", screen)
    invoke(str(run), "--no-estimate")
    text = screen.file.getvalue()
    assert "┃ stage" in text and "┃ state" in text and "┃ progress" in text
    row = next(line for line in text.splitlines() if "│ train_cf" in line)
    assert "│ interrupted" in row and "1/3 CF runs done" in row


def test_a_folder_that_is_not_a_run_is_one_line_and_exit_code_2(tmp_path):
    for folder in (tmp_path, tmp_path / "missing"):
        result = CliRunner().invoke(app, ["status", str(folder)])
        assert result.exit_code == 2
        assert result.output.strip().splitlines() == [
            f"error: {folder}: "
            + ("not a run directory" if folder.exists() else "no such run directory")
            + (" (no manifests/ or config.yaml: `reclm run` makes them)" if folder.exists() else "")
        ]


def test_status_beside_a_run_that_holds_the_lock_reports_it_without_waiting(stopped, tmp_path):
    """A `reclm run` in another process resumes train_cf and holds the lock; status reads the run at once,
    then the run is stopped (SIGTERM) and status sums the stage's two attempts."""
    config, source = stopped
    run, ready = tmp_path / "run", tmp_path / "ready"
    shutil.copytree(source, run)
    first = manifest(run, "train_cf")["attempts"][0]["seconds"]
    child = subprocess.Popen([sys.executable, "-c", HELD_RUN, str(config), str(run), str(ready)])
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert child.poll() is None and time.monotonic() < deadline, "the run did not reach train_cf"
            time.sleep(0.2)
        assert ready.read_text() == "bias-mf-text-s1"  # the committed run was not trained again
        started = time.monotonic()
        status = run_status(run, estimate=False)
        assert time.monotonic() - started < 10, "status waited"
        assert status.locked and lock_held(run)
        cf = next(s for s in status.stages if s.name == "train_cf")
        # the running manifest carries the interrupted attempt: both count while it runs
        assert cf.state == "running" and cf.attempts == 2 and cf.running_for is not None and cf.running_for >= 0
        assert cf.seconds == pytest.approx(first + cf.running_for, abs=1e-2)
        assert cf.progress is not None and cf.progress.units_done == ["bias-mf-none-s1"]
        assert invoke(str(run), "--no-estimate").startswith(f"{run}: a `reclm run` is working on it now")
        planned = next(s for s in run_status(run).stages if s.name == "train_cf")  # the estimate, while it runs
        assert planned.plan == "run" and planned.left is not None and planned.left > 0
        assert manifest(run, "train_cf")["status"] == "running"  # status changed nothing
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            raise
    assert child.returncode != 0 and not lock_held(run)
    status = run_status(run, estimate=False)
    cf, record = next(s for s in status.stages if s.name == "train_cf"), manifest(run, "train_cf")
    assert cf.state == "interrupted" and cf.attempts == 2 and len(record["attempts"]) == 2
    assert record["attempts"][0]["seconds"] == first
    assert cf.seconds == pytest.approx(first + record["attempts"][1]["seconds"]) and cf.seconds == record["seconds"]
