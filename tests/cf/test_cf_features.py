import numpy as np
import pytest

from reclm.cf.features import SideFeatures, load_profile_embeddings, load_side_features
from reclm.data.dataset import RecDataset
from reclm.data.errors import DataError


def dataset(item_fields=None) -> RecDataset:
    return RecDataset(
        name="toy",
        user_ids=["10", "20", "30"],
        item_ids=["a", "b"],
        inter_user=np.array([0, 1, 2]),
        inter_item=np.array([0, 1, 1]),
        item_fields=item_fields if item_fields is not None else {"title": ["Apple pie", "Banana split"]},
    )


def write_npz(path, ids, vectors):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, ids=np.array(ids), vectors=np.asarray(vectors, dtype=np.float32))


def test_profile_embeddings_align_by_raw_id_with_zero_for_missing(tmp_path):
    write_npz(tmp_path / "users.npz", ["30", "10", "99"], [[3, 3], [1, 1], [9, 9]])
    aligned, coverage = load_profile_embeddings(tmp_path / "users.npz", ["10", "20", "30"])
    assert aligned.tolist() == [[1, 1], [0, 0], [3, 3]]
    assert coverage == pytest.approx(2 / 3)


def test_bad_profile_files_raise_data_errors(tmp_path):
    with pytest.raises(DataError, match="missing profile embeddings"):
        load_profile_embeddings(tmp_path / "nope.npz", ["1"])
    np.savez(tmp_path / "bad.npz", vectors=np.zeros((1, 2)))
    with pytest.raises(DataError, match="'ids'"):
        load_profile_embeddings(tmp_path / "bad.npz", ["1"])
    write_npz(tmp_path / "shape.npz", ["1", "2"], [[1, 2]])
    with pytest.raises(DataError, match="shape"):
        load_profile_embeddings(tmp_path / "shape.npz", ["1"])


class CountingEncoder:
    """A stand-in with the TextEncoder interface (the real one is exercised in the CLI test)."""

    def encode(self, texts, desc=""):
        return np.array([[len(t), t.count(" ")] for t in texts], dtype=np.float32)


def test_text_plus_profiles_loads_everything_and_reports_coverage(tmp_path):
    write_npz(tmp_path / "embeddings" / "users.npz", ["10", "20"], [[1, 0, 0], [0, 1, 0]])
    write_npz(tmp_path / "embeddings" / "items.npz", ["b"], [[0, 0, 1]])
    side = load_side_features(dataset(), "text+profiles", tmp_path, encoder=CountingEncoder())
    assert side.item_text.tolist() == [[16, 2], [19, 2]]  # "title: Apple pie", "title: Banana split"
    assert side.user_profiles.shape == (3, 3) and side.item_profiles.shape == (2, 3)
    assert side.coverage == pytest.approx({"item_text": 1.0, "user_profiles": 2 / 3, "item_profiles": 0.5})
    side.require("text+profiles", 3, 2)


def test_clear_errors_for_missing_inputs(tmp_path):
    with pytest.raises(ValueError, match="--profiles"):
        load_side_features(dataset(), "text+profiles", None, encoder=CountingEncoder())
    with pytest.raises(DataError, match="users.npz"):
        load_side_features(dataset(), "text+profiles", tmp_path, encoder=CountingEncoder())
    with pytest.raises(DataError, match="no item text"):
        load_side_features(dataset(item_fields={}), "text", encoder=CountingEncoder())
    assert load_side_features(dataset(item_fields={}), "none").dims() == SideFeatures().dims()
