"""Small process-wide helpers: cache location, thread count, seeding, durable writes."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


def cache_root() -> Path:
    """Where reclm caches models, embeddings and generations (``RECLM_CACHE`` overrides)."""
    return Path(os.environ.get("RECLM_CACHE", Path.home() / ".cache" / "reclm")).expanduser()


def available_cores() -> int:
    """Cores this process may run on (respects affinity / cgroup-restricted CPU sets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def torch_threads(requested: int | None = None) -> int:
    """Set torch's intra-op threads to ``requested``, ``RECLM_THREADS`` or the available cores."""
    import torch

    n = requested or int(os.environ.get("RECLM_THREADS", 0)) or available_cores()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') bytes to disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then every folder (its entries), deepest first."""
    for path in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)):
        if not path.is_symlink():
            fsync_path(path)
    fsync_path(folder)


def publish(src: Path, dst: Path) -> None:
    """Rename ``src`` (a file or folder already written) over ``dst`` durably: its content is flushed to
    disk before the rename and the rename itself after (a power loss leaves the old or the new, never empty
    files behind a name that says complete). A folder ``dst`` must not exist."""
    if src.is_dir():
        fsync_tree(src)
    else:
        fsync_path(src)
    src.replace(dst)
    fsync_path(dst.parent)


TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; when the block ends it is published over ``path``,
    and on an error it is removed: readers see the old or the new file. The name ends in ``.tmp`` (not in
    ``path``'s suffix), so no reader's pattern (``*.json``, ``*.npz``) picks up a file a kill -9 left; numpy
    writers write to an open handle of it (``np.savez`` would append ``.npz`` to a name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{TMP_SUFFIX}")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    publish(tmp, path)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, payload: Any) -> None:
    """JSON (indented, ASCII-escaped, unknown types as ``str``) written through :func:`atomic_write`."""
    write_text_atomic(path, json.dumps(payload, indent=2, default=str))


def read_json(path: str | Path) -> Any:
    """The parsed file, or None when it is missing or not JSON (a reader of optional run files)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_loopback(host: str) -> bool:
    """``localhost`` (and ``*.localhost``) or a loopback address (127.0.0.0/8, ::1)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
