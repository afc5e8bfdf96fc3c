"""The item catalog's representation matrices and exact top-k search over them.

Rows only ever get appended (items added while serving), so a reader takes a consistent view
``(buffer, n)`` without a lock while a writer fills rows past ``n`` and then publishes the new count.

Top-k is an exact inner-product search: a NumPy matrix-vector product and ``argpartition`` for small
catalogs, FAISS ``IndexFlatIP`` for large ones (``FAISS_MIN_ITEMS``, chosen by measurement: see
``benchmarks/serve_load.py --index``). The FAISS index covers the rows present when it was built; rows added
later are scored by NumPy and merged, and the index is rebuilt (then swapped in) once that tail grows.
"""

from __future__ import annotations

import threading

import numpy as np

# Catalog size from which top-k goes through FAISS IndexFlatIP. Measured with `python benchmarks/serve_load.py
# --index` on the 2-core dev machine while other jobs kept its load average at 10-12
# (top-20, d=64, 50 seen items excluded, one thread each, median of 7 runs), microseconds per query:
#   items         1k    3k    10k    30k    100k    300k      1M
#   numpy        118   206    882   3204   17673   44831  151092
#   faiss        261   390    958   3077   17079   48222  149975
#   numpy/faiss 0.45  0.53   0.92   1.04    1.03    0.93    1.01   (an earlier run: 0.49 0.53 1.01 0.86 0.88 0.97)
# Below 10k NumPy is about twice as fast (FAISS's per-call overhead); from 30k on both stream the matrix and are
# within noise of each other. FAISS takes over from 100k, well inside the range where it costs nothing.
FAISS_MIN_ITEMS = 100_000
MAX_TAIL = 1024  # rows added after the FAISS index was built, scored by NumPy, before a rebuild


class GrowingMatrix:
    """A float32 ``(n, d)`` matrix that grows by appended rows; ``view()`` is safe while a writer appends."""

    def __init__(self, rows: np.ndarray):
        rows = np.asarray(rows, dtype=np.float32)
        n, d = rows.shape
        buffer = np.empty((n + n // 4 + 16, d), np.float32)
        buffer[:n] = rows
        self._state = (buffer, n)

    @property
    def dim(self) -> int:
        return int(self._state[0].shape[1])

    def __len__(self) -> int:
        return self._state[1]

    def view(self) -> np.ndarray:
        buffer, n = self._state
        return buffer[:n]

    def append(self, rows: np.ndarray) -> None:
        """Add rows at the end (callers serialise appends; readers never see a half-written row)."""
        rows = np.asarray(rows, dtype=np.float32).reshape(-1, self.dim)
        buffer, n = self._state
        if n + len(rows) > len(buffer):
            grown = np.empty((max(2 * len(buffer), n + len(rows)), self.dim), np.float32)
            grown[:n] = buffer[:n]
            buffer = grown
        buffer[n : n + len(rows)] = rows
        self._state = (buffer, n + len(rows))


def top_from_scores(scores: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of the ``k`` best entries (score descending, index ascending on ties), never an
    excluded index. ``scores`` is modified."""
    if exclude is not None and len(exclude):
        scores[exclude] = -np.inf
    k = min(k, len(scores))
    if k <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    part = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    order = np.lexsort((part, -scores[part]))
    idx = part[order]
    keep = np.isfinite(scores[idx])
    return idx[keep].astype(np.int64), scores[idx][keep].astype(np.float32)


class ItemIndex:
    """Exact maximum-inner-product top-k over a :class:`GrowingMatrix` (NumPy, or FAISS when large)."""

    def __init__(self, matrix: GrowingMatrix, min_items: int = FAISS_MIN_ITEMS, max_tail: int = MAX_TAIL):
        self.matrix = matrix
        self.min_items = min_items
        self.max_tail = max_tail
        self.lock = threading.Lock()
        self._faiss: tuple[object, int] | None = None  # (index, rows it covers)
        self.refresh()

    @property
    def backend(self) -> str:
        return "faiss" if self._faiss is not None else "numpy"

    def refresh(self) -> None:
        """Build FAISS over the current rows when the catalog is large (or its tail grew); call after appends."""
        n = len(self.matrix)
        current = self._faiss
        if n < self.min_items or (current is not None and n - current[1] <= self.max_tail):
            return
        with self.lock:  # one rebuild at a time; readers keep using the old index meanwhile
            current = self._faiss
            if current is not None and len(self.matrix) - current[1] <= self.max_tail:
                return
            import faiss

            rows = self.matrix.view()
            index = faiss.IndexFlatIP(rows.shape[1])
            index.add(np.ascontiguousarray(rows))
            self._faiss = (index, len(rows))

    def search(self, query: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows by inner product with ``query`` (``(d,)``), excluding the indices ``exclude``."""
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(-1)
        rows = self.matrix.view()
        exclude = np.zeros(0, np.int64) if exclude is None else np.asarray(exclude, dtype=np.int64)
        current = self._faiss
        if current is None:
            return top_from_scores(rows @ query, k, exclude)
        index, covered = current
        covered = min(covered, len(rows))
        blocked = np.zeros(len(rows), bool)
        blocked[exclude] = True
        want = min(covered, k + int(np.count_nonzero(blocked[:covered])))
        scores, ids = index.search(query.reshape(1, -1), want)
        ids, scores = ids[0], scores[0]
        keep = ids >= 0
        ids, scores = ids[keep], scores[keep]
        keep = ~blocked[ids]
        ids, scores = ids[keep].astype(np.int64), scores[keep].astype(np.float32)
        if len(rows) > covered:  # rows added after the index was built
            tail = np.flatnonzero(~blocked[covered:]) + covered
            ids = np.concatenate([ids, tail])
            scores = np.concatenate([scores, rows[tail] @ query])
        order = np.lexsort((ids, -scores))[:k]
        return ids[order], scores[order]
