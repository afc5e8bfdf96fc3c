"""``reclm teacher``, ``reclm encode`` and ``reclm quality`` through the real Typer app."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from reclm.cli.main import app
from reclm.llm.prompts import parse_profile
from reclm.llm.records import read_records

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_teacher_encode_quality_chain_on_a_fresh_run(tiny_files, tmp_path):
    run = tmp_path / "run"
    dataset = tiny_files / "inter.csv"
    result = invoke("teacher", run, "--kind", "offline", "--quiet")
    assert result.exit_code == 2 and "give --dataset" in result.output
    # a CSV dataset needs its item text, so prepare explicitly, then the teacher reads the saved split
    assert invoke("prepare", "--dataset", dataset, "--item-text", tiny_files / "items.csv", "--out", run).exit_code == 0
    result = invoke("teacher", run, "--kind", "offline", "--quiet", "--max-users", "5", "--seed", "2")
    assert result.exit_code == 0, result.output
    assert "wrote 5 users" in result.output and "not an LLM" in result.output
    users = read_records(run / "teacher" / "users.jsonl")
    assert len(users) == 5 and all(parse_profile(r.profile) for r in users)

    result = invoke("teacher", run, "--kind", "file", "--quiet")
    assert result.exit_code == 2 and "--fresh" in result.output

    result = invoke("encode", run, "--source", "teacher")
    assert result.exit_code == 0, result.output
    with np.load(run / "embeddings" / "users.npz") as saved:
        assert sorted(saved["ids"].tolist()) == sorted(r.id for r in users)
        assert saved["vectors"].shape == (5, 384)

    result = invoke("quality", run, "--source", "teacher", "--reference", "")
    assert result.exit_code == 0, result.output
    assert "users: 5 profiles, format 100.0%" in result.output
    report = json.loads((run / "teacher" / "quality.json").read_text())
    assert report["users"]["format_rate"] == 1.0


def test_teacher_prepares_a_builtin_dataset_and_rejects_bad_options(tmp_path):
    run = tmp_path / "run"
    result = invoke("teacher", run, "--kind", "nope", "--dataset", "ml-100k")
    assert result.exit_code == 2 and "--kind 'nope'" in result.output
    result = invoke("teacher", run, "--kind", "offline", "--dataset", "ml-100k", "--only", "items", "--max-items", "30")
    assert result.exit_code == 0, result.output
    assert (run / "data" / "split.npz").is_file()
    assert len(read_records(run / "teacher" / "items.jsonl")) == 30
    assert not (run / "teacher" / "users.jsonl").exists()
    result = invoke("teacher", run, "--kind", "offline", "--dataset", "other.csv")
    assert result.exit_code == 2 and "prepared from 'ml-100k'" in result.output
    result = invoke("encode", run)
    assert result.exit_code == 2 and "reclm profile" in result.output
