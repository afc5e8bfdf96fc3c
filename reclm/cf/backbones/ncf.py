"""NeuMF (He et al. 2017): GMF and MLP towers over separate halves of the layer-0 representation,
joined by a linear output layer; trained with BPR like the other backbones. Not a dot-product
model: full ranking evaluates the towers on every (user, item) pair, in chunks, with the first MLP
layer split into precomputed user and item parts."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from reclm.cf.backbones.base import CFModel, Scorer, bpr_loss, l2_loss
from reclm.cf.config import CFConfig
from reclm.cf.fusion import Fusion, xavier_init

PAIR_BUDGET = 1 << 23  # (users x items x hidden) floats per scoring chunk: about 32 MB


class NeuMF(CFModel):
    name = "ncf"
    dot_product = False

    @staticmethod
    def representation_dim(config: CFConfig) -> int:
        return 2 * config.dim  # GMF half + MLP half

    def __init__(self, n_users: int, n_items: int, config: CFConfig, fusion: Fusion, train: np.ndarray):
        super().__init__(n_users, n_items, config, fusion, train)
        dim = config.dim
        sizes = [2 * dim, *config.ncf_mlp]
        self.mlp_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.dropout = nn.Dropout(config.ncf_dropout)
        self.predict = nn.Linear(dim + sizes[-1], 1)
        self.mlp_layers.apply(xavier_init)
        self.predict.apply(xavier_init)

    def split(self, reps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return reps[..., : self.config.dim], reps[..., self.config.dim :]

    def pair_scores(self, u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        ug, um = self.split(u)
        ig, im = self.split(i)
        h = torch.cat([um, im], dim=-1)
        for layer in self.mlp_layers:
            h = self.dropout(torch.relu(layer(h)))
        return self.predict(torch.cat([ug * ig, h], dim=-1)).squeeze(-1)

    def batch_loss(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> dict[str, torch.Tensor]:
        u = self.fusion.users(users)
        p, n = self.fusion.items(torch.cat([pos, neg])).split([len(pos), len(neg)])  # one pass: one profile mean
        bpr = bpr_loss(self.pair_scores(u, p), self.pair_scores(u, n))
        reg = self.config.reg_weight * l2_loss(u, p, n)
        return {"total": bpr + reg, "bpr": bpr, "reg": reg}

    def scorer(self) -> Scorer:
        users_all, items_all = self.fusion.all()
        dim = self.config.dim
        first = self.mlp_layers[0]
        w_user, w_item = first.weight[:, :dim], first.weight[:, dim:]
        user_part = self.split(users_all)[1] @ w_user.T + first.bias  # (U, h1)
        item_part = self.split(items_all)[1] @ w_item.T  # (I, h1)
        w_gmf, w_mlp = self.predict.weight[0, :dim], self.predict.weight[0, dim:]
        item_gmf_t = (self.split(items_all)[0] * w_gmf).T.contiguous()  # (dim, I)
        chunk = max(1, PAIR_BUDGET // max(1, self.n_items * first.out_features))

        def score(users: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
            gmf_t = item_gmf_t if items is None else item_gmf_t[:, items]
            part = item_part if items is None else item_part[items]
            out = self.split(users_all[users])[0] @ gmf_t + self.predict.bias
            for start in range(0, len(users), chunk):
                rows = users[start : start + chunk]
                h = torch.relu(user_part[rows].unsqueeze(1) + part.unsqueeze(0))  # (b, I, h1)
                for layer in self.mlp_layers[1:]:
                    h = torch.relu(layer(h))
                out[start : start + chunk] += h @ w_mlp
            return out

        return score
