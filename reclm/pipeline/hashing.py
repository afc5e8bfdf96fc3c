"""Content hashes of a stage's inputs and outputs.

A stage's input hash includes the content hash of the external files it reads (``path_hash``); its
*output hash* covers the content of its output folder (``describe_outputs`` records each file's size,
mtime and sha256 in the manifest, ``outputs_hash`` digests them). ``outputs_intact`` tells whether a
folder still holds exactly the recorded files, so a cached stage whose output was edited or removed
runs again. ``file_sha256`` remembers each (path, size, mtime) for the life of the process.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from reclm.pipeline.config import stable_hash


def file_sha256(path: Path, _memo: dict[tuple, str] = {}) -> str:  # noqa: B006 - process-wide memo
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _memo:
        h = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                h.update(chunk)
        _memo[key] = h.hexdigest()
    return _memo[key]


def walk_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def path_hash(path: Path) -> str:
    """Content hash of a file, or of every file under a folder (names included)."""
    if path.is_file():
        return file_sha256(path)[:16]
    if path.is_dir():
        h = hashlib.sha256()
        for file in walk_files(path):
            h.update(str(file.relative_to(path)).encode() + b"\0" + file_sha256(file).encode())
        return h.hexdigest()[:16]
    return "missing"


def describe_outputs(folder: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for file in walk_files(folder):
        stat = file.stat()
        out[str(file.relative_to(folder))] = {
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "sha256": file_sha256(file),
        }
    return out


def outputs_hash(files: dict[str, dict[str, Any]]) -> str:
    return stable_hash({name: info["sha256"] for name, info in files.items()})


def outputs_intact(folder: Path, recorded: dict[str, dict[str, Any]]) -> bool:
    """True when ``folder`` holds exactly the recorded files with the recorded content (size and
    mtime unchanged are trusted; otherwise the file is hashed again)."""
    if not folder.is_dir():
        return False
    present = {str(p.relative_to(folder)): p for p in walk_files(folder)}
    if set(present) != set(recorded):
        return False
    for name, path in present.items():
        info, stat = recorded[name], path.stat()
        if stat.st_size != info["size"]:
            return False
        if stat.st_mtime_ns != info["mtime_ns"] and file_sha256(path) != info["sha256"]:
            return False
    return True
