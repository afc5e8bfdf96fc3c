"""Preference pairs (negative kinds and their proportions, users kept apart from SFT) and the reward model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from reclm.llm.loop import Checkpointing
from reclm.llm.prompts import PromptBudget, parse_profile, user_histories
from reclm.llm.records import ProfileRecord, write_records
from reclm.llm.reward import (
    NEGATIVE_KINDS,
    NEGATIVE_SHARES,
    PreferencePair,
    RewardConfig,
    allocate_kinds,
    build_pairs,
    chosen_profiles,
    evaluate_pairs,
    kind_counts,
    load_reward_model,
    make_negative,
    pairwise_loss,
    read_pairs,
    score_texts,
    sft_user_ids,
    split_by_user,
    train_reward_model,
    write_pairs,
)

OWN = "User identity: Student, Gamer, Night owl; User interests: Comedy, Horror, Sci-fi."
OTHER = "User identity: Retiree, Gardener; User interests: Westerns, History."


def profiles_for(n):
    return {u: f"User identity: Person {u}, Viewer; User interests: Topic {u % 9}, Films." for u in range(n)}


def test_allocation_matches_the_papers_proportions():
    kinds = allocate_kinds(1000, np.random.default_rng(0))
    assert kind_counts([PreferencePair(0, "", "", "", k) for k in kinds]) == {
        "neighbour": 300, "concat": 300, "identity_only": 100, "identity_dup": 100, "identity_empty": 100, "dot": 100,
    }  # fmt: skip
    for n in (1, 7, 13, 999):
        counts = {k: 0 for k in NEGATIVE_KINDS}
        for k in allocate_kinds(n, np.random.default_rng(n)):
            counts[k] += 1
        assert sum(counts.values()) == n
        assert all(abs(counts[k] - NEGATIVE_SHARES[k] * n) < 1 for k in NEGATIVE_KINDS)
    # shuffled, not in blocks
    assert len(set(kinds[:20])) >= 3


def test_each_negative_kind():
    assert make_negative("neighbour", OWN, OTHER) == OTHER
    assert make_negative("concat", OWN, OTHER) == f"{OWN} {OTHER}"
    only = make_negative("identity_only", OWN, None)
    assert only == "User identity: Student, Gamer, Night owl" and "interests" not in only.lower()
    assert make_negative("identity_dup", OWN, None) == f"{only}; {only}"
    assert make_negative("identity_empty", OWN, None) == "User identity: "
    assert make_negative("dot", OWN, None) == "."
    for kind in NEGATIVE_KINDS:
        rejected = make_negative(kind, OWN, OTHER)
        assert rejected != OWN
        if kind not in ("neighbour", "concat"):
            assert parse_profile(rejected) is None  # every degenerate kind is malformed
    with pytest.raises(ValueError, match="needs another user's profile"):
        make_negative("neighbour", OWN, None)
    with pytest.raises(ValueError, match="expected one of"):
        make_negative("shout", OWN, OTHER)


def test_pairs_on_ml100k_follow_proportions_and_use_neighbours(ml100k):
    data, split = ml100k
    chosen = profiles_for(data.n_users)
    neighbours = {u: [(u + 1) % data.n_users, (u + 2) % data.n_users] for u in range(data.n_users)}
    pairs = build_pairs(data, split, chosen, range(data.n_users), neighbours, PromptBudget(max_items=5), seed=1)
    assert len(pairs) == data.n_users
    counts = kind_counts(pairs)
    for kind in NEGATIVE_KINDS:
        assert abs(counts[kind] / len(pairs) - NEGATIVE_SHARES[kind]) < 0.01
    histories = user_histories(data, split)
    for p in pairs:
        assert p.chosen == chosen[p.user] and p.rejected != p.chosen
        assert p.items == [int(i) for i in histories[p.user][-5:]]
        if p.negative in ("neighbour", "concat"):
            assert p.other == (p.user + 1) % data.n_users  # the first neighbour with a profile
            assert chosen[p.other] in p.rejected


def test_split_by_user_keeps_users_apart(ml100k):
    data, split = ml100k
    chosen = profiles_for(200)
    pairs = build_pairs(data, split, chosen, range(200), {}, seed=2)
    train, held = split_by_user(pairs, 0.25, seed=0)
    assert len(held) == 50 and not {p.user for p in train} & {p.user for p in held}
    # neighbour negatives fall back to another user's profile when there are no neighbours
    assert all(p.other is not None and p.other != p.user for p in pairs if p.negative in ("neighbour", "concat"))


def test_pairs_leave_out_users_used_for_sft(tiny_run, tmp_path):
    run, data, split = tiny_run
    profiles = profiles_for(data.n_users)
    records = [ProfileRecord("user", data.user_ids[u], "p", profiles[u]) for u in range(10)]
    teacher = run.teacher / "users.jsonl"
    write_records(teacher, records)
    assert run.sft_heldout() is None
    assert sft_user_ids(teacher, run.sft_heldout()) == {data.user_ids[u] for u in range(10)}  # no SFT: all
    (run.stage("sft")).mkdir()
    (run.stage("sft") / "heldout.json").write_text(json.dumps({"user": [data.user_ids[8], data.user_ids[9]]}))
    used = sft_user_ids(teacher, run.sft_heldout())
    assert used == {data.user_ids[u] for u in range(8)}
    chosen = chosen_profiles(data, run.user_profiles("teacher"), exclude=used)
    assert sorted(chosen) == [8, 9]
    pairs = build_pairs(data, split, chosen, sorted(chosen), {}, seed=0)
    path = tmp_path / "pairs.jsonl"
    write_pairs(path, data, pairs, {9: "eval"})
    train, held = read_pairs(path, data)
    assert [p.user for p in train] == [8] and [p.user for p in held] == [9]
    assert held[0].rejected == pairs[1].rejected


def test_pairwise_loss_values():
    import torch

    loss = pairwise_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]))
    expected = (np.log1p(np.exp(-2.0)) + np.log(2.0)) / 2
    assert abs(float(loss) - expected) < 1e-6


def test_reward_model_learns_an_easy_preference(tiny, tiny_model):
    """A few pairwise-loss steps on the tiny model: held-out accuracy rises to (nearly) 1 on an easy case
    (a real profile against "." or "User identity: "), trained in whichever direction it starts out wrong."""
    data, split = tiny
    budget = PromptBudget(max_items=5, max_words=10)
    histories = user_histories(data, split)
    pairs = []
    for u in range(data.n_users):
        if not len(histories[u]):
            continue
        good = f"User identity: Fan of genre {u % 4}; User interests: Films, Stories."
        for kind in ("dot", "identity_empty"):
            pairs.append(
                PreferencePair(u, budget.user_prompt(data, histories[u]), good, make_negative(kind, good, None), kind)
            )
    train, held = split_by_user(pairs, 0.25, seed=0)
    model, tok = load_reward_model(str(tiny_model), config=RewardConfig(seed=0))
    before = evaluate_pairs(model, tok, held, 256)
    if before["accuracy"] > 0.5:  # make the task one the untrained model gets wrong
        flip = lambda ps: [PreferencePair(p.user, p.prompt, p.rejected, p.chosen, p.negative) for p in ps]  # noqa: E731
        train, held = flip(train), flip(held)
        before = evaluate_pairs(model, tok, held, 256)
    assert before["accuracy"] <= 0.5
    losses = train_reward_model(model, tok, train, RewardConfig(steps=8, batch_size=8, lr=1e-3, max_seq_len=256))
    after = evaluate_pairs(model, tok, held, 256)
    assert after["accuracy"] >= 0.9 and after["accuracy_mean_over_kinds"] >= 0.9
    assert after["margin_mean"] > before["margin_mean"] + 1.0
    assert np.mean(losses[-3:]) < losses[0]
    assert set(after["per_kind"]) == {"dot", "identity_empty"}


def test_a_saved_reward_model_restores_its_score_head_and_loads_without_a_load_report(tiny_model, tmp_path, caplog):
    """The base LM has no score head, so transformers reports it MISSING on every load ("Consider training
    on your downstream task"): wrong for a trained reward model, whose head the adapter restores. Hidden."""
    prompts, responses = ["Films watched: Action 1."] * 2, ["User identity: Fan; User interests: Action.", "."]
    model, tok = load_reward_model(str(tiny_model), config=RewardConfig(seed=0))
    model.save_pretrained(tmp_path / "adapter")
    again, _ = load_reward_model(str(tiny_model), adapter=tmp_path / "adapter")
    assert score_texts(again, tok, prompts, responses).tolist() == score_texts(model, tok, prompts, responses).tolist()
    other, _ = load_reward_model(str(tiny_model), config=RewardConfig(seed=1))  # another seed, another head
    assert score_texts(other, tok, prompts, responses).tolist() != score_texts(model, tok, prompts, responses).tolist()
    assert not [r for r in caplog.records if "LOAD REPORT" in r.getMessage()]


def test_interrupted_reward_training_resumes_from_its_checkpoint(tiny, tiny_model, tmp_path):
    """Saved every 2 steps; cut at step 5, the rerun continues from step 4 and ends with the same losses and
    scores as an uninterrupted run. A checkpoint of other pairs is refused, not silently resumed."""
    from reclm.llm.reward import reward_fingerprint

    data, split = tiny
    budget = PromptBudget(max_items=5, max_words=10)
    histories = user_histories(data, split)
    good = "User identity: Viewer; User interests: Films."
    train = [
        PreferencePair(u, budget.user_prompt(data, histories[u]), good, make_negative("dot", good, None), "dot")
        for u in range(data.n_users)
        if len(histories[u])
    ]
    config = RewardConfig(steps=6, batch_size=4, lr=1e-3, max_seq_len=256)
    key = reward_fingerprint(str(tiny_model), config, train)

    def train_in(folder, stop_at=None):
        model, tok = load_reward_model(str(tiny_model), config=RewardConfig(seed=0))

        def progress(step, loss):
            if step + 1 == stop_at:
                raise KeyboardInterrupt

        losses = train_reward_model(model, tok, train, config, progress, Checkpointing(folder, key, every=2))
        return losses, evaluate_pairs(model, tok, train[:6], 256)["margin_mean"]

    whole, whole_margin = train_in(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        train_in(tmp_path / "cut", stop_at=5)
    assert (tmp_path / "cut" / "checkpoint" / "adapter_config.json").is_file()  # a real saved adapter
    resumed, resumed_margin = train_in(tmp_path / "cut")
    assert resumed == pytest.approx(whole, rel=1e-5) and len(resumed) == 6
    assert resumed_margin == pytest.approx(whole_margin, rel=1e-4)

    model, tok = load_reward_model(str(tiny_model), config=RewardConfig(seed=0))
    with pytest.raises(ValueError, match="other data or settings"):
        train_reward_model(model, tok, train[1:], config, None, Checkpointing(tmp_path / "cut", "another run", 2))


def test_a_neighbour_with_the_same_profile_is_not_a_negative(ml100k):
    """Two users with the same history get the same teacher profile: that neighbour is skipped."""
    data, split = ml100k
    chosen = profiles_for(30)
    chosen[1] = chosen[0]  # user 1 reads exactly like user 0
    neighbours = {0: [1, 2], 1: [0, 3]}
    checked = 0
    for seed in range(10):
        for p in build_pairs(data, split, chosen, range(30), neighbours, seed=seed):
            assert " ".join(p.rejected.split()).lower() != " ".join(p.chosen.split()).lower()
            if p.user in (0, 1) and p.negative in ("neighbour", "concat"):
                assert p.other == {0: 2, 1: 3}[p.user]
                checked += 1
    assert checked >= 5
