"""BiasMF: score(u, i) = <p_u, q_i> + b_i (+ b_u + mu, constant per user and so absent from BPR
and from rankings). With text features the item bias is a linear function of the item's
representation, so unseen items get one too."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from reclm.cf.backbones.base import DotProductModel, bpr_loss, l2_loss
from reclm.cf.config import CFConfig
from reclm.cf.fusion import Fusion


class BiasMF(DotProductModel):
    name = "bias-mf"

    def __init__(self, n_users: int, n_items: int, config: CFConfig, fusion: Fusion, train: np.ndarray):
        super().__init__(n_users, n_items, config, fusion, train)
        if fusion.mode == "none":
            self.item_bias = nn.Embedding(n_items, 1)
            nn.init.zeros_(self.item_bias.weight)
        else:
            self.item_bias_head = nn.Linear(fusion.out_dim, 1)
            nn.init.zeros_(self.item_bias_head.weight)
            nn.init.zeros_(self.item_bias_head.bias)

    def biases(self, items_repr: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        if self.fusion.mode == "none":
            weight = self.item_bias.weight
            return (weight if index is None else weight[index]).squeeze(-1)
        return self.item_bias_head(items_repr).squeeze(-1)

    def batch_loss(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> dict[str, torch.Tensor]:
        # only the batch's rows are needed: no full pass over users and items
        u = self.fusion.users(users)
        p, n = self.fusion.items(torch.cat([pos, neg])).split([len(pos), len(neg)])  # one pass: one profile mean
        pos_scores = (u * p).sum(1) + self.biases(p, pos)
        neg_scores = (u * n).sum(1) + self.biases(n, neg)
        bpr = bpr_loss(pos_scores, neg_scores)
        reg = self.config.reg_weight * l2_loss(u, p, n)
        return {"total": bpr + reg, "bpr": bpr, "reg": reg}

    def forward_all(self):
        users0, items0 = self.fusion.all()
        bias = self.biases(items0, None).unsqueeze(1)
        # scores as one dot product: [p_u, 1] . [q_i, b_i]
        users = torch.cat([users0, torch.ones_like(users0[:, :1])], dim=1)
        items = torch.cat([items0, bias], dim=1)
        return users, items, users0, items0
