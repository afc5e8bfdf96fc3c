"""``atomic_write``: readers see the old or the new file, and a kill -9 mid-write leaves nothing they read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from reclm.llm.neighbours import NeighbourTable
from reclm.utils import TMP_SUFFIX, atomic_write, write_json

KILLED_WRITER = """
import os, sys
from reclm.utils import atomic_write
with atomic_write(sys.argv[1]) as tmp:
    tmp.write_text('{"stage": "half')
    os.kill(os.getpid(), 9)
"""


def test_a_kill_mid_write_leaves_no_file_a_json_glob_reads(tmp_path: Path) -> None:
    folder = tmp_path / "manifests"
    write_json(folder / "prepare.json", {"stage": "prepare"})
    result = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(folder / "teacher.json")], check=False)
    assert result.returncode == -9
    left = sorted(p.name for p in folder.iterdir())
    assert left == ["prepare.json", f"teacher.json{TMP_SUFFIX}"]  # the torn temp file is still there...
    readable = {p.name: json.loads(p.read_text()) for p in folder.glob("*.json")}  # ...but no reader sees it
    assert readable == {"prepare.json": {"stage": "prepare"}}


def test_the_next_write_replaces_a_leftover_temp_and_an_error_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    (tmp_path / f"a.json{TMP_SUFFIX}").write_text("torn")
    write_json(target, {"v": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.write_text('{"v": 2')
        raise RuntimeError("writer failed")
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_numpy_archives_keep_their_name(tmp_path: Path) -> None:
    table = NeighbourTable(np.array([[1, -1], [0, 1]]), np.array([[0.5, 0.0], [0.9, 0.1]]), {"k": 2})
    path = table.save(tmp_path / "items.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["items.npz"]
    loaded = NeighbourTable.load(path)
    assert loaded.neighbours.tolist() == [[1, -1], [0, 1]] and loaded.meta == {"k": 2}
