"""What the server adds to a run, kept in ``RUN/serve.sqlite`` so that a restart keeps it: items added over
HTTP (text fields, profile, embeddings) and the profiles written on the fly for new users. The generation
cache of :mod:`reclm.llm.generation` lives in the same file (table ``gen``). Several servers may share the
file: writes that must agree (a fresh ``new-<n>`` id, the added-items bound) happen in one write transaction."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Container
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS serve_items (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        fields TEXT NOT NULL,
        text TEXT NOT NULL,
        profile TEXT,
        profile_source TEXT NOT NULL,
        prompt TEXT,
        encoder TEXT NOT NULL,
        text_vector BLOB NOT NULL,
        profile_vector BLOB,
        created REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS serve_users (
        key TEXT PRIMARY KEY,
        history TEXT NOT NULL,
        prompt TEXT NOT NULL,
        profile TEXT NOT NULL,
        generator TEXT NOT NULL,
        encoder TEXT NOT NULL,
        vector BLOB,
        created REAL NOT NULL,
        requests INTEGER NOT NULL DEFAULT 1)""",
)


class DuplicateItem(Exception):
    pass


class StoreFull(Exception):
    """The store holds as many rows of a kind as it is allowed to."""


def to_blob(vector: np.ndarray | None) -> bytes | None:
    return None if vector is None else np.ascontiguousarray(vector, dtype=np.float32).tobytes()


def from_blob(blob: bytes | None) -> np.ndarray | None:
    return None if blob is None else np.frombuffer(blob, dtype=np.float32).copy()


@dataclass
class StoredItem:
    id: str
    fields: dict[str, str]
    text: str
    profile: str | None
    profile_source: str  # generated | given | none
    prompt: str | None
    encoder: str
    text_vector: np.ndarray
    profile_vector: np.ndarray | None
    created: float = field(default_factory=time.time)


@dataclass
class StoredUserProfile:
    profile: str
    vector: np.ndarray | None
    encoder: str


class ServeStore:
    """Thread-safe access to ``serve.sqlite`` (one connection, one lock; WAL so readers do not block)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.db = sqlite3.connect(self.path, check_same_thread=False, timeout=60)
        with self.lock:
            self.db.execute("PRAGMA journal_mode=WAL")
            for statement in SCHEMA:
                self.db.execute(statement)
            self.db.commit()

    # ------------------------------------------------------------ items
    def items(self) -> list[StoredItem]:
        with self.lock:
            rows = self.db.execute(
                "SELECT id, fields, text, profile, profile_source, prompt, encoder, text_vector, profile_vector, "
                "created FROM serve_items ORDER BY seq"
            ).fetchall()
        return [
            StoredItem(r[0], json.loads(r[1]), r[2], r[3], r[4], r[5], r[6], from_blob(r[7]), from_blob(r[8]), r[9])
            for r in rows
        ]

    def add_item(self, item: StoredItem, start: int = 1, taken: Container[str] = (), limit: int | None = None) -> None:
        """Insert (committed before returning) in one write transaction, so that servers sharing the file
        agree: an item without an id gets the first ``new-<n>`` (``n >= start``) neither in ``taken`` nor in
        the table; :class:`StoreFull` when the table holds ``limit`` items; :class:`DuplicateItem` when the
        id is taken."""
        with self.lock:
            try:
                self.db.execute("BEGIN IMMEDIATE")
                if limit is not None and self.db.execute("SELECT COUNT(*) FROM serve_items").fetchone()[0] >= limit:
                    raise StoreFull(f"{limit} added items")
                if not item.id:
                    item.id = self.free_id(start, taken)
                self.db.execute(
                    "INSERT INTO serve_items (id, fields, text, profile, profile_source, prompt, encoder, "
                    "text_vector, profile_vector, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        item.id,
                        json.dumps(item.fields, ensure_ascii=False),
                        item.text,
                        item.profile,
                        item.profile_source,
                        item.prompt,
                        item.encoder,
                        to_blob(item.text_vector),
                        to_blob(item.profile_vector),
                        item.created,
                    ),
                )
                self.db.commit()
            except sqlite3.IntegrityError as exc:
                self.db.rollback()
                raise DuplicateItem(item.id) from exc
            except BaseException:
                self.db.rollback()
                raise

    def free_id(self, start: int, taken: Container[str]) -> str:
        """Under the write transaction of :meth:`add_item`."""
        n = start
        while f"new-{n}" in taken or self.has_item(f"new-{n}"):
            n += 1
        return f"new-{n}"

    def has_item(self, item_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM serve_items WHERE id = ?", (item_id,)).fetchone() is not None

    def update_item_vectors(self, item_id: str, encoder: str, text: np.ndarray, profile: np.ndarray | None) -> None:
        with self.lock:
            self.db.execute(
                "UPDATE serve_items SET encoder = ?, text_vector = ?, profile_vector = ? WHERE id = ?",
                (encoder, to_blob(text), to_blob(profile), item_id),
            )
            self.db.commit()

    # ------------------------------------------------------------ new users' profiles
    def user_profile(self, key: str) -> StoredUserProfile | None:
        with self.lock:
            row = self.db.execute("SELECT profile, vector, encoder FROM serve_users WHERE key = ?", (key,)).fetchone()
            if row is not None:
                self.db.execute("UPDATE serve_users SET requests = requests + 1 WHERE key = ?", (key,))
                self.db.commit()
        return None if row is None else StoredUserProfile(row[0], from_blob(row[1]), row[2])

    def put_user_profile(
        self,
        key: str,
        history: list[str],
        prompt: str,
        profile: str,
        generator: str,
        encoder: str,
        vector: np.ndarray | None,
        limit: int | None = None,
    ) -> bool:
        """Store a new user's profile (or count one more request for it); False, storing nothing, when the
        table already holds ``limit`` profiles."""
        with self.lock:
            if limit is not None:
                known = self.db.execute("SELECT 1 FROM serve_users WHERE key = ?", (key,)).fetchone()
                if not known and self.db.execute("SELECT COUNT(*) FROM serve_users").fetchone()[0] >= limit:
                    return False
            self.db.execute(
                "INSERT INTO serve_users (key, history, prompt, profile, generator, encoder, vector, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET requests = requests + 1",
                (key, json.dumps(history), prompt, profile, generator, encoder, to_blob(vector), time.time()),
            )
            self.db.commit()
        return True

    def counts(self) -> dict[str, int]:
        with self.lock:
            items = self.db.execute("SELECT COUNT(*) FROM serve_items").fetchone()[0]
            users = self.db.execute("SELECT COUNT(*) FROM serve_users").fetchone()[0]
        return {"items": int(items), "user_profiles": int(users)}

    def close(self) -> None:
        with self.lock:
            self.db.close()
