"""``executor: ray``: the CF grid of ``reclm run`` as tasks on a real local Ray (started by the pipeline with
the run's ``threads`` as its CPUs), against the local executor on the same run directory."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from test_pipeline_end_to_end import interrupt_after_first, invoke, slow_and_quick_jobs, stage_lines, tiny_config
from typer.testing import CliRunner

from reclm.cli.main import app
from reclm.distributed import RAY_MISSING
from reclm.pipeline.config import ConfigError, PipelineConfig, RayOptions, load_config, validate_config
from reclm.pipeline.stages.cf import train_cf_config

ray = pytest.importorskip("ray")

RUNS = {f"{b}-{f}-s1" for b in ("bias-mf", "lightgcn") for f in ("text", "text+profiles")}


def cf_test_metrics(out: Path) -> dict[str, dict[str, float]]:
    return {p.parent.name: json.loads(p.read_text())["test"] for p in (out / "cf").glob("*/metrics.json")}


def forget_cf_runs(out: Path) -> None:
    """Drop the trained CF runs, so the next ``reclm run`` trains them again (instead of reusing them)."""
    shutil.rmtree(out / "cf")
    (out / "manifests" / "train_cf.json").unlink()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, tiny_dataset):
    """The tiny pipeline (two backbones x text, text+profiles), its CF runs trained by the local executor."""
    base = tmp_path_factory.mktemp("ray")
    out = base / "run"
    config = base / "tiny.yaml"
    data = tiny_config(tiny_dataset, out, side_ablation=False)
    data["threads"] = 2  # a local Ray gets the run's threads as its CPUs: two runs at a time
    config.write_text(yaml.safe_dump(data))
    output = invoke("run", str(config), "--executor", "local")
    assert stage_lines(output)["train_cf"] == "done"
    metrics = cf_test_metrics(out)
    assert set(metrics) == RUNS
    return config, out, metrics


def test_the_ray_executor_reuses_runs_trained_locally_and_trains_the_same_metrics(local_run):
    config, out, local = local_run
    output = invoke("run", str(config), "--executor", "ray")  # same cache key: nothing to train, Ray not started
    assert stage_lines(output)["train_cf"] == "cached" and not ray.is_initialized()

    forget_cf_runs(out)
    output = invoke("run", str(config), "--executor", "ray")
    assert stage_lines(output)["train_cf"] == "done" and not ray.is_initialized()  # the local Ray was shut down
    assert output.count("test recall@20") == len(RUNS)
    on_ray = cf_test_metrics(out)
    assert set(on_ray) == RUNS
    for name in RUNS:
        assert on_ray[name] == pytest.approx(local[name], abs=1e-6), name
        assert on_ray[name]["recall@20"] > 0
    manifest = json.loads((out / "manifests" / "train_cf.json").read_text())
    assert manifest["summary"]["executor"] == "ray" and manifest["summary"]["trained"] == len(RUNS)
    assert manifest["summary"]["worker_peak_memory_mb"] > 50
    assert any(
        "4 CF runs as Ray tasks at a local Ray (2 CPUs), 1 CPU(s) and 1 thread(s) each" in n for n in manifest["notes"]
    )

    output = invoke("run", str(config))  # the local executor reuses what Ray trained
    assert stage_lines(output)["train_cf"] == "cached"


def test_an_interrupt_cancels_the_ray_tasks_still_running_and_a_failed_run_raises_its_error(local_run, tmp_path):
    """After the first finished run, an interrupt cancels the other task (its worker killed, its CPU free again)
    instead of waiting for its 100,000 epochs; the finished run was handed over before."""
    import time

    from reclm.pipeline import cf_jobs

    config, out, _ = local_run
    cfg = load_config(config)
    jobs = slow_and_quick_jobs(cfg, out, tmp_path)
    done: list[str] = []

    # kept up here, to look at it afterwards
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            cf_jobs.run_in_ray(out, jobs, RayOptions(), 1, interrupt_after_first(done))
        assert done == ["quick"] and time.monotonic() - started < 300, "the 100,000-epoch run (hours) was waited for"
        assert (tmp_path / "quick" / "metrics.json").is_file() and not (tmp_path / "slow" / "metrics.json").exists()
        deadline = time.monotonic() + 30
        while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ray.available_resources().get("CPU", 0) == 2, "the slow task still holds its CPU"

        broken = cf_jobs.CFJob("broken", jobs[1].params, tmp_path / "broken", item_text=tmp_path / "missing.npz")
        with pytest.raises(FileNotFoundError, match="missing.npz") as failed:  # the run's own error, as locally
            cf_jobs.run_in_ray(out, [broken], RayOptions(), 1, interrupt_after_first)
        assert "\n" not in str(failed.value) and isinstance(failed.value.__cause__, ray.exceptions.RayTaskError)
    finally:
        ray.shutdown()


def test_the_executor_is_not_part_of_the_cf_cache_key(local_run):
    config, _, _ = local_run
    local = load_config(config)
    on_ray = load_config(config, {"executor": "ray", "ray": {"address": "ray://head:10001", "cpus_per_run": 2}})
    assert on_ray.executor == "ray" and on_ray.ray.cpus_per_run == 2
    assert train_cf_config(on_ray) == train_cf_config(local)


def test_without_ray_installed_the_stage_fails_with_one_line(local_run, monkeypatch, tmp_path):
    config, out, _ = local_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns(".lock"))
    forget_cf_runs(copy)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    result = CliRunner().invoke(app, ["run", str(config), "--out", str(copy), "--executor", "ray"])
    assert result.exit_code == 1
    assert RAY_MISSING in result.output and "Traceback" not in result.output
    assert len(RAY_MISSING.splitlines()) == 1


def test_the_config_rejects_an_unknown_executor_and_bad_ray_options():
    assert PipelineConfig().executor == "local" and PipelineConfig().ray == RayOptions()
    with pytest.raises(ConfigError, match=r"executor: 'spark' is not one of 'local' or 'ray'"):
        validate_config({"executor": "spark"}, "x.yaml")
    with pytest.raises(ConfigError, match=r"ray\.adress: unknown key \(expected one of: address, cpus_per_run"):
        validate_config({"ray": {"adress": "auto"}}, "x.yaml")
    with pytest.raises(ConfigError, match=r"ray\.cpus_per_run: "):
        validate_config({"ray": {"cpus_per_run": 0}}, "x.yaml")
    result = CliRunner().invoke(app, ["run", "--executor", "spark", "--dry-run"])
    assert result.exit_code != 0 and "executor: 'spark' is not one of 'local' or 'ray'" in result.output
