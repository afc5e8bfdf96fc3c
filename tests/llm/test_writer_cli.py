"""``reclm sft`` and ``reclm profile`` end to end on a small real dataset and the tiny real model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from reclm.cli.main import app
from reclm.data.split import SplitSpec
from reclm.llm.generation.ct2 import default_quantization
from reclm.llm.records import read_records
from reclm.rundir import RunDir

GENRES = ["Comedy", "Drama", "Horror", "Western"]


def write_dataset(folder: Path, n_users: int = 10, n_items: int = 24) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["user,item,timestamp"]
    for u in range(n_users):
        items = rng.choice(n_items, 8, replace=False)
        rows += [f"{u},{i},{1000 * u + t}" for t, i in enumerate(items)]
    (folder / "inter.csv").write_text("\n".join(rows) + "\n")
    text = ["item,title,genres"] + [f"{i},Film {i},{GENRES[i % 4]}" for i in range(n_items)]
    (folder / "items.csv").write_text("\n".join(text) + "\n")
    return folder


@pytest.fixture
def run_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("RECLM_CACHE", str(tmp_path / "cache"))
    files = write_dataset(tmp_path / "data")
    run = RunDir(tmp_path / "run")
    run.prepare(str(files / "inter.csv"), SplitSpec(zero_shot_fraction=0.1), item_text=str(files / "items.csv"))
    result = CliRunner().invoke(app, ["teacher", str(run.root), "--kind", "offline", "--quiet"])
    assert result.exit_code == 0, result.output
    return run.root


def invoke(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_sft_then_profile_writes_records_and_reuses_the_cache(run_dir, tiny_model):
    out = invoke("sft", run_dir, "--model", tiny_model, "--max-steps", 2, "--batch-size", 4, "--holdout", 0.2,
                 "--threads", 1, "--quiet")  # fmt: skip
    assert "held-out loss" in out.output
    metrics = json.loads((run_dir / "sft" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["n_heldout"] == 2 and metrics["heldout_loss_before"] > 0
    assert len(json.loads((run_dir / "sft" / "heldout.json").read_text())["user"]) == 2
    assert (run_dir / "sft" / "adapter" / "adapter_config.json").is_file()

    args = ("profile", run_dir, "--model", tiny_model, "--limit", 4, "--max-new-tokens", 5, "--threads", 1, "--quiet")
    first = invoke(*args)
    assert "users: 4 prompts" in first.output and "4 generated" in first.output
    users = read_records(run_dir / "profiles" / "users.jsonl")
    items = read_records(run_dir / "profiles" / "items.jsonl")
    assert [r.id for r in users] == ["0", "1", "2", "3"] and all(r.kind == "user" for r in users)
    assert len(items) == 4 and all(r.kind == "item" and r.prompt for r in items)
    assert users[0].prompt.startswith("Now you are a user profile generator.")
    info = json.loads((run_dir / "profiles" / "generation.json").read_text())
    cpu_default = default_quantization("cpu")  # int8, or float32 where this CPU's int8 kernels are off
    assert info["users"]["generated"] == 4 and info["users"]["generator"].startswith(f"ct2-{cpu_default}|")
    assert "adapter=none" not in info["users"]["generator"]  # RUN/sft/adapter was picked up

    second = invoke(*args)
    assert "4 cached, 0 generated" in second.output
    assert [r.profile for r in read_records(run_dir / "profiles" / "users.jsonl")] == [r.profile for r in users]


def test_cli_errors_are_one_line(run_dir, tmp_path):
    result = CliRunner().invoke(app, ["sft", str(run_dir), "--kind", "robot"])
    assert result.exit_code == 2 and "expected user or item" in result.output
    result = CliRunner().invoke(app, ["sft", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "no user teacher profiles" in result.output
    result = CliRunner().invoke(app, ["profile", str(run_dir), "--adapter", str(tmp_path)])
    assert result.exit_code == 2 and "not a LoRA adapter folder" in result.output


def test_profile_uses_the_last_tuned_writer_by_default(tmp_path):
    from reclm.cli.writer import latest_user_adapter

    run = RunDir(tmp_path / "run")
    assert latest_user_adapter(run) is None
    for stage in ("sft", "rl", "collab"):
        folder = run.stage(stage) / "adapter"
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
        expected = "rl" if stage in ("rl", "collab") else "sft"
        assert latest_user_adapter(run) == run.stage(expected) / "adapter"
    (run.stage("rl") / "adapter" / "adapter_config.json").unlink()  # an unfinished RL stage
    assert latest_user_adapter(run) == run.stage("collab") / "adapter"
