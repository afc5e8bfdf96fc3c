import numpy as np
import pytest
import torch

from reclm.cf.graph import edge_dropout_keep, normalized_adjacency, propagate, to_torch_csr
from reclm.cf.sampler import BPRSampler


def test_normalized_adjacency_values():
    train = np.array([[0, 0], [0, 1], [1, 1]])
    adj = normalized_adjacency(train, 2, 3).toarray()
    assert np.allclose(adj, adj.T)
    # user 0 (degree 2) - item 0 (degree 1): 1/sqrt(2*1); user 1 (deg 1) - item 1 (deg 2): 1/sqrt(1*2)
    assert adj[0, 2] == pytest.approx(1 / np.sqrt(2))
    assert adj[0, 3] == pytest.approx(1 / np.sqrt(4))
    assert adj[1, 3] == pytest.approx(1 / np.sqrt(2))
    assert adj[4].sum() == 0  # isolated item: no edges
    assert adj[:2, :2].sum() == 0 and adj[2:, 2:].sum() == 0  # bipartite


def test_propagate_gradient_matches_dense():
    train = np.array([[0, 0], [0, 1], [1, 1], [2, 0]])
    adj = normalized_adjacency(train, 3, 2)
    x = torch.randn(5, 4, requires_grad=True)
    y = propagate(to_torch_csr(adj), x)
    w = torch.randn(5, 4)
    (y * w).sum().backward()
    dense = torch.tensor(adj.toarray())
    assert torch.allclose(y, dense @ x.detach(), atol=1e-6)
    assert torch.allclose(x.grad, dense.T @ w, atol=1e-6)


def test_edge_dropout_keeps_the_right_share():
    keep = edge_dropout_keep(1000, 0.1, np.random.default_rng(0))
    assert len(keep) == 900 and len(np.unique(keep)) == 900


def test_sampler_negatives_are_never_positives_nor_outside_candidates():
    rng = np.random.default_rng(0)
    train = np.array([(u, i) for u in range(50) for i in rng.choice(20, size=15, replace=False)])
    candidates = np.arange(18)  # items 18, 19 are held out
    sampler = BPRSampler(train, 20, candidates)
    users, pos, neg = sampler.epoch(np.random.default_rng(1))
    assert sorted(zip(users.tolist(), pos.tolist())) == sorted(map(tuple, train.tolist()))  # each pair once
    positives = set(map(tuple, train.tolist()))
    assert not any((u, n) in positives for u, n in zip(users.tolist(), neg.tolist()))
    assert neg.max() < 18
    again = sampler.epoch(np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip((users, pos, neg), again))


def test_sampler_rejects_a_user_with_every_item():
    with pytest.raises(ValueError, match="every candidate"):
        BPRSampler(np.array([[0, 0], [0, 1]]), 2)
