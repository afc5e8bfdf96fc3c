"""Collaborative dialogues: the masked item, the two turns, response-only labels, the 50/50 balance, no leakage."""

from __future__ import annotations

import numpy as np
import pytest

from reclm.llm.audit import audit_files
from reclm.llm.chat import IGNORE_INDEX, training_example
from reclm.llm.collab import (
    NO,
    YES,
    CollabBudget,
    build_dialogues,
    held_out_items,
    read_dialogues,
    segments,
    write_dialogues,
)
from reclm.llm.neighbours import user_neighbours_from_vectors
from reclm.llm.prompts import render_item, user_histories


def fake_profiles(data):
    return {u: f"User identity: Person {u}, Viewer; User interests: Topic {u % 7}, Films." for u in range(data.n_users)}


@pytest.fixture(scope="module")
def ml_dialogues(ml100k):
    data, split = ml100k
    neighbours = user_neighbours_from_vectors(split.train_matrix().toarray(), split, 5).as_dict()
    built = build_dialogues(data, split, neighbours, fake_profiles(data), range(data.n_users), CollabBudget(), seed=3)
    return data, split, neighbours, built


def test_every_dialogue_masks_a_train_item_and_asks_the_right_question(ml_dialogues):
    data, split, neighbours, built = ml_dialogues
    histories = user_histories(data, split)
    held = held_out_items(split)
    assert len(built.dialogues) == data.n_users  # every ml-100k user has >= 2 train items and a profile here
    for d in built.dialogues:
        train = set(histories[d.user].tolist())
        assert d.masked_item in train
        assert d.masked_item not in d.shown[d.user]  # masked: not in the target's listing
        assert set(d.shown[d.user]) <= train
        target_text = segments(d.messages[1]["content"])[data.user_ids[d.user]]
        assert render_item(data, d.masked_item, CollabBudget().max_words) not in target_text
        assert d.neighbours == [v for v in neighbours[d.user] if v != d.user][: len(d.neighbours)]
        for v in d.neighbours:
            assert set(d.shown[v]) <= set(histories[v].tolist())
        if d.answer == YES:
            assert d.question_item == d.masked_item
        else:
            assert d.question_item not in train and d.question_item not in held[d.user]
            if d.negative_source == "neighbours":
                assert any(d.question_item in set(histories[v].tolist()) for v in d.neighbours)
        assert d.messages[-1] == {"role": "assistant", "content": d.answer}
        question = d.messages[3]["content"]
        assert (
            question.startswith(f"Will user {data.user_ids[d.user]} interact with")
            and "Just answer Yes or No" in question
        )
        assert render_item(data, d.question_item, CollabBudget().max_words) in question


def test_answers_are_balanced_fifty_fifty(ml_dialogues):
    _, _, _, built = ml_dialogues
    answers = [d.answer for d in built.dialogues]
    assert abs(answers.count(YES) - answers.count(NO)) <= 1
    # and not in a pattern: shuffled across users
    first_half = [a == YES for a in answers[: len(answers) // 2]]
    assert 0.4 < np.mean(first_half) < 0.6
    # negatives come from the neighbours' items almost always
    sources = [d.negative_source for d in built.dialogues if d.answer == NO]
    assert sources.count("neighbours") / len(sources) > 0.95


def test_turn_one_response_has_every_profile_in_order(ml_dialogues):
    data, _, _, built = ml_dialogues
    profiles = fake_profiles(data)
    d = built.dialogues[0]
    lines = d.messages[2]["content"].split("\n")
    assert len(lines) == 1 + len(d.neighbours)
    for line, u in zip(lines, [d.user, *d.neighbours]):
        assert line == f"User {data.user_ids[u]}: {profiles[u]}"


def test_labels_cover_both_assistant_responses_only(ml_dialogues, tokenizer):
    _, _, _, built = ml_dialogues
    d = built.dialogues[1]
    example = training_example(tokenizer, d.messages)
    labelled = [t for t, lab in zip(example.input_ids, example.labels) if lab != IGNORE_INDEX]
    text = tokenizer.decode(labelled)
    assert d.messages[2]["content"] in text and d.answer in text
    # nothing of the user turns or the system prompt is trained on
    assert "Will user" not in text and "previously" not in text and "concise profiles" not in text
    # exactly two labelled spans
    spans = np.diff(np.r_[0, (np.array(example.labels) != IGNORE_INDEX).astype(int), 0])
    assert (spans == 1).sum() == 2


def test_token_budget_shrinks_listings(ml100k, tokenizer):
    from reclm.llm.prompts import count_tokens

    data, split = ml100k
    neighbours = user_neighbours_from_vectors(split.train_matrix().toarray(), split, 5).as_dict()
    budget = CollabBudget(target_items=10, neighbour_items=5, neighbours=3, max_tokens=400)
    built = build_dialogues(data, split, neighbours, fake_profiles(data), range(40), budget, tokenizer, seed=0)
    for d in built.dialogues:
        text = "\n".join(m["content"] for m in d.messages)
        assert count_tokens(tokenizer, text) <= 400 or (len(d.shown[d.user]) == 1 and not d.neighbours)
    assert max(len(d.shown[d.user]) for d in built.dialogues) < 10  # the budget did cut


def test_users_without_profile_or_history_are_skipped(tiny):
    data, split = tiny
    neighbours = {u: [(u + 1) % data.n_users] for u in range(data.n_users)}
    profiles = {u: p for u, p in fake_profiles(data).items() if u % 2 == 0}
    built = build_dialogues(data, split, neighbours, profiles, range(data.n_users), seed=0)
    assert {d.user for d in built.dialogues} <= set(profiles)
    assert built.skipped["no profile"] == data.n_users // 2
    for d in built.dialogues:
        assert all(v in profiles for v in d.neighbours)


def test_dialogue_files_pass_the_leakage_audit(ml_dialogues, tmp_path):
    data, split, _, built = ml_dialogues
    path = tmp_path / "collab" / "dialogues.jsonl"
    write_dialogues(path, data, built.dialogues)
    records = read_dialogues(path)
    assert len(records) == len(built.dialogues)
    assert records[0]["question"][0] == records[0]["id"]
    report = audit_files(data, split, [path], tmp_path)
    stats = report.files["collab/dialogues.jsonl"]
    assert report.ok, report.examples
    assert stats.id_pairs > 10 * len(records) and stats.text_segments >= len(records)
