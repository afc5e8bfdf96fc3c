"""Collaborative-filtering backbones with text/profile fusion, one trainer and one evaluator.

The names below are loaded on first use, so reading ``reclm.cf.config`` or ``reclm.cf.features`` (the
pipeline's config does) does not import torch."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CFConfig": "reclm.cf.config",
    "SideFeatures": "reclm.cf.features",
    "load_side_features": "reclm.cf.features",
    "CFResult": "reclm.cf.trainer",
    "load_model": "reclm.cf.trainer",
    "train_cf": "reclm.cf.trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'reclm.cf' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
