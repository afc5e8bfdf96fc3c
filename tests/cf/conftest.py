"""Small real inputs for CF tests: a clustered synthetic split and matching side features."""

from __future__ import annotations

import numpy as np
import pytest

from reclm.cf.features import SideFeatures
from reclm.data.split import Split


def clustered_split(
    n_users: int = 60, n_items: int = 40, n_groups: int = 4, per_user: int = 8, zero_shot: int = 4, seed: int = 0
) -> Split:
    """Users in ``n_groups`` taste groups, each clicking items of its own group: learnable structure.
    The last ``zero_shot`` items are held out of train/valid (their clicks are test-only)."""
    rng = np.random.default_rng(seed)
    item_group = np.arange(n_items) % n_groups
    zero_items = np.arange(n_items - zero_shot, n_items)
    train, valid, test = [], [], []
    for u in range(n_users):
        group = u % n_groups
        pool = np.flatnonzero((item_group == group) & (np.arange(n_items) < n_items - zero_shot))
        chosen = rng.choice(pool, size=min(per_user, len(pool)), replace=False)
        n_valid = n_test = max(1, len(chosen) // 5)
        test += [(u, i) for i in chosen[:n_test]]
        valid += [(u, i) for i in chosen[n_test : n_test + n_valid]]
        train += [(u, i) for i in chosen[n_test + n_valid :]]
        zs = zero_items[item_group[zero_items] == group]
        test += [(u, i) for i in zs[:1]]
    return Split(
        n_users=n_users,
        n_items=n_items,
        train=np.array(train, dtype=np.int64),
        valid=np.array(valid, dtype=np.int64),
        test=np.array(test, dtype=np.int64),
        zero_shot_items=zero_items.astype(np.int64),
    )


def clustered_features(split: Split, dim: int = 12, seed: int = 1) -> SideFeatures:
    """Item "text" vectors that reveal the item's group (so text can score unseen items), profiles too."""
    rng = np.random.default_rng(seed)
    n_groups = 4
    centres = rng.normal(size=(n_groups, dim)).astype(np.float32)
    item_group = np.arange(split.n_items) % n_groups
    item_text = centres[item_group] + 0.1 * rng.normal(size=(split.n_items, dim)).astype(np.float32)
    user_profiles = centres[np.arange(split.n_users) % n_groups] + 0.1 * rng.normal(size=(split.n_users, dim))
    item_profiles = item_text + 0.1 * rng.normal(size=item_text.shape)
    return SideFeatures(
        item_text=item_text.astype(np.float32),
        user_profiles=user_profiles.astype(np.float32),
        item_profiles=item_profiles.astype(np.float32),
    )


@pytest.fixture
def tiny_split() -> Split:
    return clustered_split()


@pytest.fixture
def tiny_features(tiny_split) -> SideFeatures:
    return clustered_features(tiny_split)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tests share a 2-core machine with other jobs: one intra-op thread is fastest and stable."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def make_split():
    """The clustered split builder, for tests that need variants."""
    return clustered_split


@pytest.fixture
def make_features():
    """The clustered feature builder, for tests that build their own split."""
    return clustered_features
