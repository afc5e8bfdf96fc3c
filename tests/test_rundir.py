"""RunDir answers what the stages left for later ones: which adapter a stage left, which adapter collaborative
tuning and RL start from, which users SFT held out, where a source's user profiles are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reclm.rundir import RunDir


def leave_adapter(run: RunDir, stage: str) -> Path:
    folder = run.stage(stage) / "adapter"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    return folder


def test_stage_adapter_needs_an_adapter_config(tmp_path):
    run = RunDir(tmp_path)
    assert run.stage_adapter("sft") is None
    (run.stage("sft") / "adapter").mkdir(parents=True)  # a folder without adapter_config.json is no adapter
    assert run.stage_adapter("sft") is None
    (run.stage("sft") / "adapter" / "adapter_config.json").write_text("{}")
    assert run.stage_adapter("sft") == tmp_path / "sft" / "adapter"


def test_stage_adapter_follows_a_redirect(tmp_path):
    work = tmp_path / ".work" / "rl"
    (work / "adapter").mkdir(parents=True)
    (work / "adapter" / "adapter_config.json").write_text("{}")
    assert RunDir(tmp_path, redirect={"rl": work}).stage_adapter("rl") == work / "adapter"
    assert RunDir(tmp_path).stage_adapter("rl") is None


def test_rl_starts_from_collab_over_sft(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(FileNotFoundError) as missing:
        run.rl_start_adapter()
    assert str(missing.value) == (
        f"{tmp_path}: no sft/adapter or collab/adapter to start RL from (run `reclm sft` first)"
    )
    sft = leave_adapter(run, "sft")
    assert run.rl_start_adapter() == sft
    collab = leave_adapter(run, "collab")
    assert run.rl_start_adapter() == collab
    assert run.collab_start_adapter() == sft  # collaborative tuning always continues the SFT adapter


def test_collab_needs_the_sft_adapter(tmp_path):
    run = RunDir(tmp_path)
    leave_adapter(run, "collab")
    with pytest.raises(FileNotFoundError) as missing:
        run.collab_start_adapter()
    assert str(missing.value) == f"{tmp_path}: no sft/adapter to start collaborative tuning from (run `reclm sft`)"


def test_sft_heldout_ids_are_strings_and_none_before_sft(tmp_path):
    run = RunDir(tmp_path)
    assert run.sft_heldout() is None
    run.stage("sft").mkdir()
    (run.stage("sft") / "heldout.json").write_text(json.dumps({"user": [7, "u8"], "item": ["i1"]}))
    assert run.sft_heldout() == {"7", "u8"}
    assert run.sft_heldout("item") == {"i1"}
    (run.stage("sft") / "heldout.json").write_text(json.dumps({"item": []}))
    assert run.sft_heldout("user") == set()  # SFT ran and held out no user


def test_user_profiles_by_source(tmp_path):
    run = RunDir(tmp_path)
    assert run.user_profiles("teacher") == tmp_path / "teacher" / "users.jsonl"
    assert run.user_profiles("distilled") == tmp_path / "profiles" / "users.jsonl"
    with pytest.raises(ValueError, match="chosen profile source 'gpt': expected teacher or distilled"):
        run.user_profiles("gpt")
