"""Runs on more than one process or machine: Ray for fan-out (``pip install reclm[ray]``), and what this
process is in an ``accelerate launch`` / ``torchrun`` launch.

``address`` (a config key) or ``RAY_ADDRESS`` points at a running cluster; without either, Ray starts a
local one for this process and stops it afterwards. Every caller (the CF grid, sharded generation) goes
through :func:`ray_session`, so "where does Ray run" is answered once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any


def world_size() -> int:
    """Processes of this launch: ``WORLD_SIZE`` (set by ``accelerate launch`` and ``torchrun``), else 1."""
    return int(os.environ.get("WORLD_SIZE") or 1)


def is_main_process() -> bool:
    """True in a single process and in the first process of a launch: the one that writes files."""
    return int(os.environ.get("RANK") or 0) == 0


def refuse_data_parallel(what: str) -> None:
    """A one-line error when ``what`` (a stage whose loop is not data-parallel) is started on several processes,
    rather than N processes each training (and writing) their own copy."""
    if world_size() > 1:
        raise ValueError(
            f"{what} does not run data-parallel: start it as one process, not under accelerate launch or torchrun "
            f"(WORLD_SIZE={world_size()}); only the LoRA SFT loop (reclm sft, item-side training) does"
        )


RAY_MISSING = "the ray executor needs Ray: pip install 'reclm[ray]' (or pip install 'ray[default]==2.60.0')"


def import_ray() -> Any:
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(RAY_MISSING) from exc
    return ray


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """Yield the ``ray`` module connected to ``address`` / ``RAY_ADDRESS``, or to a local Ray started here
    (``num_cpus`` caps it) and shut down on exit. An already initialised Ray is used as it is."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"  # "local": a new Ray, never a stale one here
    options: dict[str, Any] = {"address": address, "include_dashboard": False, "log_to_driver": False}
    if address == "local" and num_cpus is not None:
        options["num_cpus"] = num_cpus
    ray.init(**options)
    try:
        yield ray
    finally:
        ray.shutdown()
