"""Side features for the fusion encoders: item text embeddings and LLM-profile embeddings.

Profile embeddings live in ``RUN_DIR/embeddings/{users,items}.npz`` (arrays ``ids``: raw-id strings,
``vectors``: float32 ``(n, d)``); they are aligned to the dataset's indices by raw id. An id without a
profile gets a zero row and ``False`` in the presence mask; the fusion module then uses its learned
"no profile" vector for it (coverage is reported).

Feature modes: ``none`` (IDs), ``text`` (items from text), ``text+profiles`` (both sides' profiles) and
the ablations ``text+user-profiles`` / ``text+item-profiles`` (one side's profiles only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from reclm.data.dataset import RecDataset
from reclm.data.errors import DataError


@dataclass
class SideFeatures:
    """Feature matrices aligned to dataset indices (row ``i`` is item/user ``i``); None when unused."""

    item_text: np.ndarray | None = None
    user_profiles: np.ndarray | None = None
    item_profiles: np.ndarray | None = None
    user_present: np.ndarray | None = None  # bool (n_users,): has a profile (None: every row)
    item_present: np.ndarray | None = None
    coverage: dict[str, float] = field(default_factory=dict)

    def arrays(self) -> tuple[np.ndarray | None, ...]:
        """Every array a trained model depends on (resume fingerprints hash them)."""
        return self.item_text, self.user_profiles, self.item_profiles, self.user_present, self.item_present

    def dims(self) -> dict[str, int | None]:
        return {
            name: None if array is None else int(array.shape[1])
            for name, array in (
                ("item_text", self.item_text),
                ("user_profiles", self.user_profiles),
                ("item_profiles", self.item_profiles),
            )
        }

    def require(self, mode: str, n_users: int, n_items: int) -> None:
        """Check that ``mode`` has what it needs, with shapes matching the split."""
        rows = {"item_text": n_items, "user_profiles": n_users, "item_profiles": n_items}
        for name in needed_features(mode):
            array = getattr(self, name)
            if array is None:
                raise ValueError(f"feature mode {mode!r} needs {name.replace('_', ' ')} embeddings, which are missing")
            if array.ndim != 2 or array.shape[0] != rows[name]:
                raise ValueError(f"{name} embeddings have shape {array.shape}; expected ({rows[name]}, d)")


MODE_FEATURES: dict[str, tuple[str, ...]] = {
    "none": (),
    "text": ("item_text",),
    "text+profiles": ("item_text", "user_profiles", "item_profiles"),
    "text+user-profiles": ("item_text", "user_profiles"),
    "text+item-profiles": ("item_text", "item_profiles"),
}


def needed_features(mode: str) -> tuple[str, ...]:
    """The feature matrices a mode reads."""
    if mode not in MODE_FEATURES:
        raise ValueError(f"unknown feature mode {mode!r}: expected one of {', '.join(MODE_FEATURES)}")
    return MODE_FEATURES[mode]


def uses_user_profiles(mode: str) -> bool:
    return "user_profiles" in needed_features(mode)


def uses_item_profiles(mode: str) -> bool:
    return "item_profiles" in needed_features(mode)


def item_text_embeddings(data: RecDataset, encoder=None) -> np.ndarray:
    """Embed each item's text fields with the project's TextEncoder (cached on disk)."""
    if not data.item_fields:
        raise DataError(
            f"dataset {data.name!r} has no item text: the 'text' feature modes need item text "
            "(e.g. a .item file, items.jsonl, or --item-text for CSV data)"
        )
    texts = data.item_texts()
    empty = sum(1 for t in texts if not t)
    if empty == len(texts):
        raise DataError(f"dataset {data.name!r}: every item's text is empty; the 'text' feature modes need it")
    if encoder is None:
        from reclm.text.encoder import TextEncoder

        encoder = TextEncoder()
    return encoder.encode(texts, desc="item text")


def load_profile_embeddings(path: Path, raw_ids: list[str]) -> tuple[np.ndarray, float]:
    """Align ``path`` (npz with ``ids`` and ``vectors``) to ``raw_ids``; missing ids get zeros.

    Returns the ``(len(raw_ids), d)`` matrix and the share of ``raw_ids`` that had a vector."""
    aligned, present = load_profiles(path, raw_ids)
    return aligned, float(present.mean()) if len(raw_ids) else 0.0


def load_profiles(path: Path, raw_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Align ``path`` to ``raw_ids``: the ``(len(raw_ids), d)`` matrix (zeros where an id has no
    profile) and the boolean presence mask."""
    if not path.is_file():
        raise DataError("missing profile embeddings (run `reclm encode` to write them)", path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            ids = archive["ids"].astype(str)
            vectors = np.asarray(archive["vectors"], dtype=np.float32)
    except KeyError as exc:
        raise DataError(f"expected arrays 'ids' and 'vectors' (missing {exc})", path) from exc
    except (ValueError, OSError) as exc:
        raise DataError(f"cannot read profile embeddings ({exc})", path) from exc
    if vectors.ndim != 2 or len(vectors) != len(ids):
        raise DataError(f"'vectors' has shape {vectors.shape} for {len(ids)} ids; expected (n_ids, d)", path)
    position = {raw: row for row, raw in enumerate(ids.tolist())}
    rows = np.array([position.get(raw, -1) for raw in raw_ids], dtype=np.int64)
    found = rows >= 0
    aligned = np.zeros((len(raw_ids), vectors.shape[1]), dtype=np.float32)
    aligned[found] = vectors[rows[found]]
    return aligned, found


def load_side_features(data: RecDataset, mode: str, profiles: str | Path | None = None, encoder=None) -> SideFeatures:
    """What ``mode`` needs: nothing, item text, or item text plus the run's profile embeddings."""
    needed = needed_features(mode)
    if not needed:
        return SideFeatures()
    files = [name for side, name in (("user_profiles", "users.npz"), ("item_profiles", "items.npz")) if side in needed]
    folder = None
    if files:  # check the profile files before spending time on text
        if profiles is None:
            raise ValueError(f"--features {mode} needs --profiles RUN_DIR (with embeddings/{', '.join(files)})")
        folder = Path(profiles) / "embeddings"
        missing = [str(folder / n) for n in files if not (folder / n).is_file()]
        if missing:
            raise DataError(
                f"{mode} needs profile embeddings; missing {', '.join(missing)} (run `reclm encode`)", folder
            )
    features = SideFeatures(item_text=item_text_embeddings(data, encoder))
    features.coverage["item_text"] = float(np.mean([bool(t) for t in data.item_texts()]))
    if folder is not None:
        attach_profiles(features, mode, folder / "users.npz", folder / "items.npz", data.user_ids, data.item_ids)
    return features


def attach_profiles(
    features: SideFeatures, mode: str, users: Path, items: Path, user_ids: list[str], item_ids: list[str]
) -> SideFeatures:
    """Load the profile matrices (and presence masks, coverage) that ``mode`` reads into ``features``."""
    if uses_user_profiles(mode):
        features.user_profiles, features.user_present = load_profiles(users, user_ids)
        features.coverage["user_profiles"] = float(features.user_present.mean()) if len(user_ids) else 0.0
    if uses_item_profiles(mode):
        features.item_profiles, features.item_present = load_profiles(items, item_ids)
        features.coverage["item_profiles"] = float(features.item_present.mean()) if len(item_ids) else 0.0
    return features
