from __future__ import annotations

import json

import numpy as np
import pytest

from reclm.data.errors import DataError
from reclm.llm.encode import aligned_vectors, encode_run, load_vectors
from reclm.llm.quality import read_heldout, repeats_an_entry, run_quality, text_stats
from reclm.llm.records import ProfileRecord, write_records
from reclm.text.encoder import TextEncoder

GOOD_A = "User identity: Student, Gamer; User interests: Video games, Anime."
GOOD_B = "User identity: Retiree; User interests: Gardening, Cooking, Travel."
TOO_MANY = "User identity: A, B, C, D, E, F; User interests: X."
CHATTY = "Sure! Here it is. User identity: Chef; User interests: Food."


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return TextEncoder(cache_dir=tmp_path_factory.mktemp("enc"), show_progress=False)


def test_text_stats_on_a_constructed_list():
    stats = text_stats([GOOD_A, GOOD_A, "", TOO_MANY, "no profile at all", CHATTY, GOOD_B, "  "])
    assert stats["count"] == 8
    assert stats["format_rate"] == round(4 / 8, 4)  # GOOD_A twice, CHATTY, GOOD_B
    assert stats["strict_rate"] == round(4 / 8, 4)  # GOOD_A twice, TOO_MANY, GOOD_B
    assert stats["empty_rate"] == 0.25
    assert stats["duplicate_rate"] == round(1 - 5 / 6, 4)  # six non-empty, five distinct
    assert stats["mean_identities"] == round((2 + 2 + 6 + 1 + 1) / 5, 2)
    assert stats["mean_interests"] == round((2 + 2 + 1 + 1 + 3) / 5, 2)
    words = [len(t.split()) for t in [GOOD_A, GOOD_A, "", TOO_MANY, "no profile at all", CHATTY, GOOD_B, ""]]
    assert stats["mean_words"] == round(float(np.mean(words)), 2)


def test_an_entry_listed_twice_in_either_part_is_found_case_insensitively():
    assert repeats_an_entry("User identity: Movie lover, movie lover; User interests: Drama.")
    assert repeats_an_entry("User identity: Student; User interests: Drama, Comedy, Drama.")
    assert not repeats_an_entry("User identity: Drama fan; User interests: Drama, Comedy.")  # across parts is fine
    assert not repeats_an_entry("Drama, Drama")  # not a profile


def test_run_quality_similarity_to_heldout_teacher(tmp_path, encoder):
    teacher = [
        ProfileRecord("user", "1", "p", GOOD_A),
        ProfileRecord("user", "2", "p", GOOD_B),
        ProfileRecord("user", "3", "p", "User identity: Nurse; User interests: Health, Running."),
    ]
    generated = [
        ProfileRecord("user", "1", "p", GOOD_A),  # identical to its teacher
        ProfileRecord("user", "2", "p", "User identity: Pensioner; User interests: Gardens, Recipes, Trips."),
        ProfileRecord("user", "3", "p", ""),  # empty: not compared
        ProfileRecord("user", "4", "p", GOOD_B),  # no teacher profile
    ]
    write_records(tmp_path / "teacher" / "users.jsonl", teacher)
    write_records(tmp_path / "profiles" / "users.jsonl", generated)
    everything = run_quality(tmp_path, encoder=encoder)
    assert everything["users"]["similarity"]["compared"] == 2
    assert everything["heldout"] is False
    (tmp_path / "heldout.json").write_text(json.dumps({"user": ["1"], "item": []}))
    report = run_quality(tmp_path, heldout=tmp_path / "heldout.json", encoder=encoder)
    sim = report["users"]["similarity"]
    assert sim["compared"] == 1 and sim["mean_cosine"] == pytest.approx(1.0, abs=1e-5)
    both = everything["users"]["similarity"]
    a, b = encoder.encode([generated[1].profile, GOOD_B])
    assert both["mean_cosine"] == pytest.approx((1.0 + float(a @ b)) / 2, abs=1e-4)
    assert both["shuffled"] < both["mean_cosine"]
    saved = json.loads((tmp_path / "profiles" / "quality.json").read_text())
    assert saved["users"]["count"] == 4 and saved["users"]["empty_rate"] == 0.25
    assert "items" not in saved


def test_heldout_file_forms(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(["1", 2]))
    assert read_heldout(tmp_path / "a.json") == {"user": {"1", "2"}, "item": set()}
    (tmp_path / "b.json").write_text(json.dumps({"users": [1], "items": [5]}))
    assert read_heldout(tmp_path / "b.json") == {"user": {"1"}, "item": {"5"}}
    write_records(tmp_path / "c.jsonl", [ProfileRecord("item", "9", "p", "x")])
    assert read_heldout(tmp_path / "c.jsonl") == {"user": set(), "item": {"9"}}
    with pytest.raises(DataError):
        read_heldout(tmp_path / "missing.json")


def test_encode_writes_aligned_normalised_vectors(tmp_path, encoder):
    users = [
        ProfileRecord("user", "10", "p", GOOD_A),
        ProfileRecord("user", "11", "p", ""),
        ProfileRecord("user", "12", "p", GOOD_B),
    ]
    items = [ProfileRecord("item", "7", "p", CHATTY)]
    write_records(tmp_path / "profiles" / "users.jsonl", users)
    write_records(tmp_path / "profiles" / "items.jsonl", items)
    metas = encode_run(tmp_path, encoder=encoder)
    assert metas["user"] == {"encoder": "all-MiniLM-L6-v2", "dim": 384, "count": 2, "source": "profiles/users.jsonl"}
    assert json.loads((tmp_path / "embeddings" / "items.json").read_text())["count"] == 1
    ids, vectors = load_vectors(tmp_path / "embeddings" / "users.npz")
    assert ids == ["10", "12"] and vectors.dtype == np.float32 and vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors, encoder.encode([GOOD_A, GOOD_B]), atol=1e-6)
    matrix, covered = aligned_vectors(tmp_path / "embeddings" / "users.npz", ["12", "11", "10", "99"])
    assert covered.tolist() == [True, False, True, False]
    np.testing.assert_allclose(matrix[0], vectors[1])
    assert not matrix[1].any() and not matrix[3].any()


def test_encode_from_teacher_and_missing_inputs(tmp_path, encoder):
    with pytest.raises(DataError, match="reclm teacher"):
        encode_run(tmp_path, source="teacher", encoder=encoder)
    write_records(tmp_path / "teacher" / "items.jsonl", [ProfileRecord("item", "3", "p", GOOD_B)])
    metas = encode_run(tmp_path, source="teacher", encoder=encoder)
    assert list(metas) == ["item"] and metas["item"]["source"] == "teacher/items.jsonl"
    with pytest.raises(ValueError, match="source"):
        encode_run(tmp_path, source="elsewhere", encoder=encoder)


def test_encoding_in_chunks_matches_one_call_and_logs_progress(tmp_path, encoder, capsys):
    """Chunks of CHUNK_BATCHES batches, each a progress step (a line in a log, not a tqdm flood)."""
    chunked = TextEncoder(cache_dir=tmp_path, batch_size=2, show_progress=True)
    texts = [f"User identity: reader {i}; User interests: topic {i % 7}, genre {i % 3}." for i in range(70)]
    vectors = chunked.encode(texts, desc="profiles")  # 70 texts in chunks of 32: 32, 32, 6
    whole = encoder.model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    assert vectors.shape == (70, encoder.dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, whole, atol=1e-5)
    out = capsys.readouterr()
    assert out.out.splitlines()[-1].startswith("profiles: 70/70 (100%)")
    assert "Batches" not in out.err + out.out
