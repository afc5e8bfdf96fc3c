"""The real stages end to end on a tiny dataset, through the CLI: prepare, offline teacher, teacher
profiles (no generator), encode, train-cf (two backbones, with and without profiles), report."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from reclm.cli.common import LOG_WIDTH, log_width
from reclm.cli.main import app

FAST_CF = {"epochs": 4, "patience": 3, "dim": 16, "batch_size": 128, "eval_batch_size": 64, "feature_hidden": [32]}


def tiny_config(dataset: Path, out: Path, **cf) -> dict:
    return {
        "dataset": str(dataset / "inter.csv"),
        "item_text": str(dataset / "items.csv"),
        "out": str(out),
        "threads": 1,
        "split": {"method": "random", "zero_shot_fraction": 0.1, "seed": 1},
        "stages": {
            "teacher": "offline",
            "sft": False,
            "collab": False,
            "reward": False,
            "rl": "none",
            "item_side": False,
        },
        "teacher": {"users": None, "items": None},
        "cf": {"backbones": ["bias-mf", "lightgcn"], "seeds": [1], "params": FAST_CF, **cf},
        "report": {"examples": 2},
    }


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def stage_lines(output: str) -> dict[str, str]:
    """``[ n/12] stage  action`` lines -> {stage: action}."""
    found = re.findall(r"\[\s*\d+/12\] (\w+)\s+(done|cached|off)", output)
    return dict(found)


def slow_and_quick_jobs(cfg, out: Path, tmp_path: Path) -> list:
    """Two CF jobs on a finished run: one that would train for 100,000 epochs, one of a single epoch."""
    from reclm.pipeline import cf_jobs

    slow = {**cfg.cf.run_params("lightgcn", "text", 1), "epochs": 100_000, "patience": 100_000}
    quick = {**cfg.cf.run_params("bias-mf", "text", 1), "epochs": 1}
    jobs = [cf_jobs.CFJob("slow", slow, tmp_path / "slow"), cf_jobs.CFJob("quick", quick, tmp_path / "quick")]
    for job in jobs:
        job.item_text = out / "embeddings" / "item_text.npz"
    return jobs


def interrupt_after_first(done: list[str]):
    """An ``on_done`` that records the finished job, then acts as a Ctrl-C."""

    def on_done(job, result) -> None:
        done.append(job.name)
        raise KeyboardInterrupt("simulated Ctrl-C")

    return on_done


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_dataset):
    base = tmp_path_factory.mktemp("e2e")
    dataset = tiny_dataset
    out = base / "run"
    config = base / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(dataset, out, jobs=2)))  # CF runs in two worker processes
    output = invoke("run", str(config))
    return config, out, output, dataset


def test_first_run_runs_the_real_stages(finished_run):
    config, out, output, _ = finished_run
    assert stage_lines(output) == {
        "prepare": "done",
        "teacher": "done",
        "sft": "off",
        "neighbours": "off",
        "collab": "off",
        "reward": "off",
        "rl": "off",
        "item_side": "off",
        "profiles": "done",
        "encode": "done",
        "train_cf": "done",
        "report": "done",
    }
    runs = json.loads((out / "cf" / "runs.json").read_text())
    assert sorted(r["name"] for r in runs) == [
        "bias-mf-text+profiles-s1",
        "bias-mf-text-s1",
        "lightgcn-text+item-profiles-s1",  # cf.side_ablation on cf.ablation_backbones
        "lightgcn-text+profiles-s1",
        "lightgcn-text+user-profiles-s1",
        "lightgcn-text-s1",
    ]
    for run in runs:
        metrics = json.loads((out / "cf" / run["name"] / "metrics.json").read_text())
        assert 0 <= metrics["test"]["recall@20"] <= metrics["test"]["recall@40"] <= 1
        assert "recall@20" in metrics["zero_shot"]
    users = {json.loads(line)["id"] for line in (out / "profiles" / "users.jsonl").open()}
    assert len(users) >= 35  # the offline teacher profiles every user with a train history
    with __import__("numpy").load(out / "embeddings" / "users.npz") as arrays:
        assert arrays["vectors"].shape == (len(users), 384)
    manifest = json.loads((out / "manifests" / "train_cf.json").read_text())
    assert manifest["status"] == "complete" and manifest["seconds"] > 0 and manifest["peak_memory_mb"] > 100
    assert json.loads((out / "manifests" / "sft.json").read_text()) == {"stage": "sft", "status": "off"}


def test_report_has_the_paper_table_costs_quality_and_plots(finished_run):
    _, out, _, _ = finished_run
    md = (out / "report" / "report.md").read_text()
    for heading in (
        "## Results",
        "## Significance",
        "## Ablation",
        "## Plots",
        "## Cost per stage",
        "## Profile quality",
        "## Example profiles",
    ):
        assert heading in md
    rows = [line for line in md.splitlines() if line.startswith("| bias-mf |") or line.startswith("| lightgcn |")]
    assert len(rows) >= 4  # both backbones, full-shot and zero-shot tables
    results = json.loads((out / "report" / "results.json").read_text())
    lightgcn = next(r for r in results if r["run"] == "lightgcn-text-s1")
    cell = f"{lightgcn['test']['recall@20']:.4f}"
    assert any(line.startswith("| lightgcn |") and cell in line for line in md.splitlines())
    assert "Wilcoxon" in md and "| bias-mf | full-shot |" in md
    assert "One seed: the Wilcoxon test sees only the users' spread" in md  # one seed: the caution
    assert "+ teacher profiles" in md  # the ablation row of this run's profile source
    sides = [line for line in md.splitlines() if line.startswith("| lightgcn | + ")]
    assert any("user profiles only" in line for line in sides) and any("item profiles only" in line for line in sides)
    assert re.search(r"\| train_cf \| complete \| [\d.]+ (s|min) \| [\d.]+ (s|min) \|", md)  # time, CPU time
    cost = md[md.index("## Cost per stage") :].split("\n## ")[0].splitlines()
    widths = {line.count("|") for line in cost if line.startswith("|")}
    assert widths == {8}  # 7 columns in the header and in every row
    assert "users.format_rate" in md or "users.count" in md
    assert "profile: User identity:" in md
    assert (out / "report" / "plots" / "validation_curves.png").stat().st_size > 1000
    assert (out / "report" / "plots" / "cold_validation_curves.png").stat().st_size > 1000
    assert "epoch selected on cold validation" in md and "## Training length" in md
    assert (out / "report" / "plots" / "activity_buckets.png").stat().st_size > 1000
    assert "| 0-5 |" in md or "| 6-20 |" in md


def test_report_html_is_self_contained(finished_run):
    _, out, _, _ = finished_run
    page = (out / "report" / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "href=" not in page
    sources = re.findall(r"""src\s*=\s*["']([^"']*)""", page)
    # validation curves, cold-validation curves, activity buckets
    assert len(sources) == 3 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"(?i)(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", page.replace("data:image/png;base64,", ""))
    assert "<link" not in page and "@import" not in page and "<script" not in page


def test_rerun_is_all_cached_and_fast(finished_run):
    config, out, _, _ = finished_run
    start = time.perf_counter()
    output = invoke("run", str(config))
    assert time.perf_counter() - start < 30
    actions = stage_lines(output)
    assert {a for s, a in actions.items()} == {"cached", "off"}
    assert "(0 stages from cache)" not in output


def test_reports_regenerate_from_the_run_directory(finished_run, tmp_path):
    _, out, _, _ = finished_run
    output = invoke("report", str(out), "--out", str(tmp_path))
    assert "report.html" in output
    assert (tmp_path / "report.md").read_text() == (out / "report" / "report.md").read_text()


def test_dry_run_prints_the_plan_with_estimates(finished_run):
    config, out, _, _ = finished_run
    data = yaml.safe_load(config.read_text())
    data["cf"]["params"] = {**FAST_CF, "dim": 8}
    changed = config.with_name("changed.yaml")
    changed.write_text(yaml.safe_dump(data))
    manifest = out / "manifests" / "train_cf.json"
    before = manifest.read_bytes()
    output = invoke("run", str(changed), "--dry-run")
    assert re.search(r"train_cf\s+│\s+run", output)
    assert re.search(r"encode\s+│\s+cached", output)
    assert "estimated total" in output
    assert "default speeds: the reference machine's x1.00 (RECLM_SPEED_FACTOR)" in output
    assert manifest.read_bytes() == before, "a dry run runs nothing"


def test_a_plan_written_to_a_pipe_keeps_each_row_on_one_line(finished_run):
    """rich wraps at 80 columns off a terminal; a log or CI output gets LOG_WIDTH, unless COLUMNS says."""
    config, _, _, _ = finished_run
    data = yaml.safe_load(config.read_text())
    data["cf"]["params"] = {**FAST_CF, "dim": 8}  # train_cf and report would run: their rows have estimates
    changed = config.with_name("wider.yaml")
    changed.write_text(yaml.safe_dump(data))
    command = [sys.executable, "-c", "from reclm.cli.main import app; app()", "run", str(changed), "--dry-run"]
    environ = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    piped = subprocess.run(command, capture_output=True, text=True, env=environ, check=True).stdout
    assert re.search(r"│ train_cf +│ run +│ changed: config[^\n]*\(upper bound\) │[^\n]*│ (measured|default) +│", piped)
    assert re.search(r"estimated total: [^\n]*constants in reclm/pipeline/estimate.py", piped), piped
    assert max(map(len, piped.splitlines())) <= LOG_WIDTH
    narrow = subprocess.run(command, capture_output=True, text=True, env={**environ, "COLUMNS": "80"}, check=True)
    rows = [line for line in narrow.stdout.splitlines() if line.startswith("│")]
    assert max(map(len, rows)) <= 80 and "…" in narrow.stdout


def test_log_width_leaves_terminals_and_columns_to_rich(tmp_path):
    with (tmp_path / "log.txt").open("w") as log:
        assert log_width(log, {}) == LOG_WIDTH
        assert log_width(log, {"COLUMNS": "100"}) is None
    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as terminal:
        assert log_width(terminal, {}) is None
    os.close(leader)


def test_adding_a_feature_mode_trains_only_the_new_runs(finished_run):
    config, out, _, _ = finished_run
    before = {p.parent.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "cf").glob("*/metrics.json")}
    data = yaml.safe_load(config.read_text())
    data["cf"]["features"] = ["none", "text", "text+profiles"]
    config.write_text(yaml.safe_dump(data))
    output = invoke("run", str(config))
    actions = stage_lines(output)
    assert actions["train_cf"] == "done" and actions["report"] == "done" and actions["encode"] == "cached"
    assert output.count(": cached") == 6  # the six earlier CF runs (two side-ablation runs) were reused
    after = {p.parent.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "cf").glob("*/metrics.json")}
    assert {n for n in after if n not in before} == {"bias-mf-none-s1", "lightgcn-none-s1"}
    assert all(after[n] == before[n] for n in before)


def test_several_seeds_give_mean_std_and_a_test_over_seeds(finished_run):
    config, out, _, _ = finished_run
    output = invoke("run", str(config), "--seeds", "2")
    assert stage_lines(output)["train_cf"] == "done"
    assert "lightgcn-text-s2" in output and "lightgcn-text-s1: cached" in output
    md = (out / "report" / "report.md").read_text()
    assert "mean ± std over 2 seeds" in md
    row = next(line for line in md.splitlines() if line.startswith("| lightgcn | full-shot |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[6] == "2" and cells[7] != "-"  # seeds compared, t-test p-value
    assert "One seed:" not in md
    assert re.search(r"\| lightgcn \| 0\.\d{4} ± 0\.\d{4} \|", md)


def test_cf_runs_in_worker_processes_match_in_process_runs(finished_run, tmp_path):
    """``cf.jobs: 2``: the pipeline trained its runs two at a time in spawned workers (one thread each);
    the same runs trained here, in this process, give the same metrics."""
    from reclm.pipeline import cf_jobs
    from reclm.pipeline.config import load_config
    from reclm.rundir import RunDir

    config, out, _, _ = finished_run
    manifest = json.loads((out / "manifests" / "train_cf.json").read_text())
    assert manifest["summary"]["jobs"] == 2 and manifest["summary"]["worker_peak_memory_mb"] > 50
    assert any("2 at a time, 1 thread(s) each" in note for note in manifest["notes"])
    assert cf_jobs.job_plan(None, "cpu", pending=10, cores=2) == (2, 1)
    assert cf_jobs.job_plan(None, "cpu", pending=1, cores=2) == (1, 2)
    assert cf_jobs.job_plan(None, "cpu", pending=10, cores=1) == (1, 1)  # `threads: 1` -> in process
    cfg = load_config(config)
    data, split = RunDir(out).load()
    for backbone, features in (("bias-mf", "text"), ("lightgcn", "text+profiles")):
        name = f"{backbone}-{features}-s1"
        job = cf_jobs.CFJob(name, cfg.cf.run_params(backbone, features, 1), tmp_path / name)
        job.item_text = out / "embeddings" / "item_text.npz"
        if features == "text+profiles":
            job.user_profiles, job.item_profiles = out / "embeddings" / "users.npz", out / "embeddings" / "items.npz"
            job.text_run = out / "cf" / f"{backbone}-text-s1"  # its text model is epoch 0 (cf.from_text)
        result = cf_jobs.train_job(job, data, split, threads=1, show_progress=False)
        expected = json.loads((out / "cf" / name / "metrics.json").read_text())["test"]
        assert result.test == pytest.approx(expected, abs=1e-12) and result.test["recall@20"] > 0


def test_an_interrupt_ends_the_cf_workers_at_once(finished_run, tmp_path):
    """After the first finished run, an interrupt stops the workers instead of waiting for their runs."""
    import time

    from reclm.pipeline import cf_jobs
    from reclm.pipeline.config import load_config

    config, out, _, _ = finished_run
    cfg = load_config(config)
    jobs = slow_and_quick_jobs(cfg, out, tmp_path)
    done: list[str] = []
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        cf_jobs.run_in_workers(out, jobs, workers=2, threads=1, on_done=interrupt_after_first(done))
    assert done == ["quick"]
    assert time.monotonic() - started < 60, "the 100,000-epoch run was not waited for"
    assert (tmp_path / "quick" / "metrics.json").is_file() and not (tmp_path / "slow" / "metrics.json").exists()


def test_profile_runs_have_their_text_runs_as_epoch_0(finished_run, tmp_path):
    """``cf.from_text``: the profile runs train after the text runs and have their models as epoch 0 of both
    selections (``candidate``, the default, in the finished run; ``warm`` here, reusing the text runs from
    cache); the report says which kept the text model; a config without the text runs to use is refused."""
    config, out, _, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    data = yaml.safe_load(config.read_text())
    data["out"] = str(run)
    data["cf"].update(features=["text", "text+profiles"], seeds=[1], side_ablation=False, from_text="warm")
    warm_config = tmp_path / "warm.yaml"
    warm_config.write_text(yaml.safe_dump(data))
    output = invoke("run", str(warm_config))
    for root, use in ((out, "candidate"), (run, "warm")):
        for backbone in ("bias-mf", "lightgcn"):
            if root == run:
                assert f"{backbone}-text-s1: cached" in output and f"{backbone}-text+profiles-s1: test" in output
            text = json.loads((root / "cf" / f"{backbone}-text-s1" / "metrics.json").read_text())
            folder = root / "cf" / f"{backbone}-text+profiles-s1"
            start = json.loads((folder / "history.json").read_text())[0]
            assert (root / "cf" / f"{backbone}-text-s1" / "model_cold.pt").is_file()
            assert start["epoch"] == 0 and start["valid"] == pytest.approx(text["valid"], abs=1e-6)
            assert start["cold_valid"] == pytest.approx(text["cold_valid"], abs=1e-6)  # its cold-selected model
            metrics = json.loads((folder / "metrics.json").read_text())
            assert metrics["config"]["from_text"] == use
            assert metrics["valid"]["ndcg@20"] >= text["valid"]["ndcg@20"] - 1e-9
        md = (root / "report" / "report.md").read_text()
        assert "## Text model as epoch 0" in md and "kept the text model" in md
    # a backbone of the side ablation only has no text run in the grid: its runs train as the paper does
    data["cf"].update(backbones=["bias-mf"], ablation_backbones=["lightgcn"], side_ablation=True)
    warm_config.write_text(yaml.safe_dump(data))
    invoke("run", str(warm_config))
    ablation = run / "cf" / "lightgcn-text+user-profiles-s1"
    assert json.loads((ablation / "metrics.json").read_text())["config"]["from_text"] == "none"
    assert json.loads((ablation / "history.json").read_text())[0]["epoch"] == 1  # no epoch 0
    data["cf"]["features"] = ["text+profiles"]
    warm_config.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["run", str(warm_config)])
    assert result.exit_code != 0 and "needs 'text' in cf.features" in result.output
