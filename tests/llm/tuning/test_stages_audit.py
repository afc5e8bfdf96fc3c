"""The leakage audit passes clean stage files and catches a held-out pair by ids, by text, and in item prompts."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from reclm.cli.main import app
from reclm.llm.audit import HeldOut, audit_files, audit_run, item_signatures
from reclm.llm.prompts import PromptBudget, item_prompts, user_histories, user_prompt, user_prompts
from reclm.llm.records import ProfileRecord, write_records


def held_pair(split):
    """A (user, item) held out (validation or test) whose item the user never has in train."""
    train = {(u, i) for u, i in split.train.tolist()}
    for u, i in split.test.tolist():
        if (u, i) not in train:
            return u, i
    raise AssertionError("no held-out pair")


STYLES = ("paper", "compact")


def teacher_records(data, split, users, style="paper"):
    prompts = user_prompts(data, split, users, PromptBudget(max_items=10, max_words=20, style=style))
    return [
        ProfileRecord("user", data.user_ids[u], p, "User identity: A; User interests: B.") for u, p in prompts.items()
    ]


@pytest.mark.parametrize("style", STYLES)
def test_clean_user_prompts_pass(tiny, tmp_path, style):
    data, split = tiny
    path = tmp_path / "teacher" / "users.jsonl"
    write_records(path, teacher_records(data, split, range(data.n_users), style))
    report = audit_files(data, split, [path], tmp_path)
    assert report.ok and report.files["teacher/users.jsonl"].text_segments == data.n_users


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("where", ["last", "first"])
def test_a_test_item_in_a_user_prompt_is_caught_by_text(tiny, tmp_path, style, where):
    data, split = tiny
    u, i = held_pair(split)
    train = list(user_histories(data, split)[u])
    history = train + [i] if where == "last" else [i] + train  # the bug the audit must catch
    records = teacher_records(data, split, range(data.n_users), style)
    records = [r for r in records if r.id != data.user_ids[u]]
    records.append(ProfileRecord("user", data.user_ids[u], user_prompt(data, history, 20, 20, None, style), "x"))
    path = tmp_path / "sft" / "train.jsonl"
    write_records(path, records)
    report = audit_files(data, split, [path], tmp_path)
    assert report.leaks == 1
    assert f"held-out item {data.item_ids[i]} shown for user {data.user_ids[u]}" in report.examples[0]


def test_a_held_out_pair_named_by_ids_is_caught(tiny, tmp_path):
    data, split = tiny
    u, i = held_pair(split)
    raw_u, raw_i = data.user_ids[u], data.item_ids[i]
    path = tmp_path / "reward" / "pairs.jsonl"
    lines = [
        {
            "kind": "user",
            "id": raw_u,
            "prompt": "no items here",
            "chosen": "a",
            "rejected": "b",
            "items": {raw_u: [raw_i]},
        },
        {"kind": "dialogue", "id": raw_u, "messages": [{"role": "user", "content": "hi"}], "question": [raw_u, raw_i]},
    ]
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    report = audit_files(data, split, [path], tmp_path)
    assert report.leaks == 2
    assert all("held-out pair" in e for e in report.examples)


def teacher_user_profiles(data, tmp_path):
    """A distinct teacher profile per user, written to RUN/teacher/users.jsonl."""
    profiles = {v: f"User identity: Person {v}; User interests: Thing {v}." for v in range(data.n_users)}
    users_file = tmp_path / "teacher" / "users.jsonl"
    write_records(users_file, [ProfileRecord("user", data.user_ids[v], "p", profiles[v]) for v in profiles])
    return profiles, users_file


def assert_item_prompt_leak_caught(data, split, tmp_path, users_file, item, clean, bad):
    """The clean item prompt passes the audit; the one showing a held-out user's profile is one leak."""
    items_file = tmp_path / "teacher" / "items.jsonl"
    write_records(items_file, [ProfileRecord("item", data.item_ids[item], clean, "x")])
    assert audit_files(data, split, [users_file, items_file], tmp_path).ok
    write_records(items_file, [ProfileRecord("item", data.item_ids[item], bad, "x")])
    report = audit_files(data, split, [users_file, items_file], tmp_path)
    assert report.leaks == 1 and "whose pair with it is held out" in report.examples[0]


def test_a_held_out_users_profile_in_a_compact_item_prompt_is_caught(tiny, tmp_path):
    data, split = tiny
    u, i = held_pair(split)
    profiles, users_file = teacher_user_profiles(data, tmp_path)
    budget = PromptBudget(style="compact")
    clean = item_prompts(data, split, [i], profiles, budget=budget)[i]
    train_users = [v for v, j in split.train.tolist() if j == i and v != u][:2]
    shown = [profiles[v] for v in train_users] + [profiles[u]]
    bad = budget.item_prompt(data, i, user_profiles=shown)
    assert "\n- " + profiles[u] in bad
    assert_item_prompt_leak_caught(data, split, tmp_path, users_file, i, clean, bad)


def test_a_held_out_users_profile_in_an_item_prompt_is_caught(tiny, tmp_path):
    data, split = tiny
    u, i = held_pair(split)
    profiles, users_file = teacher_user_profiles(data, tmp_path)
    clean = item_prompts(data, split, [i], profiles)[i]  # train users only
    bad = clean.replace("Please provide", f"Profiles of users who interacted with it: [{profiles[u]}]. Please provide")
    if "Profiles of users who" in clean:  # the item has train users: put the held-out user's profile among them
        bad = clean.replace("it: [", f"it: [{profiles[u]}][", 1)
    assert_item_prompt_leak_caught(data, split, tmp_path, users_file, i, clean, bad)


def test_signatures_do_not_confuse_prefixes(tiny):
    data, _ = tiny
    signatures = item_signatures(data)
    # "Film number 1 of the ..." must not match "Film number 10 of the ..."
    one = next(i for i, t in enumerate(data.item_fields["title"]) if t.startswith("Film number 1 "))
    ten = next(i for i, t in enumerate(data.item_fields["title"]) if t.startswith("Film number 10 "))
    from reclm.llm.prompts import render_item

    assert not any(s in render_item(data, ten, 30) for s in signatures[one])
    assert any(s in render_item(data, one, 30) for s in signatures[one])
    assert any(s in render_item(data, one, 3) for s in signatures[one])  # a title cut short still matches
    for cut in (30, 3):  # compact lines: "- <title> (<other fields>)"
        assert not any(s in "\n- " + render_item(data, ten, cut, style="compact") for s in signatures[one])
        assert any(s in "\n- " + render_item(data, one, cut, style="compact") for s in signatures[one])


def test_held_out_excludes_pairs_also_in_train(tiny):
    data, split = tiny
    held = HeldOut(data, split)
    for u, i in split.train.tolist():
        assert i not in held.held[u]


def test_audit_command_exit_codes(tiny_run):
    run, data, split = tiny_run
    write_records(run.teacher / "users.jsonl", teacher_records(data, split, range(data.n_users)))
    runner = CliRunner()
    result = runner.invoke(app, ["audit", str(run.root)])
    assert result.exit_code == 0, result.output
    assert json.loads((run.root / "audit.json").read_text())["ok"] is True
    u, i = held_pair(split)
    bad = ProfileRecord("user", data.user_ids[u], user_prompt(data, [i], 5, 20), "x")
    write_records(run.stage("rl") / "prompts.jsonl", [bad])
    result = runner.invoke(app, ["audit", str(run.root)])
    assert result.exit_code == 1
    report = audit_run(run)
    assert report.files["rl/prompts.jsonl"].leaks == 1
