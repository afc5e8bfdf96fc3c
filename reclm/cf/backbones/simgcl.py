"""SimGCL (Yu et al. 2022): LightGCN + InfoNCE between two views made by adding random noise of
norm ``eps`` (sign-aligned with the representation) after every propagation layer.

One deviation from the paper's code: the final representation also averages layer 0 (as LightGCN),
because items with no train edge (zero-shot items) have nothing but layer 0; without it every
new item would score zero."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reclm.cf.backbones.base import contrast_nodes, info_nce
from reclm.cf.backbones.lightgcn import LightGCN


class SimGCL(LightGCN):
    name = "simgcl"

    def perturb(self, layer: torch.Tensor) -> torch.Tensor:
        noise = F.normalize(torch.rand_like(layer), dim=-1)
        return layer + torch.sign(layer) * noise * self.config.simgcl_eps

    def batch_loss(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> dict[str, torch.Tensor]:
        final_u, final_i, users0, items0 = self.forward_all()
        terms = self.bpr_terms(final_u, final_i, users0, items0, users, pos, neg)
        users0, items0 = self.fusion.contrastive_all()  # SSL trains ID embeddings, not feature encoders
        u1, i1 = self.propagate_layers(self.adjacency, users0, items0, perturbed=True)
        u2, i2 = self.propagate_layers(self.adjacency, users0, items0, perturbed=True)
        cfg = self.config
        ssl = info_nce(u1, u2, contrast_nodes(users, cfg.ssl_nodes), cfg.simgcl_ssl_tau, cfg.ssl_negatives) + info_nce(
            i1, i2, contrast_nodes(pos, cfg.ssl_nodes), cfg.simgcl_ssl_tau, cfg.ssl_negatives
        )
        terms["ssl"] = cfg.simgcl_ssl_weight * ssl
        terms["total"] = terms["total"] + terms["ssl"]
        return terms
