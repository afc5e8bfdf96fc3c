from __future__ import annotations

import json

import pytest

from reclm.data.errors import DataError
from reclm.llm.prompts import user_histories
from reclm.llm.records import read_records
from reclm.llm.teachers import FileTeacher, OfflineTeacher
from reclm.llm.teachers.file import source_titles, source_user_profiles


def shipped(path, key):
    return {str(r[key]): r for r in map(json.loads, path.open())}


def test_mind_subset_profiles_prompts_and_leak_note(mind, tmp_path):
    data, split = mind
    source = shipped(data.resources["teacher_user_profiles"], "user")
    index = data.user_index()
    wanted = [index[k] for k in sorted(source, key=int)[:25]]
    report = FileTeacher(progress=False).run(data, split, tmp_path, users=wanted, items=range(40))
    users = read_records(tmp_path / "teacher" / "users.jsonl")
    assert [r.id for r in users] == [data.user_ids[u] for u in wanted]
    histories = user_histories(data, split)
    for record in users:
        assert record.profile == source[record.id]["profile"].strip()
        assert record.extra["source_prompt"] == source[record.id]["prompt"]
        assert record.prompt.startswith("Now you are a user profile generator.")
        u = index[record.id]
        # the prompt shows the user's most recent train items, never a held-out one
        for i in histories[u][-10:]:
            assert repr(" ".join(data.item_fields["title"][i].split())) in record.prompt
    assert report.extra["prompt_from"] == "split"
    assert report.extra["source_items"]["test"] == 0
    assert report.extra["source_items"]["valid"] > 0
    assert any("validation" in note for note in report.notes)
    items = read_records(tmp_path / "teacher" / "items.jsonl")
    item_source = shipped(data.resources["teacher_item_profiles"], "item")
    expected = [i for i in range(40) if data.item_ids[i] in item_source]
    assert [r.id for r in items] == [data.item_ids[i] for i in expected]
    for record in items:
        assert record.profile == item_source[record.id]["profile"].strip()
        assert "Related news articles:" in record.prompt  # the paper's neighbour items, with their profiles
    assert (tmp_path / "teacher" / "report.json").is_file()
    assert json.loads((tmp_path / "teacher" / "teacher.json").read_text())["kind"] == "file"


def test_sampling_is_seeded_and_extends(mind, tmp_path):
    data, split = mind
    a = FileTeacher(max_users=10, seed=3, progress=False).run(data, split, tmp_path / "a", sides=["user"])
    FileTeacher(max_users=10, seed=3, progress=False).run(data, split, tmp_path / "b", sides=["user"])
    c = FileTeacher(max_users=20, seed=3, progress=False).run(data, split, tmp_path / "c", sides=["user"])
    assert a.written["user"] == 10 and c.written["user"] == 20
    ids = [{r.id for r in read_records(tmp_path / n / "teacher" / "users.jsonl")} for n in "abc"]
    assert ids[0] == ids[1] and ids[0] < ids[2]


def test_other_teacher_files_are_not_mixed(tiny, mind, tmp_path):
    data, split = tiny
    OfflineTeacher(progress=False).run(data, split, tmp_path)
    mind_data, mind_split = mind
    with pytest.raises(ValueError, match="--fresh"):
        FileTeacher(progress=False).run(mind_data, mind_split, tmp_path, users=[0])
    with pytest.raises(DataError, match="ships no teacher_user_profiles"):
        FileTeacher(progress=False, fresh=True).run(data, split, tmp_path)


@pytest.mark.slow
def test_netflix_prompts_rebuilt_from_the_shipped_content(netflix, tmp_path):
    """The shipped Netflix user ids do not describe the same histories as this release's interactions;
    ``auto`` measures that and re-renders the shipped prompt's own items in our format."""
    data, split = netflix
    source = shipped(data.resources["teacher_user_profiles"], "user")
    index = data.user_index()
    wanted = [index[k] for k in sorted(source, key=int)[:20]]
    report = FileTeacher(progress=False).run(data, split, tmp_path, users=wanted, items=range(30))
    assert report.extra["prompt_from"] == "source"
    overlap = report.extra["source_items"]
    assert overlap["train"] < 0.05 * sum(overlap.values())
    for record in read_records(tmp_path / "teacher" / "users.jsonl"):
        titles = [t for t, _ in source_titles(source[record.id]["prompt"])]
        assert record.profile == source[record.id]["profile"].strip()
        assert [t for t, _ in source_titles(record.prompt)] == titles[-10:]
        assert "movies the user previously watched" in record.prompt
    item_source = shipped(data.resources["teacher_item_profiles"], "item")
    for record in read_records(tmp_path / "teacher" / "items.jsonl"):
        listed = source_user_profiles(item_source[record.id]["prompt"])
        assert listed and all(f"[{p}]" in record.prompt for p in listed[-5:])
