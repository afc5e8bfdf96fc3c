"""Reading delimited and JSON Lines files with errors that name the file, the line and what was expected."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from reclm.data.errors import DataError


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"missing {what} file (expected it here)", path)
    return path


INTEGER = re.compile(r"-?[0-9]+")  # an id as written: ASCII digits, an optional minus (no _, +, . or exponent)
INT64 = np.iinfo(np.int64)


def bad_utf8(path: Path, exc: UnicodeDecodeError) -> DataError:
    """A file that is not UTF-8: the error names the line of the first byte that is not."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
        line = None
    except UnicodeDecodeError as first:
        line = data.count(b"\n", 0, first.start) + 1
    return DataError(f"not UTF-8 text ({exc.reason}); expected a UTF-8 file", path, line)


def record_lines(data: bytes, rows: int, sep: str, quoting: int) -> np.ndarray:
    """The line (1-based) each of the ``rows`` parsed records starts on: the row number plus one when
    every record is one line, else counted by the csv module (a quoted field that spans lines)."""
    lines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
    if lines == rows:
        return np.arange(1, rows + 1)
    starts, start = [], 1
    try:
        reader = csv.reader(io.StringIO(data.decode("utf-8-sig"), newline=""), delimiter=sep, quoting=quoting)
        for _ in reader:
            starts.append(start)
            start = reader.line_num + 1
    except csv.Error:
        starts = []
    return np.asarray(starts) if len(starts) == rows else np.arange(1, rows + 1)


def read_delimited(path: Path, sep: str, required: list[str], quoting: int = csv.QUOTE_MINIMAL) -> pd.DataFrame:
    """Read a headered table as strings, indexed by the line each row starts on (blank lines skipped);
    the header must name each column once and hold every ``required`` one."""
    require_file(path, "table")
    data = path.read_bytes()
    try:
        frame = pd.read_csv(
            io.BytesIO(data), sep=sep, dtype=str, keep_default_na=False, quoting=quoting, engine="c",
            header=None, skip_blank_lines=False, encoding="utf-8-sig",
        )  # fmt: skip
    except pd.errors.EmptyDataError as exc:
        raise DataError("file is empty; expected a header line and rows", path, 1) from exc
    except pd.errors.ParserError as exc:
        where = re.search(r"line (\d+)", str(exc))
        message = str(exc).removeprefix("Error tokenizing data. C error: ").strip()
        raise DataError(f"cannot parse table: {message}", path, int(where[1]) if where else None) from exc
    except UnicodeDecodeError as exc:
        raise bad_utf8(path, exc) from exc
    frame.index = record_lines(data, len(frame), sep, quoting)
    frame = frame[(frame != "").any(axis=1)]  # blank lines
    if frame.empty:
        raise DataError("file is empty; expected a header line and rows", path, 1)
    header, at = [str(name).strip() for name in frame.iloc[0]], int(frame.index[0])
    twice = sorted({name for name in header if header.count(name) > 1})
    if twice:
        raise DataError(f"bad header {header}: {twice} named more than once; expected each column once", path, at)
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"bad header {header}: expected columns {required} (missing {missing})", path, at)
    frame = frame.iloc[1:].set_axis(header, axis=1)
    if frame.empty:
        raise DataError("no rows after the header", path, at + 1)
    return frame


def first_line(frame: pd.DataFrame, bad: np.ndarray | pd.Series) -> tuple[int, int]:
    """(position, line) of the first ``True`` of ``bad``."""
    row = int(np.flatnonzero(np.asarray(bad))[0])
    return row, int(frame.index[row])


def integer_column(frame: pd.DataFrame, column: str, path: Path) -> np.ndarray:
    """Parse a column of integer ids written as digits (``007`` is 7; ``1_000``, ``+1``, ``1.0``, ``1e3`` and
    ids beyond int64 are refused); a bad value is reported with its line (header is line 1)."""
    text = frame[column].str.strip()
    bad = ~text.str.fullmatch(INTEGER).to_numpy(dtype=bool)
    if not bad.any():
        try:
            return text.to_numpy(dtype=str).astype(np.int64)
        except OverflowError:
            bad = np.array([not INT64.min <= int(v) <= INT64.max for v in text.tolist()])
    row, line = first_line(frame, bad)
    raw = frame[column].iloc[row]
    too_big = bool(INTEGER.fullmatch(raw.strip()))
    why = "is beyond the 64-bit integer range" if too_big else "is not an integer id (expected digits, e.g. 42)"
    raise DataError(f"column {column!r}: {raw!r} {why}", path, line)


def float_column(frame: pd.DataFrame, column: str, path: Path) -> np.ndarray:
    """Parse a column of finite numbers (``nan``, ``inf`` and overflowing values like ``1e400`` are refused)."""
    values = pd.to_numeric(frame[column].str.strip(), errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        row, line = first_line(frame, bad)
        raise DataError(f"column {column!r}: {frame[column].iloc[row]!r} is not a finite number", path, line)
    return values


def reject_duplicate_rows(frame: pd.DataFrame, path: Path, columns: list[str] | None = None) -> None:
    """Identical rows are an input error (a copy-paste or a double export), reported with both lines."""
    columns = columns or list(frame.columns)
    dup = frame.duplicated(subset=columns, keep=False).to_numpy()
    if not dup.any():
        return
    rows = np.flatnonzero(dup)
    key = tuple(frame.iloc[rows[0]][c] for c in columns)
    twin = next(r for r in rows[1:] if tuple(frame.iloc[r][c] for c in columns) == key)
    raise DataError(
        f"duplicated row {dict(zip(columns, key))}: same as line {frame.index[rows[0]]}; "
        "expected each interaction once",
        path,
        int(frame.index[twin]),
    )


def read_jsonl(path: Path, required: list[str]) -> list[dict]:
    """Read JSON Lines; each record must be an object holding the ``required`` keys."""
    require_file(path, "JSON Lines")
    records = []
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"not valid JSON ({exc.msg})", path, number) from exc
                except RecursionError as exc:
                    raise DataError("not valid JSON (nested too deeply)", path, number) from exc
                if not isinstance(record, dict):
                    raise DataError("expected a JSON object per line", path, number)
                missing = [k for k in required if k not in record]
                if missing:
                    raise DataError(f"missing keys {missing}; expected {required}", path, number)
                record["_line"] = number
                records.append(record)
    except UnicodeDecodeError as exc:
        raise bad_utf8(path, exc) from exc
    if not records:
        raise DataError("no records", path)
    return records


def integer_field(record: dict, key: str, path: Path) -> int:
    """A JSON integer id, or a string of digits (as :func:`integer_column`), within int64."""
    value, line = record[key], record.get("_line")
    if isinstance(value, str) and INTEGER.fullmatch(value.strip()):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{key!r}: {value!r} is not an integer id (expected digits, e.g. 42)", path, line)
    if not INT64.min <= value <= INT64.max:
        raise DataError(f"{key!r}: {value} is beyond the 64-bit integer range", path, line)
    return value
