"""Issue 21, items 14 and 18: inputs that gave a traceback, a message without the file, or a silently wrong
dataset now give one DataError naming the file and the line (and through the CLI one line, exit code 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from reclm.cli.main import app
from reclm.data.errors import DataError
from reclm.data.loaders import load_dataset


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def atomic(folder: Path, inter: str | bytes, item: str | None = None) -> Path:
    write(folder / "x.inter", inter)
    if item is not None:
        write(folder / "x.item", item)
    return folder


ITEMS = '{"item": 2, "title": "a"}\n{"item": 3, "title": "b"}\n'

# (name, builder(tmp) -> (dataset, item_text)), file named, line, words in the message
CASES = [
    ("id beyond int64 (csv)", lambda t: (write(t / "a.csv", "user,item\n1,2\n1,99999999999999999999\n"), None),
     "a.csv", 3, "beyond the 64-bit integer range"),
    ("float id (items.jsonl)",
     lambda t: (write(t / "a.csv", "user,item\n1,2\n"), write(t / "i.jsonl", '{"item": 2}\n{"item": 1e400}\n')),
     "i.jsonl", 2, "not an integer id"),
    ("id beyond int64 (json integer)",
     lambda t: (write(t / "a.csv", "user,item\n1,2\n"), write(t / "i.jsonl", '{"item": 123456789012345678901}\n')),
     "i.jsonl", 1, "beyond the 64-bit integer range"),
    ("underscore id (csv)", lambda t: (write(t / "b.csv", "user,item\n1,1000\n2,1_000\n"), None),
     "b.csv", 3, "'1_000' is not an integer id"),
    ("underscore id (items.jsonl)",
     lambda t: (write(t / "b.csv", "user,item\n1,1000\n"), write(t / "i.jsonl", '{"item": "1_000", "title": "x"}\n')),
     "i.jsonl", 1, "'1_000' is not an integer id"),
    ("plus-signed id", lambda t: (write(t / "b.csv", "user,item\n1,7\n2,+7\n"), None), "b.csv", 3, "not an integer id"),
    ("non-UTF-8 csv", lambda t: (write(t / "c.csv", b"user,item,timestamp\n1,2,3\n1,3,\xff\xfe\n"), None),
     "c.csv", 3, "not UTF-8"),
    ("non-UTF-8 item text",
     lambda t: (write(t / "c.csv", "user,item\n1,2\n"), write(t / "i.jsonl", b'{"item": 2}\n{"item": 3, "t": "\xe9"}')),
     "i.jsonl", 2, "not UTF-8"),
    ("non-UTF-8 .inter", lambda t: (atomic(t / "f", b"user_id:token\titem_id:token\n1\t2\n\xff\t3\n"), None),
     "x.inter", 3, "not UTF-8"),
    ("inf timestamp", lambda t: (write(t / "d.csv", "user,item,timestamp\n1,2,5\n1,3,inf\n"), None),
     "d.csv", 3, "'inf' is not a finite number"),
    ("nan timestamp", lambda t: (write(t / "d.csv", "user,item,timestamp\n1,2,5\n1,3,nan\n"), None),
     "d.csv", 3, "'nan' is not a finite number"),
    ("overflowing timestamp", lambda t: (write(t / "d.csv", "user,item,timestamp\n1,2,1e400\n"), None),
     "d.csv", 2, "not a finite number"),
    ("-inf timestamp (.inter)",
     lambda t: (atomic(t / "f", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t-inf\n"), None),
     "x.inter", 2, "not a finite number"),
    ("duplicate header (csv)", lambda t: (write(t / "e.csv", "user,item,item\n1,2,3\n"), None),
     "e.csv", 1, "['item'] named more than once"),
    ("duplicate header (item text csv)",
     lambda t: (write(t / "e.csv", "user,item\n1,2\n"), write(t / "i.csv", "item,title,title\n2,a,b\n")),
     "i.csv", 1, "['title'] named more than once"),
    ("duplicate header (.inter)",
     lambda t: (atomic(t / "f", "user_id:token\titem_id:token\titem_id:float\n1\t2\t3\n"), None),
     "x.inter", 1, "'item_id' named more than once"),
    ("short .inter line", lambda t: (atomic(t / "f", "user_id:token\titem_id:token\n1\t2\n3\n4\t5\n"), None),
     "x.inter", 3, "empty 'item_id'"),
    ("short .item line",
     lambda t: (atomic(t / "f", "user_id:token\titem_id:token\n1\t2\n", "item_id:token\ttitle:token_seq\n\tx\n"), None),
     "x.item", 2, "empty 'item_id'"),
    ("line numbers count blank lines", lambda t: (write(t / "g.csv", "user,item\n1,2\n\n\n1,x\n"), None),
     "g.csv", 5, "'x' is not an integer id"),
    ("line numbers count quoted line breaks",
     lambda t: (write(t / "g.csv", "user,item\n1,2\n1,3\n"), write(t / "i.csv", 'item,title\n2,"two\nlines"\nz,b\n')),
     "i.csv", 4, "'z' is not an integer id"),
    ("line of a ragged row", lambda t: (write(t / "h.csv", "user,item\n1,2\n1,3,4\n"), None),
     "h.csv", 3, "Expected 2 fields"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "build", "file", "line", "words"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_data_error_naming_file_and_line(tmp_path, name, build, file, line, words):
    dataset, item_text = build(tmp_path)
    with pytest.raises(DataError) as info:
        load_dataset(dataset, item_text=item_text)
    error = info.value
    assert error.path is not None and error.path.name == file, str(error)
    assert error.line == line, str(error)
    assert f"{file}:{line}: " in str(error) and words in str(error)


@pytest.mark.parametrize(("name", "build", "file", "line", "words"), CASES, ids=[c[0] for c in CASES])
def test_prepare_prints_one_line_and_exits_2(tmp_path, name, build, file, line, words):
    dataset, item_text = build(tmp_path)
    args = ["prepare", "--dataset", str(dataset), "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, args + (["--item-text", str(item_text)] if item_text else []))
    assert result.exit_code == 2, result.output
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"{file}:{line}: " in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_ids_as_written(tmp_path):
    """CSV ids are the integers they spell (documented: ``007`` is 7); RecBole tokens are strings as written,
    so ``1_000`` and ``1000`` stay two items there."""
    data = load_dataset(write(tmp_path / "a.csv", "user,item\n 1 ,007\n2,7\n2,1000\n"))
    assert data.item_ids == ["7", "1000"] and data.user_ids == ["1", "2"]
    tokens = load_dataset(atomic(tmp_path / "f", "user_id:token\titem_id:token\n1\t1000\n1\t1_000\n2\t10\n"))
    assert tokens.item_ids == ["10", "1000", "1_000"] and tokens.n_interactions == 3


def test_blank_lines_bom_and_crlf_still_load(tmp_path):
    data = load_dataset(write(tmp_path / "a.csv", b"\xef\xbb\xbfuser,item,timestamp\r\n1,2,3\r\n\r\n1,3,4\r\n"))
    assert (data.n_users, data.n_items, data.n_interactions) == (1, 2, 2)
    assert data.timestamps.tolist() == [3.0, 4.0]
