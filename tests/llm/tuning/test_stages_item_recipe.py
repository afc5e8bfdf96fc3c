"""The item side's one recipe (issue 18): trained and new items get item-writer prompts of the same kind (the
item's text and its text-nearest pool items with their TEACHER profiles; never the item's own users), training
prompts are built as generation prompts, and one generation pass writes every item."""

from __future__ import annotations

import numpy as np
import pytest

from reclm.llm.neighbours import build_neighbours, items_with_train
from reclm.llm.prompts import PromptBudget
from reclm.llm.records import read_profiles, read_records

GENERATED = "User identity: Written here; User interests: Written here."


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    from reclm.text.encoder import TextEncoder

    return TextEncoder(cache_dir=tmp_path_factory.mktemp("embeddings"), show_progress=False)


@pytest.fixture
def recipe_run(tiny_run, encoder):
    """Offline teacher profiles for every user and 30 of the 48 items; user neighbours from stand-in CF
    embeddings (the user side is not under test); item neighbours from the real sentence encoder."""
    from reclm.llm.teachers.offline import OfflineTeacher

    run, data, split = tiny_run
    OfflineTeacher(budget=PromptBudget(max_items=5, max_words=8), max_items=30, progress=False).run(data, split, run)
    folder = run.cf / "lightgcn-none-s0"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.savez(
        folder / "embeddings.npz", users=rng.normal(size=(data.n_users, 4)), items=rng.normal(size=(data.n_items, 4))
    )
    build_neighbours(run, data, split, k=3, encoder=encoder)
    # a budget that WOULD show 5 user profiles per item prompt: the item writer must ignore it
    budget = PromptBudget(max_items=5, max_words=8, max_profiles=5, max_neighbours=3)
    return run, data, split, budget


def expected_neighbours(data, split, teacher: dict[str, str], encoder, k: int) -> dict[int, list[int]]:
    """Brute force: each item's k most text-similar items among those seen in train with a teacher profile."""
    vectors = np.asarray(encoder.encode(data.item_texts(), desc=""), dtype=np.float64)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    held = set(split.zero_shot_items.tolist())
    pool = [j for j in np.flatnonzero(items_with_train(split)) if data.item_ids[j] in teacher and j not in held]
    out = {}
    for i in range(data.n_items):
        others = [j for j in pool if j != i]
        sims = vectors[others] @ vectors[i]
        out[i] = [others[t] for t in np.argsort(-sims, kind="stable")[:k]]
    return out


def generate_all(run, data, split, budget):
    from reclm.llm.item_side import generate_item_profiles
    from reclm.pipeline.inputs import item_inputs

    calls: list[list[str]] = []

    def writer(prompts: list[str]) -> list[str]:
        calls.append(list(prompts))
        return [GENERATED] * len(prompts)

    out = run.stage("item_sft")
    summary = generate_item_profiles(data, split, writer, out, **item_inputs(run, data), budget=budget)
    records = {r.id: r for r in read_records(run.stage("item_sft") / "items.jsonl")}
    return summary, records, calls


def test_trained_and_new_items_get_prompts_of_one_kind(recipe_run, encoder):
    run, data, split, budget = recipe_run
    teacher = read_profiles(run.teacher / "items.jsonl", "item")
    users = read_profiles(run.teacher / "users.jsonl", "user")
    expected = expected_neighbours(data, split, teacher, encoder, budget.max_neighbours)
    _, records, _ = generate_all(run, data, split, budget)
    seen = items_with_train(split)
    zero_shot = split.zero_shot_items.tolist()
    assert zero_shot and seen.sum() > len(zero_shot)
    for i in range(data.n_items):
        record = records[data.item_ids[i]]
        near = [data.item_ids[j] for j in expected[i]]
        assert record.extra["neighbours"] == near, (i, bool(seen[i]))  # text neighbours, trained or new
        for raw in near:  # each shown with its teacher profile
            assert " ".join(teacher[raw].split()) in record.prompt
        assert "Written here" not in record.prompt  # never a profile generated in the same run
        assert "Profiles of users" not in record.prompt and "users" not in record.extra
        assert not any(" ".join(p.split()) in record.prompt for p in users.values())


def test_training_prompts_are_built_as_generation_prompts(recipe_run):
    from reclm.llm.item_side import training_records
    from reclm.llm.neighbours import load_item_text

    run, data, split, budget = recipe_run
    teacher = read_profiles(run.teacher / "items.jsonl", "item")
    vectors = load_item_text(run.stage("neighbours"), data)
    assert vectors is not None and len(vectors) == data.n_items  # the neighbours stage's, not computed again
    train = {r.id: r for r in training_records(data, split, budget, run.teacher / "items.jsonl", vectors)}
    zero_shot = {data.item_ids[i] for i in split.zero_shot_items.tolist()}
    assert set(train) == set(teacher) - zero_shot
    _, generated, _ = generate_all(run, data, split, budget)
    for raw, record in train.items():
        assert record.profile == teacher[raw]
        assert record.prompt == generated[raw].prompt
        assert raw not in record.extra["neighbours"]  # never its own profile as a neighbour's


def test_one_generation_pass_writes_every_item(recipe_run):
    run, data, split, budget = recipe_run
    summary, records, calls = generate_all(run, data, split, budget)
    assert len(calls) == 1 and len(calls[0]) == data.n_items
    assert len(records) == data.n_items and all(r.profile == GENERATED for r in records.values())
    assert summary["zero_shot_items"] == len(split.zero_shot_items)


def test_keep_teacher_writes_only_the_items_without_one(recipe_run):
    from reclm.llm.item_side import generate_item_profiles
    from reclm.pipeline.inputs import item_inputs

    run, data, split, budget = recipe_run
    teacher = read_profiles(run.teacher / "items.jsonl", "item")
    zero_shot = {data.item_ids[i] for i in split.zero_shot_items.tolist()}
    calls: list[int] = []

    def writer(prompts: list[str]) -> list[str]:
        calls.append(len(prompts))
        return [GENERATED] * len(prompts)

    summary = generate_item_profiles(
        data, split, writer, run.stage("item_sft"), **item_inputs(run, data), budget=budget, keep_teacher=True
    )
    records = {r.id: r for r in read_records(run.stage("item_sft") / "items.jsonl")}
    kept = set(teacher) - zero_shot
    assert calls == [data.n_items - len(kept)] and summary["kept_teacher"] == len(kept)
    for raw, record in records.items():
        assert record.profile == (teacher[raw] if raw in kept else GENERATED)
