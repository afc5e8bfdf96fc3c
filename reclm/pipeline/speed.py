"""Measured speeds for ``--dry-run``: the speed book.

Every finished stage that did enough work records its seconds (and tokens) per unit on this machine;
the dry-run estimate uses these in place of the default constants.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from reclm.utils import write_text_atomic


class SpeedBook:
    """Seconds per unit measured by finished stages on this machine (``speeds.json`` in the reclm
    cache), used by ``--dry-run`` in place of the default constants. An entry holds for one stage and
    one ``setup`` (what sets the speed: base model, backend, device; see
    ``reclm.pipeline.estimate.speed_setup``): a CTranslate2 speed is never used for a transformers run.
    Stages shorter than ``min_seconds`` are not recorded: their time is mostly fixed overhead (loading a model).
    Nor is a stage that ran here (``local``) but used less than ``min_cores`` of CPU on average over its wall
    time: it was paused or starved by other work (a Netflix profiles stage paused for hours once taught the
    book 3.5 s a profile, and ml-100k dry runs then said 2 h for 10 minutes of work); the older entry stays."""

    def __init__(self, path: Path, min_seconds: float = 20.0, min_cores: float = 0.5):
        self.path = path
        self.min_seconds = min_seconds
        self.min_cores = min_cores

    def load(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    @staticmethod
    def key(stage: str, setup: str) -> str:
        return f"{stage} @ {setup}" if setup else stage

    def record(self, stage: str, record: dict[str, Any], setup: str = "", local: bool = True) -> None:
        """Keep ``record``'s seconds per unit (a finished stage's manifest) unless it is not a fair measure.
        ``local``: the work ran in this process and its children, so its CPU time tells whether it was starved."""
        units = record.get("units")
        if not units or not record.get("unit") or record.get("seconds", 0) < self.min_seconds:
            return
        if local and self.starved(record):
            return
        book = self.load()
        book[self.key(stage, setup)] = {
            "unit": record["unit"],
            "seconds_per_unit": record["seconds"] / units,
            "tokens_per_unit": record.get("tokens_total", 0) / units,
            "cores": record.get("host", {}).get("cores"),
            "measured": record.get("finished"),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(book, indent=2))

    def starved(self, record: dict[str, Any]) -> bool:
        cpu = record.get("cpu_seconds")
        return cpu is not None and float(cpu) < self.min_cores * float(record["seconds"])

    def lookup(self, stage: str, unit: str, setup: str = "") -> dict[str, Any] | None:
        """The entry measured for ``stage`` in ``setup`` with ``unit``s on this many cores, if any."""
        entry = self.load().get(self.key(stage, setup))
        if entry and entry.get("unit") == unit and entry.get("cores") == len(os.sched_getaffinity(0)):
            return entry
        return None

    def seconds_per_unit(self, stage: str, unit: str, setup: str = "") -> float | None:
        entry = self.lookup(stage, unit, setup)
        return None if entry is None else float(entry["seconds_per_unit"])
