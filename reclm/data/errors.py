"""Input errors that the CLI reports as one line (never a traceback)."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad input data: names the file, the line (1-based, header included) and what was expected."""

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None):
        self.path = Path(path) if path is not None else None
        self.line = line
        self.detail = message
        where = ""
        if self.path is not None:
            where = f"{self.path}:{line}: " if line is not None else f"{self.path}: "
        super().__init__(where + message)
