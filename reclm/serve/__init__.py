"""HTTP serving of a finished run: ``reclm serve RUN_DIR`` (see :mod:`reclm.serve.app`)."""

from __future__ import annotations

from reclm.serve.engine import MAX_HISTORY, MAX_K, Recommender, ServeOptions

__all__ = ["MAX_HISTORY", "MAX_K", "Recommender", "ServeOptions", "create_app"]


def create_app(engine: Recommender, close_on_shutdown: bool = True):
    from reclm.serve.app import create_app as build

    return build(engine, close_on_shutdown)
