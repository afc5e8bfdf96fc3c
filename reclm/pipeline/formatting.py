"""Timestamps and human-readable durations, sizes and a stage's cost line.

One owner for how the pipeline shows time and memory: the engine's progress lines, the dry-run
table, ``reclm status``, an archive's creation time and the report all use these.
"""

from __future__ import annotations

import datetime as dt
from typing import Any


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def format_bytes_mb(mb: float | None) -> str:
    if mb is None:
        return "-"
    return f"{mb / 1024:.2f} GB" if mb >= 1024 else f"{mb:.0f} MB"


def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_cost(record: dict[str, Any]) -> str:
    parts = [
        f"{format_seconds(record.get('seconds', 0.0)):>9}",
        f"peak {format_bytes_mb(record.get('peak_memory_mb'))}",
    ]
    if record.get("tokens_total"):
        parts.append(f"tokens {record['tokens_total']:,}")
    if len(record.get("attempts") or ()) > 1:
        parts.append(f"(over {len(record['attempts'])} attempts)")
    elif record.get("resumed"):
        parts.append("(resumed)")
    return "  ".join(parts)
