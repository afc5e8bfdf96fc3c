"""LightGCN (He et al. 2020): layer-0 representations propagated over the normalised user-item
graph; the final representation is the mean over layers 0..L. With a fusion whose
``propagates_items`` is False (``paper``), items keep their layer-0 representation: users still read
them through the graph, but a trained item's score does not carry its users' ID embeddings, which
a new item cannot have."""

from __future__ import annotations

import numpy as np
import torch

from reclm.cf.backbones.base import DotProductModel
from reclm.cf.config import CFConfig
from reclm.cf.fusion import Fusion
from reclm.cf.graph import normalized_adjacency, propagate, to_torch_csr


class LightGCN(DotProductModel):
    name = "lightgcn"

    def __init__(self, n_users: int, n_items: int, config: CFConfig, fusion: Fusion, train: np.ndarray):
        super().__init__(n_users, n_items, config, fusion, train)
        self.train_pairs = np.asarray(train, dtype=np.int64)
        self.adjacency = to_torch_csr(normalized_adjacency(self.train_pairs, n_users, n_items))

    def _apply(self, fn, recurse=True):
        # keep the (non-parameter) sparse graph on the model's device
        result = super()._apply(fn, recurse)
        probe = fn(torch.zeros(1))
        for name, value in list(vars(self).items()):
            if isinstance(value, torch.Tensor) and value.layout == torch.sparse_csr:
                setattr(self, name, value.to(probe.device))
        return result

    def perturb(self, layer: torch.Tensor) -> torch.Tensor:
        """Hook applied after each propagation layer of a view (SimGCL adds noise here)."""
        return layer

    def propagate_layers(
        self,
        adjacency: torch.Tensor,
        users0: torch.Tensor,
        items0: torch.Tensor,
        perturbed: bool = False,
        start: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean over layers 0..L of ``[users0; items0]`` propagated; ``start``: what layer 1 propagates from when
        it is not layer 0 itself (a fusion's ``graph_layer0``: layer 0 keeps what is not propagated)."""
        total = torch.cat([users0, items0], dim=0)
        x = total if start is None else torch.cat(start, dim=0)
        for _ in range(self.config.layers):
            x = propagate(adjacency, x)
            if perturbed:
                x = self.perturb(x)
            total = total + x
        mean = total / (self.config.layers + 1)
        return mean[: self.n_users], mean[self.n_users :]

    def forward_all(self):
        """(final users, final items, layer-0 users, layer-0 items): propagated over the full train graph."""
        users0, items0, start = self.fusion.graph_layer0()
        users, items = self.propagate_layers(self.adjacency, users0, items0, start=start)
        return users, (items if self.fusion.propagates_items else items0), users0, items0
