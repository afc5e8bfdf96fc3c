"""Small process-wide helpers: cache location, thread count, seeding, durable writes."""

from __future__ import annotations

import ipaddress
import os
import random
from pathlib import Path

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


def is_loopback(host: str) -> bool:
    """``localhost`` (and ``*.localhost``) or a loopback address (127.0.0.0/8, ::1)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
