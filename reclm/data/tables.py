"""Reading delimited and JSON Lines files with errors that name the file, the line and what was expected."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd

from reclm.data.errors import DataError


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"missing {what} file (expected it here)", path)
    return path


def read_delimited(path: Path, sep: str, required: list[str], quoting: int = csv.QUOTE_MINIMAL) -> pd.DataFrame:
    """Read a headered table as strings; the header must hold every ``required`` column."""
    require_file(path, "table")
    try:
        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, quoting=quoting, engine="c")
    except pd.errors.EmptyDataError as exc:
        raise DataError("file is empty; expected a header line and rows", path, 1) from exc
    except pd.errors.ParserError as exc:
        raise DataError(f"cannot parse table: {exc}", path) from exc
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"bad header {list(frame.columns)}: expected columns {required} (missing {missing})", path, 1)
    if frame.empty:
        raise DataError("no rows after the header", path, 2)
    return frame


def integer_column(frame: pd.DataFrame, column: str, path: Path) -> np.ndarray:
    """Parse a column as integers; a bad value is reported with its line (header is line 1)."""
    try:
        return frame[column].to_numpy(dtype=str).astype(np.int64)
    except ValueError:
        pass
    values = pd.to_numeric(frame[column].str.strip(), errors="coerce")
    bad = values.isna() | (values != values.round())
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raw = frame[column].iloc[row]
        raise DataError(f"column {column!r}: {raw!r} is not an integer id", path, row + 2)
    return values.to_numpy(dtype=np.int64)


def float_column(frame: pd.DataFrame, column: str, path: Path) -> np.ndarray:
    values = pd.to_numeric(frame[column].str.strip(), errors="coerce")
    if values.isna().any():
        row = int(np.flatnonzero(values.isna().to_numpy())[0])
        raw = frame[column].iloc[row]
        raise DataError(f"column {column!r}: {raw!r} is not a number", path, row + 2)
    return values.to_numpy(dtype=np.float64)


def reject_duplicate_rows(frame: pd.DataFrame, path: Path, columns: list[str] | None = None) -> None:
    """Identical rows are an input error (a copy-paste or a double export), reported with both lines."""
    dup = frame.duplicated(subset=columns, keep=False)
    if not dup.any():
        return
    rows = np.flatnonzero(dup.to_numpy())
    first = frame.iloc[rows[0]]
    key = tuple(first[c] for c in (columns or list(frame.columns)))
    twin = next(r for r in rows[1:] if tuple(frame.iloc[r][c] for c in (columns or list(frame.columns))) == key)
    raise DataError(
        f"duplicated row {dict(zip(columns or list(frame.columns), key))}: same as line {rows[0] + 2}; "
        "expected each interaction once",
        path,
        int(twin) + 2,
    )


def read_jsonl(path: Path, required: list[str]) -> list[dict]:
    """Read JSON Lines; each record must be an object holding the ``required`` keys."""
    require_file(path, "JSON Lines")
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"not valid JSON ({exc.msg})", path, number) from exc
            if not isinstance(record, dict):
                raise DataError("expected a JSON object per line", path, number)
            missing = [k for k in required if k not in record]
            if missing:
                raise DataError(f"missing keys {missing}; expected {required}", path, number)
            record["_line"] = number
            records.append(record)
    if not records:
        raise DataError("no records", path)
    return records


def integer_field(record: dict, key: str, path: Path) -> int:
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DataError(f"{key!r}: {value!r} is not an integer id", path, record.get("_line"))
    try:
        return int(value)
    except ValueError as exc:
        raise DataError(f"{key!r}: {value!r} is not an integer id", path, record.get("_line")) from exc
