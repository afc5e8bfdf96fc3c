"""Collaborative-filtering backbones with text/profile fusion, one trainer and one evaluator."""

from reclm.cf.config import CFConfig
from reclm.cf.features import SideFeatures, load_side_features
from reclm.cf.trainer import CFResult, load_model, train_cf

__all__ = ["CFConfig", "CFResult", "SideFeatures", "load_model", "load_side_features", "train_cf"]
