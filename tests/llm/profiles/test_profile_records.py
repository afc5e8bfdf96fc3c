from __future__ import annotations

import json
import threading

import pytest

from reclm.data.errors import DataError
from reclm.llm.records import (
    ProfileRecord,
    RecordWriter,
    append_records,
    done_ids,
    read_profiles,
    read_records,
    write_records,
)


def rec(kind: str, id_: str, profile: str = "User identity: A; User interests: B.") -> ProfileRecord:
    return ProfileRecord(kind, id_, f"prompt {id_}", profile)


def test_round_trip_keeps_extra_keys(tmp_path):
    path = tmp_path / "users.jsonl"
    write_records(path, [ProfileRecord("user", 7, "p", "x", {"source_prompt": "sp"})])
    line = json.loads(path.read_text())
    assert line == {"kind": "user", "id": "7", "prompt": "p", "profile": "x", "source_prompt": "sp"}
    [back] = read_records(path)
    assert back.id == "7" and back.extra == {"source_prompt": "sp"}


def test_append_resume_and_last_record_wins(tmp_path):
    path = tmp_path / "profiles.jsonl"
    assert done_ids(path) == set()
    append_records(path, [rec("user", "1"), rec("item", "1")])
    append_records(path, [rec("user", "2"), rec("user", "1", "User identity: C; User interests: D.")])
    assert done_ids(path, "user") == {"1", "2"}
    assert done_ids(path, "item") == {"1"}
    assert read_profiles(path, "user") == {"1": "User identity: C; User interests: D.", "2": rec("user", "2").profile}
    assert len(read_records(path)) == 3


def test_torn_last_line_is_ignored_then_cut_before_append(tmp_path):
    path = tmp_path / "users.jsonl"
    append_records(path, [rec("user", "1")])
    with path.open("a") as handle:
        handle.write('{"kind": "user", "id": "2", "pro')  # a crash mid-write
    assert done_ids(path) == {"1"}
    append_records(path, [rec("user", "3")])
    assert [r.id for r in read_records(path)] == ["1", "3"]
    assert path.read_text().count("\n") == 2


def test_corrupt_line_in_the_middle_is_an_error_with_its_line(tmp_path):
    path = tmp_path / "users.jsonl"
    path.write_text(rec("user", "1").to_json() + "\nnot json\n" + rec("user", "2").to_json() + "\n")
    with pytest.raises(DataError) as info:
        read_records(path)
    assert info.value.line == 2


def test_missing_keys_and_bad_kind_are_errors(tmp_path):
    path = tmp_path / "users.jsonl"
    path.write_text('{"kind": "user", "id": "1", "prompt": "p"}\n')
    with pytest.raises(DataError, match="lacks keys"):
        read_records(path)
    with pytest.raises(ValueError, match="kind"):
        ProfileRecord("shop", "1", "p", "x")


def test_writer_is_safe_across_threads(tmp_path):
    path = tmp_path / "users.jsonl"
    with RecordWriter(path) as out:
        threads = [
            threading.Thread(target=lambda k=k: [out.write(rec("user", f"{k}-{j}")) for j in range(50)])
            for k in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(done_ids(path)) == 200
