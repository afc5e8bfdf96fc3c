"""The in-memory dataset every stage reads: interactions in index space, item text, user features."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class RecDataset:
    """Implicit-feedback interactions with item text and optional user features.

    Users and items are renumbered 0..n-1; ``user_ids`` / ``item_ids`` map an index back to the
    source's raw id (as a string). Interaction arrays are aligned: row ``k`` is the pair
    ``(inter_user[k], inter_item[k])``.

    ``snapshot`` carries a split that the source already defines (MIND's train/test days), and
    ``new_items`` marks items the source declares absent from training (Netflix's later snapshot).
    ``resources`` points at files that later stages may use (teacher profiles, neighbour lists).
    """

    name: str
    user_ids: list[str]
    item_ids: list[str]
    inter_user: np.ndarray
    inter_item: np.ndarray
    item_fields: dict[str, list[str]]
    user_fields: dict[str, list[str]] | None = None
    timestamps: np.ndarray | None = None
    snapshot: np.ndarray | None = None
    new_items: np.ndarray | None = None
    resources: dict[str, Path] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        self.inter_user = np.asarray(self.inter_user, dtype=np.int64)
        self.inter_item = np.asarray(self.inter_item, dtype=np.int64)
        for name, values in self.item_fields.items():
            if len(values) != self.n_items:
                raise ValueError(f"item field {name!r} has {len(values)} values for {self.n_items} items")

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_interactions(self) -> int:
        return len(self.inter_user)

    def item_text(self, item: int, fields: list[str] | None = None) -> str:
        """One line of text for an item: ``title: Toy Story; year: 1995; genres: Animation, Comedy``."""
        names = fields or list(self.item_fields)
        parts = [f"{n}: {self.item_fields[n][item]}" for n in names if self.item_fields[n][item]]
        return "; ".join(parts)

    def item_texts(self, fields: list[str] | None = None) -> list[str]:
        return [self.item_text(i, fields) for i in range(self.n_items)]

    def user_feature_text(self, user: int) -> str:
        if not self.user_fields:
            return ""
        return "; ".join(f"{n}: {v[user]}" for n, v in self.user_fields.items() if v[user])

    def item_index(self) -> dict[str, int]:
        return {raw: i for i, raw in enumerate(self.item_ids)}

    def user_index(self) -> dict[str, int]:
        return {raw: u for u, raw in enumerate(self.user_ids)}

    def fingerprint(self) -> str:
        """Content hash of interactions, ids and text: changes whenever the data would change a result."""
        h = hashlib.sha256()
        h.update(self.name.encode())
        for arr in (self.inter_user, self.inter_item):
            h.update(np.ascontiguousarray(arr).tobytes())
        for arr in (self.timestamps, self.snapshot, self.new_items):
            h.update(b"|" if arr is None else np.asarray(arr).astype(str).tobytes())
        h.update("\x1f".join(self.user_ids).encode())
        h.update("\x1f".join(self.item_ids).encode())
        for name in sorted(self.item_fields):
            h.update(name.encode())
            h.update("\x1f".join(self.item_fields[name]).encode())
        for name in sorted(self.user_fields or {}):
            h.update(name.encode())
            h.update("\x1f".join(self.user_fields[name]).encode())
        return h.hexdigest()[:16]

    def summary(self) -> dict[str, object]:
        density = self.n_interactions / max(1, self.n_users * self.n_items)
        out: dict[str, object] = {
            "name": self.name,
            "users": self.n_users,
            "items": self.n_items,
            "interactions": self.n_interactions,
            "density": round(density, 6),
            "item_fields": list(self.item_fields),
            "user_fields": list(self.user_fields or {}),
            "timestamps": self.timestamps is not None,
        }
        if self.snapshot is not None:
            values, counts = np.unique(self.snapshot, return_counts=True)
            out["snapshot"] = {str(v): int(c) for v, c in zip(values, counts)}
        if self.new_items is not None:
            out["new_items"] = int(np.sum(self.new_items))
        if self.resources:
            out["resources"] = sorted(self.resources)
        return out
