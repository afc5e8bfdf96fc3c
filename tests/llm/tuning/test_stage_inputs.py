"""The tuning stages' inputs, resolved in a real run folder (reclm.pipeline.inputs): what the pipeline and the
CLI hand to the stage functions, and the errors a missing input gives."""

from __future__ import annotations

import json

import numpy as np
import pytest

from reclm.data.errors import DataError
from reclm.llm.neighbours import save_item_text
from reclm.llm.records import ProfileRecord, write_records
from reclm.llm.reward import pool_neighbours
from reclm.pipeline.inputs import collab_inputs, item_inputs, reward_inputs, rl_inputs
from reclm.rundir import RunDir


def profile(u: int) -> str:
    return f"User identity: Person {u}, Viewer; User interests: Topic {u % 5}, Films."


def leave_adapter(run: RunDir, stage: str):
    folder = run.stage(stage) / "adapter"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    return folder


def write_teacher_and_heldout(run: RunDir, data, users: range, held: list[int]) -> None:
    records = [ProfileRecord("user", data.user_ids[u], "p", profile(u)) for u in users]
    write_records(run.teacher / "users.jsonl", records)
    run.stage("sft").mkdir(exist_ok=True)
    (run.stage("sft") / "heldout.json").write_text(json.dumps({"user": [data.user_ids[u] for u in held]}))


def write_user_lists(run: RunDir, data) -> None:
    """``neighbours/users.jsonl``: user u's similar users are u+1 and u+2."""
    raw, n = data.user_ids, data.n_users
    lines = [json.dumps({"user": raw[u], "neighbours": [raw[(u + 1) % n], raw[(u + 2) % n]]}) for u in range(n)]
    run.stage("neighbours").mkdir(parents=True, exist_ok=True)
    (run.stage("neighbours") / "users.jsonl").write_text("\n".join(lines) + "\n")


def test_rl_checks_the_method_before_looking_for_inputs(tiny_run):
    run, data, _ = tiny_run
    with pytest.raises(ValueError, match="expected one of ppo, dpo, none"):
        rl_inputs(run, data, "a2c")
    assert rl_inputs(run, data, "none") == {"init_adapter": None}
    with pytest.raises(FileNotFoundError, match="no sft/adapter or collab/adapter to start RL from"):
        rl_inputs(run, data, "dpo")


def test_ppo_needs_the_reward_model(tiny_run):
    run, data, _ = tiny_run
    sft = leave_adapter(run, "sft")
    with pytest.raises(FileNotFoundError) as missing:
        rl_inputs(run, data, "ppo")
    assert str(missing.value) == (f"{run.root}: PPO needs the reward model (reward/adapter): run `reclm reward` first")
    reward = leave_adapter(run, "reward")
    assert rl_inputs(run, data, "ppo") == {"init_adapter": sft, "reward_adapter": reward}


def test_dpo_without_a_reward_stage_gets_what_it_builds_pairs_from(tiny_run):
    run, data, _ = tiny_run
    leave_adapter(run, "sft")
    collab = leave_adapter(run, "collab")
    write_teacher_and_heldout(run, data, range(10), held=[3, 8, 9])
    inputs = rl_inputs(run, data, "dpo")
    assert inputs["init_adapter"] == collab and inputs["reward_adapter"] is None and inputs["pairs"] is None
    assert inputs["chosen"] == {u: profile(u) for u in (3, 8, 9)}  # only teacher users SFT held out
    assert inputs["neighbours"] == {}  # no neighbours stage: random other users stand in
    write_user_lists(run, data)
    assert rl_inputs(run, data, "dpo")["neighbours"][4] == [5, 6]


def test_dpo_takes_the_reward_stages_pairs(tiny_run):
    run, data, _ = tiny_run
    leave_adapter(run, "sft")
    (run.stage("reward") / "pairs.jsonl").parent.mkdir()
    (run.stage("reward") / "pairs.jsonl").write_text("")
    inputs = rl_inputs(run, data, "dpo")
    assert inputs["pairs"] == run.root / "reward" / "pairs.jsonl" and "chosen" not in inputs


def test_reward_inputs(tiny_run):
    run, data, split = tiny_run
    write_teacher_and_heldout(run, data, range(10), held=[8, 9])
    inputs = reward_inputs(run, data, split, "teacher")
    assert inputs["profiles"] == run.root / "teacher" / "users.jsonl"
    assert inputs["sft_users"] == {data.user_ids[u] for u in range(8)}
    assert inputs["user_vectors"] is None and inputs["neighbour_lists"] is None
    assert reward_inputs(run, data, split, "distilled")["profiles"] == run.root / "profiles" / "users.jsonl"
    write_user_lists(run, data)
    assert reward_inputs(run, data, split, "teacher")["neighbour_lists"][0] == [1, 2]
    vectors = np.random.default_rng(0).normal(size=(data.n_users, 4))
    (run.stage("neighbours") / "cf-lightgcn").mkdir()
    np.savez(
        run.stage("neighbours") / "cf-lightgcn" / "embeddings.npz", users=vectors, items=np.zeros((data.n_items, 4))
    )
    inputs = reward_inputs(run, data, split, "teacher")
    assert np.array_equal(inputs["user_vectors"], vectors) and inputs["neighbour_lists"] is None  # vectors first


def test_pool_neighbours_prefers_vectors_then_lists():
    vectors = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.95, 0.0]])
    near, source = pool_neighbours([0], [1, 2, 3], vectors, {0: [2]})
    assert near == {0: [3, 1, 2]} and source == "nearest CF users with a profile"
    assert pool_neighbours([0], [1, 2], None, {0: [2]}) == ({0: [2]}, "the run's neighbour lists")
    assert pool_neighbours([0], [1, 2], None, {}) == ({}, "the run's neighbour lists")
    assert pool_neighbours([0], [1, 2], None, None) == ({}, "random other users (no neighbours in this run)")


def test_collab_inputs(tiny_run):
    run, data, _ = tiny_run
    with pytest.raises(FileNotFoundError, match="no sft/adapter to start collaborative tuning from"):
        collab_inputs(run, data)
    sft = leave_adapter(run, "sft")
    with pytest.raises(DataError, match="no user neighbours in this run"):
        collab_inputs(run, data)
    write_user_lists(run, data)
    inputs = collab_inputs(run, data)
    assert inputs["init_adapter"] == sft and inputs["teacher_users"] == run.root / "teacher" / "users.jsonl"
    assert inputs["neighbours"][0] == [1, 2] and len(inputs["neighbours"]) == data.n_users


def test_item_inputs_use_the_neighbours_stages_text_embeddings(tiny_run):
    run, data, _ = tiny_run
    assert item_inputs(run, data) == {"teacher_items": run.root / "teacher" / "items.jsonl", "text_vectors": None}
    vectors = np.random.default_rng(0).normal(size=(data.n_items, 3)).astype(np.float32)
    save_item_text(run.stage("neighbours") / "item_text.npz", data, vectors)
    assert np.array_equal(item_inputs(run, data)["text_vectors"], vectors)
