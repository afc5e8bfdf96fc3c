"""SGL-ED (Wu et al. 2021): LightGCN + InfoNCE between two edge-dropout views of the graph,
redrawn every epoch (as RecBole's SGL does), on the batch's users and positive items."""

from __future__ import annotations

import numpy as np
import torch

from reclm.cf.backbones.base import contrast_nodes, info_nce
from reclm.cf.backbones.lightgcn import LightGCN
from reclm.cf.graph import edge_dropout_keep, normalized_adjacency, to_torch_csr


class SGL(LightGCN):
    name = "sgl"

    def start_epoch(self, rng: np.random.Generator) -> None:
        views = []
        for _ in range(2):
            keep = edge_dropout_keep(len(self.train_pairs), self.config.sgl_drop_ratio, rng)
            adjacency = normalized_adjacency(self.train_pairs, self.n_users, self.n_items, keep)
            views.append(to_torch_csr(adjacency, self.device))
        self.view1, self.view2 = views

    def batch_loss(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> dict[str, torch.Tensor]:
        if not hasattr(self, "view1"):
            raise RuntimeError("SGL.start_epoch must draw the graph views before training batches")
        final_u, final_i, users0, items0 = self.forward_all()
        terms = self.bpr_terms(final_u, final_i, users0, items0, users, pos, neg)
        users0, items0 = self.fusion.contrastive_all()  # SSL trains ID embeddings, not feature encoders
        u1, i1 = self.propagate_layers(self.view1, users0, items0)
        u2, i2 = self.propagate_layers(self.view2, users0, items0)
        cfg = self.config
        ssl = info_nce(u1, u2, contrast_nodes(users, cfg.ssl_nodes), cfg.sgl_ssl_tau, cfg.ssl_negatives) + info_nce(
            i1, i2, contrast_nodes(pos, cfg.ssl_nodes), cfg.sgl_ssl_tau, cfg.ssl_negatives
        )
        terms["ssl"] = cfg.sgl_ssl_weight * ssl
        terms["total"] = terms["total"] + terms["ssl"]
        return terms
