"""Train / validation / test splits, deterministic from a seed, saved with every run.

Zero-shot items never appear in train or validation: their interactions are test-only, and the
zero-shot evaluation ranks only them. Full-shot evaluation uses the test pairs on the other items.
Cold-validation items (``cold_valid_fraction``) are held out the same way, but their interactions form
the ``cold_valid`` pairs: the zero-shot counterpart of validation, so that the epoch for zero-shot ranking
is chosen without reading test (docs/evaluation.md).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import scipy.sparse as sp

from reclm.data.dataset import RecDataset
from reclm.data.errors import DataError

SplitMethod = Literal["auto", "random", "temporal", "snapshot"]
ZeroShotChoice = Literal["random", "latest"]
COLD_VALID_STREAM = 1  # the cold-validation draw has its own random stream: the rest of the split is unchanged


@dataclass
class SplitSpec:
    """How to split. ``auto``: the source's own split when it has one (MIND snapshots, Netflix new
    items), else per-user random. ``zero_shot_fraction`` holds out that share of items entirely
    (ignored where the source defines its new items): a seeded ``random`` sample, or the ``latest`` items
    (those whose first interaction comes last; needs timestamps). ``cold_valid_fraction`` holds out that
    share of the other items (interacted with, in the train snapshot for ``snapshot``) as cold-validation
    items: random, or the latest ones before the zero-shot items when ``zero_shot`` is ``latest``."""

    method: SplitMethod = "auto"
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    zero_shot_fraction: float = 0.1
    seed: int = 2020
    cold_valid_fraction: float = 0.0
    zero_shot: ZeroShotChoice = "random"

    def __post_init__(self) -> None:
        self.ratios = tuple(float(r) for r in self.ratios)  # type: ignore[assignment]
        if len(self.ratios) != 3 or any(r < 0 for r in self.ratios) or abs(sum(self.ratios) - 1) > 1e-6:
            raise ValueError(f"split ratios {self.ratios}: expected three non-negative numbers summing to 1")
        if not 0 <= self.zero_shot_fraction < 1:
            raise ValueError(f"zero_shot_fraction {self.zero_shot_fraction}: expected a value in [0, 1)")
        if not 0 <= self.cold_valid_fraction < 1 - self.zero_shot_fraction:
            raise ValueError(
                f"cold_valid_fraction {self.cold_valid_fraction}: expected a value in [0, 1 - zero_shot_fraction)"
            )
        if self.zero_shot not in ("random", "latest"):
            raise ValueError(f"zero_shot {self.zero_shot!r}: expected 'random' or 'latest'")


def no_items() -> np.ndarray:
    return np.zeros(0, np.int64)


def no_pairs() -> np.ndarray:
    return np.zeros((0, 2), np.int64)


@dataclass
class Split:
    """Pairs as ``(n, 2)`` int64 arrays of (user index, item index). ``cold_valid`` holds the pairs of the
    ``cold_valid_items`` (which are in no other array) by users with a train pair."""

    n_users: int
    n_items: int
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    zero_shot_items: np.ndarray
    meta: dict = field(default_factory=dict)
    cold_valid_items: np.ndarray = field(default_factory=no_items)
    cold_valid: np.ndarray = field(default_factory=no_pairs)

    # ------------------------------------------------------------ views

    def item_mask(self, items: np.ndarray) -> np.ndarray:
        mask = np.zeros(self.n_items, dtype=bool)
        mask[items] = True
        return mask

    @property
    def zero_shot_mask(self) -> np.ndarray:
        return self.item_mask(self.zero_shot_items)

    @property
    def cold_valid_mask(self) -> np.ndarray:
        return self.item_mask(self.cold_valid_items)

    @property
    def held_out_mask(self) -> np.ndarray:
        """Items never trained on: zero-shot and cold-validation items."""
        return self.zero_shot_mask | self.cold_valid_mask

    def matrix(self, pairs: np.ndarray) -> sp.csr_matrix:
        data = np.ones(len(pairs), dtype=np.float32)
        m = sp.csr_matrix((data, (pairs[:, 0], pairs[:, 1])), shape=(self.n_users, self.n_items))
        m.sum_duplicates()
        m.data[:] = 1.0
        return m

    def train_matrix(self) -> sp.csr_matrix:
        return self.matrix(self.train)

    def full_shot_test(self) -> np.ndarray:
        return self.test[~self.zero_shot_mask[self.test[:, 1]]]

    def zero_shot_test(self) -> np.ndarray:
        return self.test[self.zero_shot_mask[self.test[:, 1]]]

    def train_histories(self) -> list[np.ndarray]:
        """Per-user train items in their split order (chronological when the split is temporal)."""
        order = np.argsort(self.train[:, 0], kind="stable")
        users, items = self.train[order, 0], self.train[order, 1]
        bounds = np.searchsorted(users, np.arange(self.n_users + 1))
        return [items[bounds[u] : bounds[u + 1]] for u in range(self.n_users)]

    def stats(self) -> dict[str, int]:
        return {
            "train": len(self.train),
            "valid": len(self.valid),
            "test": len(self.test),
            "test_full_shot": len(self.full_shot_test()),
            "test_zero_shot": len(self.zero_shot_test()),
            "zero_shot_items": len(self.zero_shot_items),
            "cold_valid": len(self.cold_valid),
            "cold_valid_items": len(self.cold_valid_items),
            "cold_valid_users": int(len(np.unique(self.cold_valid[:, 0]))),
            "users_with_train": int(len(np.unique(self.train[:, 0]))),
        }

    # ------------------------------------------------------------ persistence

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            folder / "split.npz",
            train=self.train,
            valid=self.valid,
            test=self.test,
            zero_shot_items=self.zero_shot_items,
            cold_valid_items=self.cold_valid_items,
            cold_valid=self.cold_valid,
        )
        info = {"n_users": self.n_users, "n_items": self.n_items, "meta": self.meta, "stats": self.stats()}
        (folder / "split.json").write_text(json.dumps(info, indent=2))
        return folder / "split.npz"

    @classmethod
    def load(cls, folder: str | Path) -> Split:
        folder = Path(folder)
        info_path = folder / "split.json"
        if not info_path.is_file() or not (folder / "split.npz").is_file():
            raise DataError("no saved split here (expected split.json and split.npz)", folder)
        info = json.loads(info_path.read_text())
        arrays = np.load(folder / "split.npz")
        saved = set(arrays.files)  # splits saved before cold validation have no cold_valid arrays
        return cls(
            n_users=info["n_users"],
            n_items=info["n_items"],
            train=arrays["train"],
            valid=arrays["valid"],
            test=arrays["test"],
            zero_shot_items=arrays["zero_shot_items"],
            meta=info["meta"],
            cold_valid_items=arrays["cold_valid_items"] if "cold_valid_items" in saved else no_items(),
            cold_valid=arrays["cold_valid"] if "cold_valid" in saved else no_pairs(),
        )


# ---------------------------------------------------------------- split builders


def ratio_counts(n: int, ratios: tuple[float, float, float]) -> tuple[int, int, int]:
    """Sizes of (train, valid, test) for one user's ``n`` interactions; train keeps at least one."""
    n_valid = int(ratios[1] * n)
    n_test = int(ratios[2] * n)
    if n_valid == 0 and ratios[1] > 0 and n - n_test >= 3:
        n_valid = 1
    if n_test == 0 and ratios[2] > 0 and n - n_valid >= 2:
        n_test = 1
    return n - n_valid - n_test, n_valid, n_test


def stochastic_valid_counts(share: float, rng: np.random.Generator):
    """Counts for carving validation out of a train snapshot: ``share * n`` rounded up or down at
    random (so the expected share is exact even for users with 2-9 clicks); one click stays in train."""

    def counts(n: int) -> tuple[int, int, int]:
        n_valid = min(n - 1, int(np.floor(share * n + rng.random())))
        return n - n_valid, n_valid, 0

    return counts


def split_rows_per_user(users: np.ndarray, order_key: np.ndarray, counts) -> np.ndarray:
    """Assign each row 0 (train), 1 (valid) or 2 (test): within each user, rows sorted by ``order_key``
    are cut by ``counts(n) -> (n_train, n_valid, n_test)``, so the last rows go to test."""
    order = np.lexsort((order_key, users))
    sorted_users = users[order]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])
    ends = np.r_[starts[1:], len(order)]
    part = np.zeros(len(users), dtype=np.int8)
    for start, end in zip(starts, ends):
        n_train, n_valid, _ = counts(int(end - start))
        part[order[start + n_train : start + n_train + n_valid]] = 1
        part[order[start + n_train + n_valid : end]] = 2
    return part


def pairs(users: np.ndarray, items: np.ndarray) -> np.ndarray:
    return np.stack([users, items], axis=1).astype(np.int64) if len(users) else np.zeros((0, 2), np.int64)


def by_users_with_train(cold_valid: np.ndarray, train: np.ndarray) -> np.ndarray:
    """The cold-validation pairs of users with a train pair: a user whose only interactions were with
    cold-validation items has no history to rank them from (every zero-shot test user has one)."""
    return cold_valid[np.isin(cold_valid[:, 0], np.unique(train[:, 0]))]


def items_by_first_interaction(data: RecDataset, items: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``items`` ordered by the time of their first interaction, earliest first (ties in a seeded order)."""
    if data.timestamps is None:
        raise DataError(f"dataset {data.name!r} has no timestamps: zero_shot 'latest' needs them")
    first = np.full(data.n_items, np.inf)
    np.minimum.at(first, data.inter_item, np.asarray(data.timestamps, dtype=float))
    items = np.asarray(items, dtype=np.int64)
    return items[np.lexsort((rng.permutation(len(items)), first[items]))]


def choose_zero_shot_items(data: RecDataset, spec: SplitSpec, rng: np.random.Generator) -> np.ndarray:
    """The source's new items, else ``zero_shot_fraction`` of all items: a random or the latest set."""
    if data.new_items is not None:
        return np.flatnonzero(data.new_items)
    n = int(round(spec.zero_shot_fraction * data.n_items))
    if not n:
        return no_items()
    if spec.zero_shot == "latest":
        interacted = np.unique(data.inter_item)
        return np.sort(items_by_first_interaction(data, interacted, rng)[-n:])
    return np.sort(rng.choice(data.n_items, size=n, replace=False))


def choose_cold_valid_items(data: RecDataset, spec: SplitSpec, pool: np.ndarray, latest: bool) -> np.ndarray:
    """``cold_valid_fraction`` of all items, drawn from ``pool``: the latest-appearing ones when ``latest``,
    else a seeded sample (from a stream of its own, so the rest of the split does not move)."""
    n = int(round(spec.cold_valid_fraction * data.n_items))
    if not n:
        return no_items()
    if n >= len(pool):
        raise DataError(
            f"cold_valid_fraction {spec.cold_valid_fraction} asks for {n} cold-validation items "
            f"but only {len(pool)} items can be held out"
        )
    rng = np.random.default_rng([spec.seed, COLD_VALID_STREAM])
    if latest:
        return np.sort(items_by_first_interaction(data, pool, rng)[-n:])
    return np.sort(rng.choice(pool, size=n, replace=False)).astype(np.int64)


def make_split(data: RecDataset, spec: SplitSpec | None = None) -> Split:
    """Split ``data`` by ``spec``; the same data and spec always give the same split."""
    spec = spec or SplitSpec()
    method = spec.method
    if method == "auto":
        method = "snapshot" if data.snapshot is not None else "random"
    if method == "snapshot":
        split = snapshot_split(data, spec)
    elif method in ("random", "temporal"):
        split = ratio_split(data, spec, temporal=method == "temporal")
    else:
        raise ValueError(f"unknown split method {method!r}: expected auto, random, temporal or snapshot")
    split.meta = {
        "dataset": data.name,
        "dataset_fingerprint": data.fingerprint(),
        **asdict(spec),
        "method": method,
        "ratios": list(spec.ratios),
    }
    return split


def ratio_split(data: RecDataset, spec: SplitSpec, temporal: bool) -> Split:
    """Per-user ratio split; zero-shot items' interactions go to test only."""
    if temporal and data.timestamps is None:
        raise DataError(f"dataset {data.name!r} has no timestamps: a temporal split needs them")
    rng = np.random.default_rng(spec.seed)
    zero_shot = choose_zero_shot_items(data, spec, rng)
    is_zero = np.isin(data.inter_item, zero_shot)
    pool = np.unique(data.inter_item[~is_zero])
    cold = choose_cold_valid_items(data, spec, pool, latest=spec.zero_shot == "latest" and data.new_items is None)
    is_cold = np.isin(data.inter_item, cold)
    keep = ~is_zero & ~is_cold
    users, items = data.inter_user[keep], data.inter_item[keep]
    key = data.timestamps[keep] if temporal else rng.permutation(len(users))
    if temporal:
        # ties in time are broken by a seeded shuffle, not by file order
        key = np.lexsort((rng.permutation(len(users)), key))
        key = np.argsort(key)
    part = split_rows_per_user(users, key, lambda n: ratio_counts(n, spec.ratios))
    test = np.concatenate(
        [pairs(users[part == 2], items[part == 2]), pairs(data.inter_user[is_zero], data.inter_item[is_zero])]
    )
    train = pairs(users[part == 0], items[part == 0])
    return Split(
        n_users=data.n_users,
        n_items=data.n_items,
        train=train,
        valid=pairs(users[part == 1], items[part == 1]),
        test=test,
        zero_shot_items=zero_shot.astype(np.int64),
        cold_valid_items=cold,
        cold_valid=by_users_with_train(pairs(data.inter_user[is_cold], data.inter_item[is_cold]), train),
    )


def snapshot_split(data: RecDataset, spec: SplitSpec) -> Split:
    """MIND-style train/test snapshots. Validation is a seeded ``ratios[1] / (ratios[0] + ratios[1])``
    share of each user's train pairs (every user keeps at least one in train); test pairs that
    repeat a train pair are dropped; zero-shot items are the test items never seen in train. Cold-validation
    items are a seeded sample of the train snapshot's items: their train-snapshot pairs become ``cold_valid``
    and their test pairs are dropped (they are no full-shot candidates)."""
    if data.snapshot is None:
        raise DataError(f"dataset {data.name!r} has no train/test snapshot column: use a random or temporal split")
    rng = np.random.default_rng(spec.seed)
    is_train = data.snapshot == "train"
    seen_items = np.unique(data.inter_item[is_train])
    cold = choose_cold_valid_items(data, spec, seen_items, latest=False)
    is_cold = np.isin(data.inter_item, cold)
    cold_valid = pairs(data.inter_user[is_train & is_cold], data.inter_item[is_train & is_cold])
    train_users, train_items = data.inter_user[is_train & ~is_cold], data.inter_item[is_train & ~is_cold]
    valid_share = spec.ratios[1] / max(1e-12, spec.ratios[0] + spec.ratios[1])
    key = rng.permutation(len(train_users))
    part = split_rows_per_user(train_users, key, stochastic_valid_counts(valid_share, rng))
    train = pairs(train_users[part == 0], train_items[part == 0])
    valid = pairs(train_users[part == 1], train_items[part == 1])
    test_users, test_items = data.inter_user[~is_train & ~is_cold], data.inter_item[~is_train & ~is_cold]
    train_keys = set((train_users * data.n_items + train_items).tolist())
    fresh = np.fromiter(
        (k not in train_keys for k in (test_users * data.n_items + test_items).tolist()),
        dtype=bool,
        count=len(test_users),
    )
    test = pairs(test_users[fresh], test_items[fresh])
    zero_shot = np.setdiff1d(np.unique(test[:, 1]), seen_items)
    return Split(
        data.n_users, data.n_items, train, valid, test, zero_shot.astype(np.int64),
        cold_valid_items=cold, cold_valid=by_users_with_train(cold_valid, train),
    )  # fmt: skip
