"""The unit of work the train_cf stage reports, shared by the stage (which measures it) and the estimates
(which price it): an epoch over one train pair, scaled by how an epoch's cost grows with the data's users +
items (docs/decisions.md, "Estimate constants")."""

from __future__ import annotations

CF_SECONDS_PER_EPOCH_PAIR = {"bias-mf": 4e-6, "ncf": 1.2e-5, "lightgcn": 1.2e-5, "sgl": 3e-5, "simgcl": 2.5e-5}
CF_COST_PER_NODE = {"bias-mf": 3.9e-5, "ncf": 3.9e-5, "lightgcn": 1.3e-4, "sgl": 1.4e-4, "simgcl": 3.4e-4}
CF_REFERENCE_NODES = 2_625  # ml-100k's users + items, where the CF speeds were measured
CF_WORK_UNIT = "scaled epoch-interaction"  # an epoch over one train pair x cf_size_factor


def cf_size_factor(backbone: str, nodes: int) -> float:
    """How much more an epoch over one train pair of ``backbone`` costs with ``nodes`` users + items than
    on ml-100k (MIND: 3.0x BiasMF to 11.5x SimGCL)."""
    growth = CF_COST_PER_NODE[backbone]
    return (1 + growth * nodes) / (1 + growth * CF_REFERENCE_NODES)


def cf_epoch_seconds(backbone: str, pairs: int, nodes: int) -> float:
    """Default seconds of one epoch of ``backbone`` over ``pairs`` train pairs with ``nodes`` users + items,
    on the reference machine (docs/decisions.md, "Estimate constants")."""
    return pairs * cf_size_factor(backbone, nodes) * CF_SECONDS_PER_EPOCH_PAIR[backbone]
