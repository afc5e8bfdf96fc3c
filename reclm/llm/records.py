"""Profile records: the JSON Lines files that teachers and generation write and every later stage reads.

One record per line: ``{"kind": "user"|"item", "id": raw id (str), "prompt": str, "profile": str}``,
plus optional extra keys (``source_prompt``, ``finish_reason``...). ``id`` is the dataset's raw id
(``RecDataset.user_ids[u]`` / ``item_ids[i]``).

Files are appended to one record at a time and flushed, so a crash loses at most the line being
written; a torn last line (no trailing newline) is ignored on read and cut off before the next append.
``done_ids`` tells a resumed run which ids are already answered.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from reclm.data.errors import DataError
from reclm.utils import atomic_write

Kind = Literal["user", "item"]
KINDS = ("user", "item")
CORE_KEYS = ("kind", "id", "prompt", "profile")


@dataclass
class ProfileRecord:
    kind: Kind
    id: str
    prompt: str
    profile: str
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"record kind {self.kind!r}: expected 'user' or 'item'")
        self.id = str(self.id)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "id": self.id, "prompt": self.prompt, "profile": self.profile, **self.extra}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict) -> ProfileRecord:
        extra = {k: v for k, v in data.items() if k not in CORE_KEYS}
        return cls(str(data["kind"]), str(data["id"]), str(data["prompt"]), str(data["profile"]), extra)  # type: ignore[arg-type]


def iter_records(path: str | Path) -> Iterator[ProfileRecord]:
    """Records of a JSONL file in file order; a torn last line (crash while writing) is skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError("no profile records here (expected a JSON Lines file)", path)
    with path.open("rb") as handle:
        lines = handle.read().split(b"\n")
    # split() leaves "" after a final newline; anything else in the last slot is a torn write
    last = len(lines) - 1
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            if number - 1 == last:
                return
            raise DataError(f"not valid JSON ({exc.msg}); expected one record per line", path, number) from exc
        if not isinstance(data, dict) or any(k not in data for k in CORE_KEYS):
            raise DataError(f"record lacks keys {list(CORE_KEYS)}", path, number)
        try:
            yield ProfileRecord.from_dict(data)
        except ValueError as exc:
            raise DataError(str(exc), path, number) from exc


def read_records(path: str | Path, kind: Kind | None = None) -> list[ProfileRecord]:
    """All records (optionally of one kind); when an id repeats, the last record wins."""
    latest: dict[tuple[str, str], ProfileRecord] = {}
    for record in iter_records(path):
        if kind is None or record.kind == kind:
            latest.pop((record.kind, record.id), None)
            latest[(record.kind, record.id)] = record
    return list(latest.values())


def read_profiles(path: str | Path, kind: Kind | None = None) -> dict[str, str]:
    """``{raw id: profile}`` of a records file."""
    return {r.id: r.profile for r in read_records(path, kind)}


def done_ids(path: str | Path, kind: Kind | None = None) -> set[str]:
    """Ids already present in ``path`` (empty when the file does not exist yet): what a resumed run skips."""
    path = Path(path)
    if not path.is_file():
        return set()
    return {r.id for r in iter_records(path) if kind is None or r.kind == kind}


def cut_torn_tail(path: Path) -> None:
    """Drop a last line left without its newline by a crash, so appends start on a fresh line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb+") as handle:
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) == b"\n":
            return
        handle.seek(0)
        keep = handle.read().rfind(b"\n") + 1
        handle.truncate(keep)


class RecordWriter:
    """Appends records to a JSONL file, one flushed line each; safe to share between threads.

    >>> with RecordWriter(path) as out:
    ...     out.write(ProfileRecord("user", "42", prompt, profile))
    """

    def __init__(self, path: str | Path, fsync: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cut_torn_tail(self.path)
        self.fsync = fsync
        self.lock = threading.Lock()
        self.handle = self.path.open("a", encoding="utf-8")
        self.count = 0

    def write(self, record: ProfileRecord) -> None:
        line = record.to_json() + "\n"
        with self.lock:
            self.handle.write(line)
            self.handle.flush()
            if self.fsync:
                os.fsync(self.handle.fileno())
            self.count += 1

    def write_all(self, records: Iterable[ProfileRecord]) -> int:
        n = 0
        for record in records:
            self.write(record)
            n += 1
        return n

    def close(self) -> None:
        with self.lock:
            if not self.handle.closed:
                self.handle.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def append_records(path: str | Path, records: Iterable[ProfileRecord]) -> int:
    """Append ``records`` to ``path`` (created if missing); returns how many were written."""
    with RecordWriter(path) as out:
        return out.write_all(records)


def write_records(path: str | Path, records: Iterable[ProfileRecord]) -> int:
    """Replace ``path`` with ``records`` (written to a temporary file, then renamed)."""
    with atomic_write(path) as tmp:
        return append_records(tmp, records)
