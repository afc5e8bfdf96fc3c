from pathlib import Path

import numpy as np
import pytest

from reclm.data.dataset import RecDataset
from reclm.data.errors import DataError
from reclm.data.loaders import load_dataset
from reclm.data.split import Split, SplitSpec, make_split

MIND = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "mind"  # beside the repository
needs_mind = pytest.mark.skipif(not (MIND / "interactions.csv").is_file(), reason=f"no MIND data at {MIND}")
NETFLIX = MIND.parent / "netflix"
needs_netflix = pytest.mark.skipif(not (NETFLIX / "interactions.csv").is_file(), reason=f"no Netflix at {NETFLIX}")


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


@needs_mind
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


def check_cold_valid(split: Split) -> None:
    """Cold-validation items: held out of train, valid and test, disjoint from the zero-shot items; the
    cold_valid pairs are theirs."""
    cold = set(split.cold_valid_items.tolist())
    assert cold and not cold & set(split.zero_shot_items.tolist())
    for pairs in (split.train, split.valid, split.test):
        assert not cold & set(pairs[:, 1].tolist())
    assert set(split.cold_valid[:, 1].tolist()) <= cold


def test_cold_valid_items_are_held_out_of_every_other_pair(ml100k):
    base = make_split(ml100k, SplitSpec(method="random", seed=2020))
    split = make_split(ml100k, SplitSpec(method="random", seed=2020, cold_valid_fraction=0.05))
    check_disjoint_and_zero_shot(split)
    check_cold_valid(split)
    assert len(split.cold_valid_items) == round(0.05 * ml100k.n_items)
    assert np.array_equal(split.zero_shot_items, base.zero_shot_items)  # the zero-shot items do not move
    everything = np.concatenate([split.train, split.valid, split.test, split.cold_valid])
    assert keys(everything, split.n_items) == keys(np.stack([ml100k.inter_user, ml100k.inter_item], 1), split.n_items)
    cold = np.isin(ml100k.inter_item, split.cold_valid_items)
    assert len(split.cold_valid) == cold.sum()  # every ml-100k user keeps a history: no cold pair dropped
    stats = split.stats()
    assert stats["cold_valid"] == len(split.cold_valid) and stats["cold_valid_items"] == 84
    assert stats["cold_valid_users"] == len(np.unique(split.cold_valid[:, 0])) > 500


@needs_mind
def test_mind_cold_valid_keeps_the_paper_zero_shot_items():
    data = load_dataset(MIND)
    split = make_split(data, SplitSpec(method="snapshot", ratios=(0.9, 0.1, 0.0), cold_valid_fraction=0.05))
    check_disjoint_and_zero_shot(split)
    check_cold_valid(split)
    assert len(split.zero_shot_items) == 1_441 and len(split.zero_shot_test()) == 25_928
    train_snapshot = data.snapshot == "train"
    snapshot_pairs = np.stack([data.inter_user[train_snapshot], data.inter_item[train_snapshot]], 1)
    assert keys(split.cold_valid, data.n_items) <= keys(snapshot_pairs, data.n_items)
    assert set(split.cold_valid[:, 0].tolist()) <= set(split.train[:, 0].tolist())  # users with a history
    stats = split.stats()  # docs/evaluation.md
    assert (stats["cold_valid_items"], stats["cold_valid"], stats["cold_valid_users"]) == (191, 4_374, 3_955)
    assert stats["users_with_train"] == 53_048 and stats["test_full_shot"] == 58_275


def first_times(data: RecDataset) -> dict[int, float]:
    first: dict[int, float] = {}
    for item, t in zip(data.inter_item.tolist(), data.timestamps.tolist()):
        first[item] = min(t, first.get(item, t))
    return first


def test_latest_zero_shot_items_are_the_last_to_appear(ml100k):
    split = make_split(ml100k, SplitSpec(method="random", zero_shot="latest", cold_valid_fraction=0.05))
    check_disjoint_and_zero_shot(split)
    check_cold_valid(split)
    first = first_times(ml100k)
    zero, cold = set(split.zero_shot_items.tolist()), set(split.cold_valid_items.tolist())
    assert len(zero) == round(0.1 * ml100k.n_items)
    rest = [first[i] for i in first if i not in zero and i not in cold]
    # zero-shot: the latest first appearances; cold validation: the latest before them
    assert min(first[i] for i in zero) >= max(first[i] for i in cold) >= max(rest)
    assert make_split(ml100k, SplitSpec(method="random", zero_shot="latest")).zero_shot_items.tolist() == sorted(zero)
    random = make_split(ml100k, SplitSpec(method="random"))
    assert not zero >= set(random.zero_shot_items.tolist())


def test_cold_pairs_of_users_left_without_history_are_dropped():
    # items 0-9 first seen in index order: item 9 is the latest (zero-shot), item 8 the next (cold validation)
    users = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 5, 5])
    items = np.array([0, 1, 8, 2, 3, 8, 4, 5, 9, 6, 7, 0, 8, 1, 2])
    times = np.array([0, 1, 8, 2, 3, 8, 4, 5, 9, 6, 7, 0, 8, 1, 2], dtype=float)
    data = RecDataset("t", [str(u) for u in range(6)], [str(i) for i in range(10)], users, items, {}, timestamps=times)
    spec = SplitSpec("random", (1.0, 0.0, 0.0), zero_shot_fraction=0.1, cold_valid_fraction=0.1, zero_shot="latest")
    split = make_split(data, spec)
    assert split.zero_shot_items.tolist() == [9] and split.cold_valid_items.tolist() == [8]
    assert split.cold_valid.tolist() == [[0, 8], [1, 8]]  # user 4's only interaction is with item 8
    assert 4 not in split.train[:, 0] and 4 not in split.test[:, 0]


def test_latest_zero_shot_needs_timestamps():
    data = RecDataset("t", ["0", "1"], ["0", "1", "2"], np.array([0, 1, 1]), np.array([0, 1, 2]), {})
    with pytest.raises(DataError, match="no timestamps"):
        make_split(data, SplitSpec(method="random", zero_shot="latest", zero_shot_fraction=0.4))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"cold_valid_fraction": -0.1}, "cold_valid_fraction"),
        ({"zero_shot_fraction": 0.5, "cold_valid_fraction": 0.5}, "cold_valid_fraction"),
        ({"zero_shot": "newest"}, "zero_shot 'newest'"),
    ],
)
def test_bad_cold_valid_or_zero_shot_options_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        SplitSpec(**kw)


def test_split_with_cold_valid_save_and_load_roundtrip(tmp_path, ml100k):
    split = make_split(ml100k, SplitSpec(method="random", seed=3, cold_valid_fraction=0.05, zero_shot="latest"))
    split.save(tmp_path)
    loaded = Split.load(tmp_path)
    for name in ("train", "valid", "test", "zero_shot_items", "cold_valid_items", "cold_valid"):
        assert np.array_equal(getattr(loaded, name), getattr(split, name))
    assert loaded.meta["cold_valid_fraction"] == 0.05 and loaded.meta["zero_shot"] == "latest"
    assert loaded.stats() == split.stats()


def test_a_split_saved_before_cold_validation_loads_with_none(tmp_path, ml100k):
    split = make_split(ml100k, SplitSpec(method="random", seed=3))
    split.save(tmp_path)
    with np.load(tmp_path / "split.npz") as arrays:  # the arrays an older version wrote
        old = {k: arrays[k] for k in ("train", "valid", "test", "zero_shot_items")}
    np.savez_compressed(tmp_path / "split.npz", **old)
    loaded = Split.load(tmp_path)
    assert np.array_equal(loaded.train, split.train)
    assert loaded.cold_valid_items.shape == (0,) and loaded.cold_valid.shape == (0, 2)
    assert not loaded.held_out_mask[~split.zero_shot_mask].any()


@needs_netflix
@pytest.mark.slow
def test_netflix_split_is_disjoint_and_its_new_items_are_the_zero_shot_ones():
    """Netflix ships only the later snapshot: old items split per user, new items (test only) are zero-shot."""
    data = load_dataset(NETFLIX)
    split = make_split(data, SplitSpec(method="auto", seed=2020))
    check_disjoint_and_zero_shot(split)
    new = set(np.flatnonzero(data.new_items).tolist())
    assert set(split.zero_shot_items.tolist()) == new
    assert len(split.train) > 0 and len(split.valid) > 0 and len(split.full_shot_test()) > 0
