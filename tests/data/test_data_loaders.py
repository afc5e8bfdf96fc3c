"""Every kind of bad input raises DataError naming the file (and the line where there is one);
the CLI turns it into one ``error:`` line and exit code 2."""

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from reclm.cli.main import app
from reclm.data.errors import DataError
from reclm.data.loaders import load_dataset


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def paper(folder: Path, interactions: str, items: str = '{"item": 2, "title": "x"}\n{"item": 3, "title": "y"}\n'):
    write(folder / "interactions.csv", interactions)
    write(folder / "items.jsonl", items)
    return folder


# (name, builder(tmp) -> spec, kwargs, file that must be named, line or None, words in the message)
CASES = [
    ("missing csv", lambda t: t / "none.csv", {}, "none.csv", None, "no such dataset"),
    ("missing items.jsonl", lambda t: write(t / "p" / "interactions.csv", "user,item\n1,2\n").parent, {},
     "items.jsonl", None, "missing"),
    ("csv bad header", lambda t: write(t / "a.csv", "usr,item\n1,2\n"), {}, "a.csv", 1, "bad header"),
    ("atomic bad header", lambda t: write(t / "f" / "x.inter", "user_id:tok\titem_id:token\n1\t2\n").parent, {},
     "x.inter", 1, "bad header"),
    ("csv non-integer id", lambda t: write(t / "b.csv", "user,item\n1,2\nx,3\n"), {}, "b.csv", 3, "not an integer"),
    ("paper non-integer item", lambda t: paper(t / "p", "user,item\n1,2\n1,2.5\n"), {}, "interactions.csv", 3,
     "not an integer"),
    ("csv duplicated row", lambda t: write(t / "c.csv", "user,item\n1,2\n1,3\n1,2\n"), {}, "c.csv", 4, "duplicated"),
    ("atomic duplicated row", lambda t: write(t / "g" / "x.inter", "user_id:token\titem_id:token\n1\t2\n1\t2\n").parent,
     {}, "x.inter", 3, "duplicated"),
    ("unknown item", lambda t: paper(t / "p", "user,item\n1,2\n1,4\n"), {}, "interactions.csv", 3, "'4' has no entry"),
    ("bad json line", lambda t: paper(t / "p", "user,item\n1,2\n", '{"item": 2}\n{bad\n'), {}, "items.jsonl", 2,
     "not valid JSON"),
    ("bad split value", lambda t: paper(t / "p", "user,item,split\n1,2,train\n1,3,dev\n"), {}, "interactions.csv", 3,
     "expected 'train' or 'test'"),
    ("no rows", lambda t: write(t / "h.csv", "user,item\n"), {}, "h.csv", 2, "no rows"),
    ("empty after filtering",
     lambda t: write(t / "e" / "x.inter", "user_id:token\titem_id:token\trating:float\n1\t2\t1\n1\t3\t2\n").parent,
     {"min_rating": 4}, "x.inter", None, "no interactions left after filtering"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "build", "kwargs", "file", "line", "words"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_data_error_with_file_and_line(tmp_path, name, build, kwargs, file, line, words):
    spec = build(tmp_path)
    with pytest.raises(DataError) as info:
        load_dataset(spec, **kwargs)
    error = info.value
    assert error.path is not None and error.path.name == file
    assert error.line == line
    message = str(error)
    assert file in message and words in message
    if line is not None:
        assert f"{file}:{line}:" in message


@pytest.mark.parametrize(("name", "build", "kwargs", "file", "line", "words"), CASES[:9], ids=[c[0] for c in CASES[:9]])
def test_cli_prints_one_error_line_and_exits_2(tmp_path, name, build, kwargs, file, line, words):
    result = CliRunner().invoke(app, ["datasets", str(build(tmp_path))])
    assert result.exit_code == 2
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and file in lines[0]
    assert "Traceback" not in result.output


def test_good_inputs_load(tmp_path):
    data = load_dataset(write(tmp_path / "ok.csv", "user,item,timestamp\n5,7,3\n5,9,1\n6,7,2\n"))
    assert (data.n_users, data.n_items, data.n_interactions) == (2, 2, 3)
    assert data.user_ids == ["5", "6"] and data.item_ids == ["7", "9"]
    p = load_dataset(paper(tmp_path / "p", "user,item,split\n1,2,train\n1,3,test\n"))
    assert p.snapshot.tolist() == ["train", "test"] and p.item_text(1) == "title: y"


def test_ml100k_is_read_from_the_recbole_wheel():
    data = load_dataset("ml-100k")
    assert (data.n_users, data.n_items, data.n_interactions) == (943, 1682, 100000)
    assert "Toy Story" in data.item_text(0) and data.user_fields is not None
    assert np.bincount(data.inter_user).min() >= 20
