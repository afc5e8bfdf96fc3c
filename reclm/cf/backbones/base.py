"""What every backbone shares: the BPR and InfoNCE losses, the scoring interface, and the
dot-product model skeleton (final user/item representations, scores = U @ I^T)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reclm.cf.config import CFConfig
from reclm.cf.fusion import Fusion


def bpr_loss(pos_scores: torch.Tensor, neg_scores: torch.Tensor) -> torch.Tensor:
    """Bayesian personalised ranking: mean of ``-log sigmoid(pos - neg)``."""
    return F.softplus(neg_scores - pos_scores).mean()


def l2_loss(*tensors: torch.Tensor) -> torch.Tensor:
    """Half the squared L2 norm of the batch's layer-0 representations, per batch row."""
    batch = tensors[0].shape[0]
    return sum(t.pow(2).sum() for t in tensors) / (2 * batch)


def info_nce(view1: torch.Tensor, view2: torch.Tensor, index: torch.Tensor, tau: float, negatives: str) -> torch.Tensor:
    """InfoNCE between two views of the nodes ``index`` (unique ids): positives are the same node in
    the other view; negatives the batch's other nodes (``batch``) or every node (``all``)."""
    z1 = F.normalize(view1[index], dim=1)
    if negatives == "all":
        logits = z1 @ F.normalize(view2, dim=1).T / tau
        return F.cross_entropy(logits, index)
    z2 = F.normalize(view2[index], dim=1)
    logits = z1 @ z2.T / tau
    return F.cross_entropy(logits, torch.arange(len(index), device=index.device))


def contrast_nodes(ids: torch.Tensor, cap: int | None) -> torch.Tensor:
    """The distinct ``ids`` of a batch that InfoNCE contrasts: all of them, or a random ``cap`` of them (torch's
    generator, so seeded runs repeat; nothing is drawn when the cap does not bind)."""
    nodes = torch.unique(ids)
    if cap is None or len(nodes) <= cap:
        return nodes
    return nodes[torch.randperm(len(nodes), device=nodes.device)[:cap]]


# scorer(users, items=None) -> (len(users), len(items) or n_items) scores
Scorer = Callable[..., torch.Tensor]


class CFModel(nn.Module):
    """A backbone over a fusion module. Subclasses implement ``batch_loss`` and ``scorer``."""

    name = "base"
    dot_product = True

    def __init__(self, n_users: int, n_items: int, config: CFConfig, fusion: Fusion, train: np.ndarray):
        super().__init__()
        self.n_users, self.n_items = n_users, n_items
        self.config = config
        self.fusion = fusion

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def start_epoch(self, rng: np.random.Generator) -> None:
        """Per-epoch setup before training batches (SGL draws its graph views here)."""

    def batch_loss(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms of one batch of (user, positive, negative) triples; ``total`` is optimised."""
        raise NotImplementedError

    def scorer(self) -> Scorer:
        """A function ``(users, items=None) -> (len(users), len(items) or n_items)`` scores, with
        whatever can be cached computed once (call under ``torch.no_grad()`` in eval mode)."""
        raise NotImplementedError

    @torch.no_grad()
    def user_item_scores(self, users: torch.Tensor | np.ndarray | list[int]) -> torch.Tensor:
        """Scores of every item for ``users`` (eval mode, no gradients)."""
        was_training = self.training
        self.eval()
        try:
            users = torch.as_tensor(np.asarray(users), dtype=torch.long, device=self.device)
            return self.scorer()(users)
        finally:
            self.train(was_training)


class DotProductModel(CFModel):
    """Score = <final user representation, final item representation>."""

    def forward_all(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(final users, final items, layer-0 users, layer-0 items) for every node."""
        users0, items0 = self.fusion.all()
        return users0, items0, users0, items0

    def batch_loss(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> dict[str, torch.Tensor]:
        final_u, final_i, users0, items0 = self.forward_all()
        return self.bpr_terms(final_u, final_i, users0, items0, users, pos, neg)

    def bpr_terms(self, final_u, final_i, users0, items0, users, pos, neg) -> dict[str, torch.Tensor]:
        u = final_u[users]
        bpr = bpr_loss((u * final_i[pos]).sum(1), (u * final_i[neg]).sum(1))
        reg = self.config.reg_weight * l2_loss(users0[users], items0[pos], items0[neg])
        return {"total": bpr + reg, "bpr": bpr, "reg": reg}

    @torch.no_grad()
    def final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Final user and item representations whose dot products are the scores."""
        was_training = self.training
        self.eval()
        try:
            users, items, _, _ = self.forward_all()
            return users.detach(), items.detach()
        finally:
            self.train(was_training)

    def scorer(self) -> Scorer:
        users_all, items_all = self.final_embeddings()
        items_t = items_all.T.contiguous()

        def score(users: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
            return users_all[users] @ (items_t if items is None else items_all[items].T)

        return score
