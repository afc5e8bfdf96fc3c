"""BPR training triples: every train pair once per epoch, in a seeded random order, with one
negative drawn uniformly from the candidate items and redrawn while it is one of the user's train
items (vectorised rejection: a few rounds over ever fewer rows)."""

from __future__ import annotations

import numpy as np


class BPRSampler:
    def __init__(self, train: np.ndarray, n_items: int, candidates: np.ndarray | None = None):
        """``candidates``: items a negative may be (default all; the trainer passes the items that are
        neither zero-shot nor cold-validation, so that held-out items stay unseen)."""
        self.users = np.ascontiguousarray(train[:, 0], dtype=np.int64)
        self.items = np.ascontiguousarray(train[:, 1], dtype=np.int64)
        self.n_items = n_items
        self.candidates = np.arange(n_items, dtype=np.int64) if candidates is None else np.asarray(candidates)
        self.train_keys = np.unique(self.users * n_items + self.items)
        per_user = np.bincount(self.users, minlength=0)
        if len(per_user) and per_user.max() >= len(self.candidates):
            raise ValueError("a user interacted with every candidate item: no negative can be drawn")

    def is_positive(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        keys = users * self.n_items + items
        pos = np.searchsorted(self.train_keys, keys)
        pos[pos == len(self.train_keys)] = 0
        return self.train_keys[pos] == keys

    def negatives(self, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        neg = self.candidates[rng.integers(0, len(self.candidates), size=len(users))]
        todo = np.flatnonzero(self.is_positive(users, neg))
        while len(todo):
            neg[todo] = self.candidates[rng.integers(0, len(self.candidates), size=len(todo))]
            todo = todo[self.is_positive(users[todo], neg[todo])]
        return neg

    def epoch(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(users, positives, negatives) for one epoch, shuffled."""
        order = rng.permutation(len(self.users))
        users, pos = self.users[order], self.items[order]
        return users, pos, self.negatives(users, rng)
