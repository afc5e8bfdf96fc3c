"""Profile embeddings: ``RUN/profiles/{users,items}.jsonl`` (or the teacher's files) embedded with the
TextEncoder into ``RUN/embeddings/{users,items}.npz`` (``ids``: raw-id strings, ``vectors``: float32
``(n, d)``, L2-normalised) with ``{users,items}.json`` meta ``{encoder, dim, count, source}``.

This is what ``train-cf --features text+profiles --profiles RUN`` reads: readers align by raw id
(:func:`aligned_vectors`); an id without a profile gets a zero vector and counts against coverage.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from reclm.data.errors import DataError
from reclm.llm.records import read_records
from reclm.rundir import RunDir
from reclm.utils import atomic_write

FILES = {"user": "users", "item": "items"}
SOURCES = ("profiles", "teacher")


def encode_file(path: Path, kind: str, encoder, out_dir: Path, source_label: str) -> dict:
    """Embed one records file; records with an empty profile are left out (the reader zero-fills)."""
    records = [r for r in read_records(path, kind) if r.profile.strip()]  # type: ignore[arg-type]
    vectors = encoder.encode([r.profile.strip() for r in records], desc=f"encoding {kind} profiles")
    vectors = np.asarray(vectors, dtype=np.float32).reshape(len(records), -1)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = FILES[kind]
    ids = np.array([r.id for r in records], dtype=str)
    with atomic_write(out_dir / f"{name}.npz") as tmp, tmp.open("wb") as handle:
        np.savez(handle, ids=ids, vectors=vectors)
    meta = {"encoder": encoder.name, "dim": int(vectors.shape[1]), "count": len(records), "source": source_label}
    (out_dir / f"{name}.json").write_text(json.dumps(meta, indent=2))
    return meta


def encode_run(run: str | Path | RunDir, source: str = "profiles", encoder=None, kinds=("user", "item")) -> dict:
    """Embed ``RUN/<source>/{users,items}.jsonl`` (those present) into ``RUN/embeddings``;
    returns ``{kind: meta}``."""
    if source not in SOURCES:
        raise ValueError(f"source {source!r}: expected one of {SOURCES}")
    run = run if isinstance(run, RunDir) else RunDir(run)
    folder = run.root / source
    present = {k: folder / f"{FILES[k]}.jsonl" for k in kinds if (folder / f"{FILES[k]}.jsonl").is_file()}
    if not present:
        hint = "reclm profile" if source == "profiles" else "reclm teacher"
        raise DataError(f"no {source} to encode (expected users.jsonl and/or items.jsonl; run `{hint}` first)", folder)
    if encoder is None:
        from reclm.text.encoder import TextEncoder

        encoder = TextEncoder()
    out = {}
    for kind, path in present.items():
        out[kind] = encode_file(path, kind, encoder, run.embeddings, f"{source}/{path.name}")
    return out


def load_vectors(path: str | Path) -> tuple[list[str], np.ndarray]:
    """``(ids, vectors)`` of an embeddings ``.npz``."""
    path = Path(path)
    if not path.is_file():
        raise DataError("no embeddings here (run `reclm encode` first)", path)
    with np.load(path) as data:
        if "ids" not in data or "vectors" not in data:
            raise DataError("embeddings file lacks 'ids' / 'vectors'", path)
        ids, vectors = [str(i) for i in data["ids"]], data["vectors"].astype(np.float32)
    if len(ids) != len(vectors):
        raise DataError(f"{len(ids)} ids for {len(vectors)} vectors: expected aligned", path)
    return ids, vectors


def aligned_vectors(path: str | Path, raw_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Vectors aligned to ``raw_ids`` (dataset order): ``(matrix (n, d), covered mask)``; ids without
    a profile get zeros."""
    ids, vectors = load_vectors(path)
    row = {i: k for k, i in enumerate(ids)}
    matrix = np.zeros((len(raw_ids), vectors.shape[1]), dtype=np.float32)
    covered = np.zeros(len(raw_ids), dtype=bool)
    for k, raw in enumerate(raw_ids):
        j = row.get(str(raw))
        if j is not None:
            matrix[k] = vectors[j]
            covered[k] = True
    return matrix, covered
