"""The user-item graph: symmetric normalised adjacency ``D^-1/2 A D^-1/2`` over users + items,
built once from the train pairs, and sparse propagation with a cheap backward pass.

The adjacency is symmetric, so the gradient of ``A @ X`` with respect to ``X`` is ``A @ grad``:
a custom autograd function reuses the forward CSR matrix (several times faster on CPU than
autograd through ``torch.sparse.mm`` on a COO tensor).
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch

# torch warns once per process that CSR support is "beta"; the ops used here (CSR @ dense) are stable
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def normalized_adjacency(
    train: np.ndarray, n_users: int, n_items: int, keep: np.ndarray | None = None
) -> sp.csr_matrix:
    """``(U + I) x (U + I)`` symmetric normalised adjacency of the (optionally edge-subsampled) pairs."""
    pairs = train if keep is None else train[keep]
    users, items = pairs[:, 0], pairs[:, 1] + n_users
    n = n_users + n_items
    data = np.ones(2 * len(pairs), dtype=np.float32)
    adj = sp.csr_matrix((data, (np.r_[users, items], np.r_[items, users])), shape=(n, n))
    adj.sum_duplicates()
    adj.data[:] = 1.0
    degree = np.asarray(adj.sum(axis=1)).ravel()
    inv_sqrt = np.zeros_like(degree, dtype=np.float32)
    nonzero = degree > 0
    inv_sqrt[nonzero] = degree[nonzero] ** -0.5
    scale = sp.diags(inv_sqrt)
    return (scale @ adj @ scale).tocsr().astype(np.float32)


def to_torch_csr(matrix: sp.csr_matrix, device: torch.device | str = "cpu") -> torch.Tensor:
    matrix = matrix.tocsr()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        csr = torch.sparse_csr_tensor(
            torch.from_numpy(matrix.indptr.astype(np.int64)),
            torch.from_numpy(matrix.indices.astype(np.int64)),
            torch.from_numpy(matrix.data.astype(np.float32)),
            size=matrix.shape,
            check_invariants=False,  # built by scipy: valid by construction
        )
    return csr.to(device)


class _SymmetricSpMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, adjacency: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.adjacency = adjacency
        return torch.sparse.mm(adjacency, dense)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return None, torch.sparse.mm(ctx.adjacency, grad.contiguous())


def propagate(adjacency: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``adjacency @ dense`` for a symmetric sparse ``adjacency`` (differentiable in ``dense``)."""
    return _SymmetricSpMM.apply(adjacency, dense)


def edge_dropout_keep(n_edges: int, drop_ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of the edges an SGL view keeps (``(1 - drop_ratio) * n_edges`` of them, without replacement)."""
    n_keep = int(round(n_edges * (1.0 - drop_ratio)))
    return np.sort(rng.choice(n_edges, size=n_keep, replace=False))
