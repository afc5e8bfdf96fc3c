import numpy as np
import pytest

from reclm.data.dataset import RecDataset
from reclm.data.loaders import load_dataset
from reclm.data.split import Split, SplitSpec, make_split

MIND = "/work/shared/datasets/mind"


def keys(pairs: np.ndarray, n_items: int) -> set[int]:
    return set((pairs[:, 0] * n_items + pairs[:, 1]).tolist())


def check_disjoint_and_zero_shot(split: Split) -> None:
    train, valid, test = (keys(p, split.n_items) for p in (split.train, split.valid, split.test))
    assert not (train & valid) and not (train & test) and not (valid & test)
    zero = set(split.zero_shot_items.tolist())
    assert not zero & set(split.train[:, 1].tolist())
    assert not zero & set(split.valid[:, 1].tolist())
    assert set(split.zero_shot_test()[:, 1].tolist()) <= zero
    assert not set(split.full_shot_test()[:, 1].tolist()) & zero


@pytest.fixture(scope="module")
def ml100k():
    return load_dataset("ml-100k")


def test_random_split_is_disjoint_complete_and_seeded(ml100k):
    spec = SplitSpec(method="random", zero_shot_fraction=0.1, seed=2020)
    split = make_split(ml100k, spec)
    check_disjoint_and_zero_shot(split)
    assert len(split.zero_shot_items) == round(0.1 * ml100k.n_items)
    everything = np.concatenate([split.train, split.valid, split.test])
    assert keys(everything, split.n_items) == keys(np.stack([ml100k.inter_user, ml100k.inter_item], 1), split.n_items)
    full = len(split.train) + len(split.valid) + len(split.full_shot_test())
    assert len(split.train) / full == pytest.approx(0.8, abs=0.02)
    again = make_split(ml100k, spec)
    assert np.array_equal(again.train, split.train) and np.array_equal(again.test, split.test)
    other = make_split(ml100k, SplitSpec(method="random", zero_shot_fraction=0.1, seed=1))
    assert not np.array_equal(other.train, split.train)


def test_temporal_split_puts_later_interactions_in_test():
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(20), 10)
    items = np.concatenate([rng.choice(50, 10, replace=False) for _ in range(20)])
    times = rng.permutation(len(users)).astype(float)
    data = RecDataset("t", [str(u) for u in range(20)], [str(i) for i in range(50)], users, items, {}, timestamps=times)
    split = make_split(data, SplitSpec(method="temporal", zero_shot_fraction=0.0))
    check_disjoint_and_zero_shot(split)
    when = {(u, i): t for u, i, t in zip(users, items, times)}
    for u in range(20):
        last_train = max(when[(u, i)] for uu, i in split.train.tolist() if uu == u)
        first_test = min(when[(u, i)] for uu, i in split.test.tolist() if uu == u)
        assert last_train < first_test


def test_mind_snapshot_split():
    data = load_dataset(MIND)
    split = make_split(data, SplitSpec(method="auto", seed=2020))
    assert split.meta["method"] == "snapshot"
    check_disjoint_and_zero_shot(split)
    assert len(split.test) == 87_974  # test pairs repeating a train pair are dropped (README)
    assert len(split.zero_shot_items) == 1_441 and len(split.zero_shot_test()) == 25_928
    assert len(split.train) + len(split.valid) == 89_734
    # every user keeps at least one train click
    assert len(np.unique(split.train[:, 0])) == data.n_users


def test_split_save_and_load_roundtrip(tmp_path, ml100k):
    split = make_split(ml100k, SplitSpec(method="random", seed=3))
    split.save(tmp_path)
    loaded = Split.load(tmp_path)
    for name in ("train", "valid", "test", "zero_shot_items"):
        assert np.array_equal(getattr(loaded, name), getattr(split, name))
    assert loaded.meta["seed"] == 3
