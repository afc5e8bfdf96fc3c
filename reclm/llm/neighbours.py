"""Similar users and related items, from TRAIN interactions and item text only (or the dataset's shipped lists).

Users: cosine top-k of the user embeddings of a CF model trained on the run's train pairs (a
``RUN/cf/<backbone>-none-s<seed>/embeddings.npz`` already there, or one trained for the purpose under
``RUN/neighbours/cf-<backbone>``), or the dataset's shipped lists. Items: ONE rule for every item, seen in
train or new (zero-shot): cosine top-k of item-text embeddings among a pool of items seen in train, never the
item itself. A trained item's interactions never choose its neighbours, since a new item has none.

Written to ``RUN/neighbours/{users,items}.npz`` (``neighbours``: ``(n, k)`` int64 indices, -1 where fewer
than k exist; ``scores``: float32 cosine), ``item_text.npz`` (the item-text embeddings, so the item side can
pick neighbours among its own pool) and ``neighbours.json`` saying where they came from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from reclm.data.dataset import RecDataset
from reclm.data.errors import DataError
from reclm.data.split import Split
from reclm.data.tables import read_jsonl
from reclm.rundir import RunDir
from reclm.utils import atomic_write

SOURCES = ("cf", "shipped")


@dataclass
class NeighbourTable:
    """Row ``i`` lists the neighbours of user/item ``i`` (best first; -1 pads)."""

    neighbours: np.ndarray
    scores: np.ndarray
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.neighbours = np.asarray(self.neighbours, dtype=np.int64)
        self.scores = np.asarray(self.scores, dtype=np.float32)
        if self.neighbours.shape != self.scores.shape or self.neighbours.ndim != 2:
            shapes = f"neighbours {self.neighbours.shape} and scores {self.scores.shape}"
            raise ValueError(f"{shapes}: expected equal (n, k) shapes")

    @property
    def k(self) -> int:
        return int(self.neighbours.shape[1])

    def __len__(self) -> int:
        return int(self.neighbours.shape[0])

    def of(self, i: int, k: int | None = None) -> list[int]:
        row = [int(j) for j in self.neighbours[i] if j >= 0]
        return row[:k] if k is not None else row

    def as_dict(self, k: int | None = None) -> dict[int, list[int]]:
        return {i: self.of(i, k) for i in range(len(self)) if self.neighbours[i, 0] >= 0}

    def save(self, path: Path) -> Path:
        with atomic_write(path) as tmp, tmp.open("wb") as handle:
            np.savez_compressed(handle, neighbours=self.neighbours, scores=self.scores, meta=json.dumps(self.meta))
        return path

    @classmethod
    def load(cls, path: Path) -> NeighbourTable:
        if not path.is_file():
            raise DataError("no neighbour table here (run `reclm neighbours RUN` first)", path)
        arrays = np.load(path)
        meta = json.loads(str(arrays["meta"])) if "meta" in arrays else {}
        return cls(arrays["neighbours"], arrays["scores"], meta)


# ---------------------------------------------------------------- similarity


def normalise_rows(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def cosine_top_k(
    vectors: np.ndarray,
    k: int,
    candidates: np.ndarray | None = None,
    queries: np.ndarray | None = None,
    query_vectors: np.ndarray | None = None,
    batch: int = 2048,
) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the ``k`` most cosine-similar rows of ``vectors`` among ``candidates`` (a bool
    mask; default all), never itself. ``queries`` (indices into ``vectors``, default all) or
    ``query_vectors`` (outside vectors, then nothing is excluded as "self"). Returns ``(n_queries, k)``
    indices (-1 pads when fewer candidates exist) and scores."""
    base = normalise_rows(vectors)
    n = len(base)
    allowed = np.ones(n, dtype=bool) if candidates is None else np.asarray(candidates, dtype=bool)
    if query_vectors is not None:
        q_all, self_index = normalise_rows(query_vectors), None
    else:
        self_index = np.arange(n) if queries is None else np.asarray(queries, dtype=np.int64)
        q_all = base[self_index]
    out_idx = np.full((len(q_all), k), -1, dtype=np.int64)
    out_score = np.zeros((len(q_all), k), dtype=np.float32)
    keep = min(k, int(allowed.sum()))
    if keep == 0:
        return out_idx, out_score
    for start in range(0, len(q_all), batch):
        sims = q_all[start : start + batch] @ base.T
        sims[:, ~allowed] = -np.inf
        if self_index is not None:
            rows = np.arange(len(sims))
            sims[rows, self_index[start : start + batch]] = -np.inf
        take = min(keep, n - 1) if self_index is not None else keep
        if take <= 0:
            continue
        part = np.argpartition(-sims, take - 1, axis=1)[:, :take]
        part_scores = np.take_along_axis(sims, part, axis=1)
        order = np.argsort(-part_scores, axis=1, kind="stable")
        idx = np.take_along_axis(part, order, axis=1)
        score = np.take_along_axis(part_scores, order, axis=1)
        valid = np.isfinite(score)
        out_idx[start : start + len(sims), :take] = np.where(valid, idx, -1)
        out_score[start : start + len(sims), :take] = np.where(valid, score, 0.0)
    return out_idx, out_score


def users_with_train(split: Split) -> np.ndarray:
    mask = np.zeros(split.n_users, dtype=bool)
    mask[split.train[:, 0]] = True
    return mask


def items_with_train(split: Split) -> np.ndarray:
    mask = np.zeros(split.n_items, dtype=bool)
    mask[split.train[:, 1]] = True
    return mask


# ---------------------------------------------------------------- CF embeddings (train pairs only)


def is_feature_free_cf_run(folder: Path) -> bool:
    """A CF run folder (``<backbone>-none-s<seed>``, trained on the run's train pairs) whose model used no
    side features: its embeddings carry the pure collaborative signal."""
    return (folder / "embeddings.npz").is_file() and "-none-" in folder.name


def find_cf_embeddings(run: RunDir, backbone: str | None = None) -> Path | None:
    """An ``embeddings.npz`` of a feature-free CF run already in ``RUN/cf``: the backbone's when there is one,
    else any (they all carry the train-only collaborative signal; training another one would cost minutes)."""
    if not run.cf.is_dir():
        return None
    folders = sorted(p for p in run.cf.iterdir() if p.is_dir() and is_feature_free_cf_run(p))
    preferred = [p for p in folders if backbone is not None and p.name.startswith(f"{backbone}-")]
    chosen = preferred or folders
    return chosen[0] / "embeddings.npz" if chosen else None


def train_neighbour_cf(
    run: RunDir, split: Split, backbone: str = "lightgcn", epochs: int = 30, seed: int = 2020
) -> Path:
    """Train a feature-free CF model on the split's train pairs for neighbour search; returns its embeddings.

    The split's validation pairs only drive early stopping (as in every CF run); test is never read for
    anything but the metrics file."""
    from reclm.cf import CFConfig, SideFeatures, train_cf

    out = run.stage("neighbours") / f"cf-{backbone}"
    if (out / "embeddings.npz").is_file():
        return out / "embeddings.npz"
    config = CFConfig(backbone=backbone, features="none", epochs=epochs, seed=seed)
    train_cf(split, config, SideFeatures(), out)
    if not (out / "embeddings.npz").is_file():
        raise DataError(f"CF backbone {backbone!r} wrote no embeddings.npz (use a dot-product backbone)", out)
    return out / "embeddings.npz"


def read_cf_embeddings(path: Path, split: Split) -> tuple[np.ndarray, np.ndarray]:
    arrays = np.load(path)
    users, items = arrays["users"], arrays["items"]
    if users.shape[0] != split.n_users or items.shape[0] != split.n_items:
        raise DataError(
            f"embeddings of {users.shape[0]} users / {items.shape[0]} items do not match the split "
            f"({split.n_users} / {split.n_items})",
            path,
        )
    return users, items


def user_neighbours_from_vectors(vectors: np.ndarray, split: Split, k: int) -> NeighbourTable:
    """Cosine top-k among users that have train interactions (others get no neighbours)."""
    active = users_with_train(split)
    idx, score = cosine_top_k(vectors, k, candidates=active)
    idx[~active] = -1
    score[~active] = 0.0
    return NeighbourTable(idx, score)


# ---------------------------------------------------------------- items: one rule for every item

ITEM_TEXT_FILE = "item_text.npz"


def item_text_vectors(data: RecDataset, encoder=None) -> np.ndarray:
    """Embeddings of every item's text (``encoder``, default the project's TextEncoder)."""
    if encoder is None:
        from reclm.text.encoder import TextEncoder

        encoder = TextEncoder()
    return np.asarray(encoder.encode(data.item_texts(), desc="item text (neighbours)"), dtype=np.float32)


def text_neighbours(vectors: np.ndarray, k: int, pool: np.ndarray) -> NeighbourTable:
    """Every item's ``k`` text-nearest items among ``pool`` (a bool mask), never itself: the same rule for an
    item seen in train and a new one."""
    idx, score = cosine_top_k(vectors, k, candidates=pool)
    return NeighbourTable(idx, score, {"items": "item text similarity", "pool": int(np.sum(pool))})


def item_neighbours(
    data: RecDataset, split: Split, k: int, text_vectors: np.ndarray | None = None, encoder=None
) -> NeighbourTable:
    """Every item's text neighbours among the items seen in train (``text_vectors``, or computed by ``encoder``)."""
    vectors = text_vectors if text_vectors is not None else item_text_vectors(data, encoder)
    table = text_neighbours(vectors, k, items_with_train(split))
    table.meta["pool"] = f"{table.meta['pool']} items seen in train"
    return table


def save_item_text(path: Path, data: RecDataset, vectors: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, ids=np.asarray(data.item_ids, dtype=str), vectors=np.asarray(vectors, dtype=np.float32))
    return path


def load_item_text(folder: Path, data: RecDataset) -> np.ndarray | None:
    """``folder/item_text.npz`` when it holds this dataset's items in order, else None."""
    path = folder / ITEM_TEXT_FILE
    if not path.is_file():
        return None
    arrays = np.load(path)
    if arrays["ids"].tolist() != list(data.item_ids):
        return None
    return arrays["vectors"]


# ---------------------------------------------------------------- shipped lists (Netflix, MIND)


def shipped_neighbours(data: RecDataset, side: str, k: int) -> NeighbourTable:
    """The dataset's ``user_neighbours`` / ``item_neighbours`` resource as a table (scores are rank-based:
    1, 1/2, 1/3...). Ids unknown to the dataset are dropped."""
    resource = f"{side}_neighbours"
    path = data.resources.get(resource)
    if path is None:
        raise DataError(f"dataset {data.name!r} ships no {resource}.jsonl: use --source cf")
    index = data.user_index() if side == "user" else data.item_index()
    n = data.n_users if side == "user" else data.n_items
    idx = np.full((n, k), -1, dtype=np.int64)
    score = np.zeros((n, k), dtype=np.float32)
    for record in read_jsonl(Path(path), [side, "neighbours"]):
        row = index.get(str(record[side]))
        if row is None:
            continue
        near = [index[str(x)] for x in record["neighbours"] if str(x) in index and index[str(x)] != row][:k]
        idx[row, : len(near)] = near
        score[row, : len(near)] = 1.0 / np.arange(1, len(near) + 1)
    return NeighbourTable(idx, score, {"source": f"shipped {resource}.jsonl"})


def drop_unseen(table: NeighbourTable, seen: np.ndarray) -> NeighbourTable:
    """Remove neighbours without train interactions (a shipped list may name them), keeping order."""
    idx = np.full_like(table.neighbours, -1)
    score = np.zeros_like(table.scores)
    for i, row in enumerate(table.neighbours):
        keep = [j for j in row if j >= 0 and seen[j]]
        idx[i, : len(keep)] = keep
        score[i, : len(keep)] = [table.scores[i, list(row).index(j)] for j in keep]
    return NeighbourTable(idx, score, table.meta)


# ---------------------------------------------------------------- the stage


def build_neighbours(
    run: RunDir,
    data: RecDataset,
    split: Split,
    k: int = 5,
    source: str = "cf",
    backbone: str = "lightgcn",
    epochs: int = 30,
    embeddings: Path | None = None,
    items: bool = True,
    encoder=None,
    users: bool = True,
) -> dict:
    """Write ``RUN/neighbours/users.npz`` (when ``users``) and ``items.npz`` + ``item_text.npz`` (when
    ``items``); returns the summary also saved as ``neighbours.json``. ``source`` is where user neighbours come
    from: ``cf`` (embeddings of a train-only CF model: ``embeddings`` if given, else one found in ``RUN/cf``,
    else one trained now) or ``shipped`` (the dataset's lists). Items always get text neighbours among the
    items seen in train (:func:`item_neighbours`)."""
    if source not in SOURCES:
        raise ValueError(f"neighbour source {source!r}: expected one of {', '.join(SOURCES)}")
    if k < 1:
        raise ValueError(f"k={k}: expected at least one neighbour")
    folder = run.stage("neighbours")
    summary: dict = {"k": k, "source": source}
    if users:
        summary.update(write_user_neighbours(run, data, split, k, source, backbone, epochs, embeddings))
    if items:
        vectors = item_text_vectors(data, encoder)
        save_item_text(folder / ITEM_TEXT_FILE, data, vectors)
        table = item_neighbours(data, split, k, text_vectors=vectors)
        table.save(folder / "items.npz")
        summary["items"] = table.meta
        summary["items_with_neighbours"] = int((table.neighbours[:, 0] >= 0).sum())
    (folder / "neighbours.json").write_text(json.dumps(summary, indent=2))
    return summary


def write_user_neighbours(
    run: RunDir,
    data: RecDataset,
    split: Split,
    k: int,
    source: str,
    backbone: str,
    epochs: int,
    embeddings: Path | None,
) -> dict:
    """``RUN/neighbours/users.npz`` from CF user embeddings or the shipped lists; returns its summary entries."""
    summary: dict = {"k": k, "source": source}
    if source == "cf":
        path = embeddings or find_cf_embeddings(run, backbone) or train_neighbour_cf(run, split, backbone, epochs)
        vectors, _ = read_cf_embeddings(Path(path), split)
        table = user_neighbours_from_vectors(vectors, split, k)
        summary["cf_embeddings"] = str(path)
    else:
        table = drop_unseen(shipped_neighbours(data, "user", k), users_with_train(split))
    table.meta.update(summary)
    table.save(run.stage("neighbours") / "users.npz")
    return {**summary, "users_with_neighbours": int((table.neighbours[:, 0] >= 0).sum())}


def read_neighbour_lists(path: Path, side: str, index: dict[str, int], n: int) -> NeighbourTable:
    """A ``{user|item: raw id, neighbours: [raw ids]}`` JSON Lines file (the pipeline's format) as a table."""
    records = read_jsonl(path, [side, "neighbours"])
    k = max((len(r["neighbours"]) for r in records), default=0)
    idx = np.full((n, max(k, 1)), -1, dtype=np.int64)
    for record in records:
        row = index.get(str(record[side]))
        if row is not None:
            near = [index[str(x)] for x in record["neighbours"] if str(x) in index and index[str(x)] != row]
            idx[row, : len(near)] = near
    score = np.where(idx >= 0, 1.0 / (1 + np.arange(idx.shape[1])), 0.0)
    return NeighbourTable(idx, score, {"source": str(path)})


def load_neighbours(run: RunDir, data: RecDataset, side: str = "user") -> NeighbourTable:
    """``RUN/neighbours/{users,items}.npz`` (this module) or ``.jsonl`` (raw-id lists)."""
    folder = run.stage("neighbours")
    name = "users" if side == "user" else "items"
    if (folder / f"{name}.npz").is_file():
        return NeighbourTable.load(folder / f"{name}.npz")
    if (folder / f"{name}.jsonl").is_file():
        index, n = (data.user_index(), data.n_users) if side == "user" else (data.item_index(), data.n_items)
        return read_neighbour_lists(folder / f"{name}.jsonl", side, index, n)
    raise DataError(f"no {side} neighbours in this run (run `reclm neighbours RUN` first)", folder)


def user_neighbour_lists(run: RunDir, data: RecDataset) -> dict[int, list[int]] | None:
    """The run's similar users as lists; None when it has none that load (callers then use random users)."""
    try:
        return load_neighbours(run, data, "user").as_dict()
    except Exception:  # noqa: BLE001 - no neighbour stage: random other users stand in
        return None


def user_vectors(run: RunDir, split: Split) -> np.ndarray | None:
    """The user embeddings the run's neighbours came from (a train-only CF model), if they are on disk."""
    folder = run.stage("neighbours")
    candidates = []
    if (folder / "users.npz").is_file():
        path = NeighbourTable.load(folder / "users.npz").meta.get("cf_embeddings")
        if path:
            candidates.append(Path(path))
    candidates += sorted(folder.glob("cf-*/embeddings.npz")) + sorted(folder.glob("model/embeddings.npz"))
    for path in candidates:
        if path.is_file():
            users, _ = read_cf_embeddings(path, split)
            return users
    return None


def nearest_among(vectors: np.ndarray, queries: list[int], pool: list[int], k: int) -> dict[int, list[int]]:
    """For each query user, its ``k`` nearest users (cosine) among ``pool``: "a neighbour that has a profile"."""
    mask = np.zeros(len(vectors), dtype=bool)
    mask[pool] = True
    idx, _ = cosine_top_k(vectors, k, candidates=mask, queries=np.asarray(queries, dtype=np.int64))
    return {q: [int(j) for j in row if j >= 0] for q, row in zip(queries, idx)}
