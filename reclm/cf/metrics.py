"""Top-K metrics with RecBole's definitions, on a batch of ranked hit matrices.

``hits[b, r]`` is 1 when the item at rank ``r`` (0-based) of user ``b``'s list is relevant;
``n_relevant[b]`` is the size of the user's ground truth.
- Recall@K = hits in the top K / |ground truth|
- NDCG@K = DCG@K / IDCG@K, binary relevance, DCG = sum 1 / log2(rank + 2), IDCG over min(|gt|, K).
"""

from __future__ import annotations

import torch


def discounts(k: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return 1.0 / torch.log2(torch.arange(k, device=device, dtype=torch.float64) + 2.0)


def recall_at_k(hits: torch.Tensor, n_relevant: torch.Tensor, k: int) -> torch.Tensor:
    return hits[:, :k].sum(1).double() / n_relevant.double().clamp(min=1)


def ndcg_at_k(hits: torch.Tensor, n_relevant: torch.Tensor, k: int) -> torch.Tensor:
    disc = discounts(max(k, hits.shape[1]), hits.device)
    dcg = (hits[:, :k].double() * disc[: min(k, hits.shape[1])]).sum(1)
    ideal_cum = torch.cumsum(discounts(k, hits.device), 0)
    ideal_n = n_relevant.clamp(min=1, max=k).long() - 1
    return dcg / ideal_cum[ideal_n]


def topk_metrics(hits: torch.Tensor, n_relevant: torch.Tensor, topks: list[int]) -> dict[str, torch.Tensor]:
    """Per-user ``recall@K`` and ``ndcg@K`` for each K (hits may be shorter than K when the candidate
    list is: missing ranks count as misses)."""
    out: dict[str, torch.Tensor] = {}
    for k in topks:
        out[f"recall@{k}"] = recall_at_k(hits, n_relevant, k)
        out[f"ndcg@{k}"] = ndcg_at_k(hits, n_relevant, k)
    return out
