"""The issue-4 stages chained on a tiny run with the tiny model: neighbours -> collaborative tuning ->
reward model -> PPO and DPO -> item side, then the leakage audit over every file they wrote."""

from __future__ import annotations

import json

import numpy as np
import pytest

from reclm.llm.audit import audit_run
from reclm.llm.collab import CollabBudget, run_collab
from reclm.llm.item_side import generate_item_profiles, train_item_writer
from reclm.llm.neighbours import build_neighbours
from reclm.llm.prompts import PromptBudget, parse_profile
from reclm.llm.records import read_records
from reclm.llm.reward import RewardConfig, run_reward
from reclm.llm.rl.stage import run_rl
from reclm.pipeline.inputs import collab_inputs, item_inputs, reward_inputs, rl_inputs

pytestmark = pytest.mark.slow


def quiet(_text: str) -> None:
    pass


@pytest.fixture
def tuned_run(tiny_run, tiny_model):
    """Offline teacher profiles for half the users and every item, a 2-step SFT adapter, CF-like neighbours."""
    from reclm.llm.sft import train_sft
    from reclm.llm.teachers.offline import OfflineTeacher

    run, data, split = tiny_run
    budget = PromptBudget(max_items=5, max_words=8)
    OfflineTeacher(budget=budget, progress=False).run(data, split, run)
    train_sft(run.teacher, run.stage("sft"), str(tiny_model), lora={"r": 4, "alpha": 8}, progress=False,
              steps=2, batch_size=4, holdout=0.3, save_every=0, eval_every=0)  # fmt: skip
    rng = np.random.default_rng(0)
    folder = run.cf / "lightgcn-none-s0"
    folder.mkdir(parents=True)
    taste = np.eye(4)[np.arange(data.n_users) % 4] + 0.1 * rng.normal(size=(data.n_users, 4))
    np.savez(folder / "embeddings.npz", users=taste, items=rng.normal(size=(data.n_items, 4)))
    text = np.eye(4)[np.arange(data.n_items) % 4].astype(np.float32)

    class GenreEncoder:  # item text -> its genre: stands in for the sentence encoder, which other tests run
        def encode(self, texts, desc=""):
            return text[: len(texts)]

    build_neighbours(run, data, split, k=3, encoder=GenreEncoder())
    return run, data, split, budget


def test_stages_chain_and_audit(tuned_run, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("RECLM_CACHE", str(tmp_path / "cache"))  # generations are cached here, not in ~/.cache
    run, data, split, budget = tuned_run
    base = str(tiny_model)
    collab = run_collab(
        data, split, base, run.stage("collab"), **collab_inputs(run, data), dialogues=12,
        budget=CollabBudget(3, 2, 8, 2, 512), prompt_budget=budget,
        train={"steps": 2, "batch_size": 4, "holdout": 0.25, "save_every": 0, "eval_every": 0}, log=quiet,
        progress=False,
    )  # fmt: skip
    assert collab["dialogues"] == 12 and collab["yes_share"] == 0.5
    assert (run.stage("collab") / "adapter" / "adapter_config.json").is_file()
    assert collab["yes_no_after"]["dialogues"] == 3
    assert collab["profiles"]["distilled"] + collab["profiles"]["teacher"] > 0

    reward = run_reward(data, split, base, run.stage("reward"), **reward_inputs(run, data, split, "teacher"),
                        config=RewardConfig(steps=2, batch_size=4, max_seq_len=256), budget=budget,
                        log=quiet)  # fmt: skip
    used = json.loads((run.stage("sft") / "heldout.json").read_text())["user"]
    pair_users = {json.loads(line)["id"] for line in (run.stage("reward") / "pairs.jsonl").read_text().splitlines()}
    teacher_users = {r.id for r in read_records(run.teacher / "users.jsonl", "user")}
    assert pair_users and pair_users <= set(used)  # only teacher users SFT held out
    assert pair_users.isdisjoint(teacher_users - set(used))
    assert set(reward.after["per_kind"]) <= {"neighbour", "concat", "identity_only", "identity_dup",
                                             "identity_empty", "dot"}  # fmt: skip

    ppo = run_rl(data, split, base, "ppo", run.stage("rl"), **rl_inputs(run, data, "ppo"),
                 options={"steps": 2, "batch_size": 2, "lr": 1e-3}, budget=budget, eval_users=2, max_new_tokens=8,
                 log=quiet)  # fmt: skip
    metrics = json.loads((run.stage("rl") / "metrics.json").read_text())
    assert metrics["method"] == "ppo" and len(metrics["steps"]) == 2
    assert all({"score", "kl", "reward"} <= set(s) for s in metrics["steps"])
    assert ppo["init_adapter"].endswith("collab/adapter") and ppo["weight_change"] > 0
    assert "score" in ppo["before"] and "score" in ppo["after"]

    dpo = run_rl(data, split, base, "dpo", run.root / "rl-dpo", **rl_inputs(run, data, "dpo"),
                 options={"steps": 2, "batch_size": 2}, budget=budget, eval_users=2, max_new_tokens=8,
                 log=quiet)  # fmt: skip
    assert dpo["method"] == "dpo" and dpo["weight_change"] > 0 and dpo["pairs"]["train"] > 0

    item = train_item_writer(data, split, base, run.stage("item_sft"), **item_inputs(run, data), budget=budget,
                             progress=False,
                             train={"steps": 2, "batch_size": 4, "save_every": 0, "eval_every": 0})  # fmt: skip
    zero_shot = {data.item_ids[i] for i in split.zero_shot_items.tolist()}
    targets = [r for r in read_records(run.teacher / "items.jsonl") if parse_profile(r.profile)]
    assert item["examples"] == len([r for r in targets if r.id not in zero_shot])  # zero-shot items never train
    fixed = "User identity: A; User interests: B."
    generated = generate_item_profiles(data, split, lambda prompts: [fixed] * len(prompts), run.stage("item_sft"),
                                       **item_inputs(run, data), budget=budget)  # fmt: skip
    assert generated["items"] == data.n_items and generated["zero_shot_items"] == len(split.zero_shot_items)
    records = {r.id: r for r in read_records(run.stage("item_sft") / "items.jsonl")}
    for i in split.zero_shot_items.tolist():
        record = records[data.item_ids[i]]
        assert "users" not in record.extra  # no item prompt shows an item's users
        assert len(record.extra["neighbours"]) == 3 and "Related" in record.prompt
        assert all(int(n) % 4 == int(data.item_ids[i]) % 4 for n in record.extra["neighbours"])

    report = audit_run(run, data, split)
    assert report.ok, report.examples
    audited = set(report.files)
    assert {"teacher/users.jsonl", "collab/dialogues.jsonl", "collab/profiles.jsonl", "reward/pairs.jsonl",
            "rl/prompts.jsonl", "item_sft/train.jsonl", "item_sft/items.jsonl"} <= audited  # fmt: skip
