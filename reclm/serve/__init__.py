"""HTTP serving of a finished run: ``reclm serve RUN_DIR`` (see :mod:`reclm.serve.app`); who may call it and
how much it takes: :mod:`reclm.serve.security`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from reclm.serve.engine import MAX_HISTORY, MAX_K, Recommender, ServeOptions
from reclm.serve.security import AccessPolicy

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["MAX_HISTORY", "MAX_K", "AccessPolicy", "Recommender", "ServeOptions", "create_app"]


def create_app(engine: Recommender, close_on_shutdown: bool = True, policy: AccessPolicy | None = None) -> FastAPI:
    """See :func:`reclm.serve.app.create_app`; a server bound off loopback passes
    ``policy=AccessPolicy.for_bind(host, ...)``, built before the engine (it refuses a keyless bind)."""
    from reclm.serve.app import create_app as build

    return build(engine, close_on_shutdown, policy)
