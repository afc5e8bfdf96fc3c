"""Side features for the fusion encoders: item text embeddings and LLM-profile embeddings.

Profile embeddings live in ``RUN_DIR/embeddings/{users,items}.npz`` (arrays ``ids``: raw-id strings,
``vectors``: float32 ``(n, d)``); they are aligned to the dataset's indices by raw id, with a zero
vector for an id that has no profile (coverage is reported).
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
    coverage: dict[str, float] = field(default_factory=dict)

    def arrays(self) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        return self.item_text, self.user_profiles, self.item_profiles

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
        needed = {"none": [], "text": ["item_text"], "text+profiles": ["item_text", "user_profiles", "item_profiles"]}
        if mode not in needed:
            raise ValueError(f"unknown feature mode {mode!r}: expected none, text or text+profiles")
        rows = {"item_text": n_items, "user_profiles": n_users, "item_profiles": n_items}
        for name in needed[mode]:
            array = getattr(self, name)
            if array is None:
                raise ValueError(f"feature mode {mode!r} needs {name.replace('_', ' ')} embeddings, which are missing")
            if array.ndim != 2 or array.shape[0] != rows[name]:
                raise ValueError(f"{name} embeddings have shape {array.shape}; expected ({rows[name]}, d)")


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
    return aligned, float(found.mean()) if len(raw_ids) else 0.0


def load_side_features(data: RecDataset, mode: str, profiles: str | Path | None = None, encoder=None) -> SideFeatures:
    """What ``mode`` needs: nothing, item text, or item text plus the run's profile embeddings."""
    if mode == "none":
        return SideFeatures()
    if mode not in ("text", "text+profiles"):
        raise ValueError(f"unknown feature mode {mode!r}: expected none, text or text+profiles")
    folder = None
    if mode == "text+profiles":  # check the profile files before spending time on text
        if profiles is None:
            raise ValueError("--features text+profiles needs --profiles RUN_DIR (with embeddings/users.npz, items.npz)")
        folder = Path(profiles) / "embeddings"
        missing = [str(folder / n) for n in ("users.npz", "items.npz") if not (folder / n).is_file()]
        if missing:
            raise DataError(
                f"text+profiles needs profile embeddings; missing {', '.join(missing)} (run `reclm encode`)", folder
            )
    features = SideFeatures(item_text=item_text_embeddings(data, encoder))
    features.coverage["item_text"] = float(np.mean([bool(t) for t in data.item_texts()]))
    if folder is not None:
        features.user_profiles, features.coverage["user_profiles"] = load_profile_embeddings(
            folder / "users.npz", data.user_ids
        )
        features.item_profiles, features.coverage["item_profiles"] = load_profile_embeddings(
            folder / "items.npz", data.item_ids
        )
    return features
