"""The five CF backbones, built by name over a fusion module."""

from __future__ import annotations

import numpy as np
import torch

from reclm.cf.backbones.base import CFModel, DotProductModel
from reclm.cf.backbones.biasmf import BiasMF
from reclm.cf.backbones.lightgcn import LightGCN
from reclm.cf.backbones.ncf import NeuMF
from reclm.cf.backbones.sgl import SGL
from reclm.cf.backbones.simgcl import SimGCL
from reclm.cf.config import CFConfig
from reclm.cf.features import SideFeatures
from reclm.cf.fusion import build_fusion

BACKBONE_CLASSES: dict[str, type[CFModel]] = {
    "bias-mf": BiasMF,
    "ncf": NeuMF,
    "lightgcn": LightGCN,
    "sgl": SGL,
    "simgcl": SimGCL,
}


def build_model(
    config: CFConfig,
    n_users: int,
    n_items: int,
    train: np.ndarray,
    features: SideFeatures,
    device: torch.device | str = "cpu",
) -> CFModel:
    """A backbone with its fusion module, parameters initialised from torch's current seed."""
    cls = BACKBONE_CLASSES[config.backbone]
    out_dim = cls.representation_dim(config) if hasattr(cls, "representation_dim") else config.dim
    fusion = build_fusion(config.fusion, n_users, n_items, out_dim, config.features, features, config)
    return cls(n_users, n_items, config, fusion, train).to(device)


__all__ = ["BACKBONE_CLASSES", "CFModel", "DotProductModel", "build_model"]
