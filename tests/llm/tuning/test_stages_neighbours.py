"""Neighbours: exact cosine top-k, train-only candidates, text neighbours for every item, the files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from reclm.data.errors import DataError
from reclm.llm.neighbours import (
    NeighbourTable,
    build_neighbours,
    cosine_top_k,
    item_neighbours,
    items_with_train,
    load_neighbours,
    user_neighbours_from_vectors,
    users_with_train,
)


def brute_force(vectors, k, candidates):
    x = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = x @ x.T
    out = []
    for i in range(len(x)):
        order = [j for j in np.argsort(-sims[i], kind="stable") if j != i and candidates[j]]
        out.append(order[:k])
    return out


def test_cosine_top_k_matches_brute_force_and_never_returns_self():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(60, 8))
    candidates = rng.random(60) < 0.7
    idx, scores = cosine_top_k(vectors, 5, candidates=candidates, batch=7)
    expected = brute_force(vectors, 5, candidates)
    for i in range(60):
        assert idx[i].tolist() == expected[i]
        assert i not in idx[i].tolist()
        assert np.all(np.diff(scores[i]) <= 1e-6)  # best first


def test_cosine_top_k_pads_when_too_few_candidates():
    vectors = np.eye(4, dtype=np.float32) + 0.1
    candidates = np.array([True, True, False, False])
    idx, _ = cosine_top_k(vectors, 3, candidates=candidates)
    assert idx[0].tolist() == [1, -1, -1]  # itself excluded, only one other candidate
    assert idx[2].tolist()[:2] in ([0, 1], [1, 0]) and idx[2, 2] == -1


def test_user_neighbours_only_among_users_with_train(tiny):
    data, split = tiny
    vectors = split.train_matrix().toarray() + 1e-3
    table = user_neighbours_from_vectors(vectors, split, 3)
    active = users_with_train(split)
    for u in range(data.n_users):
        near = table.of(u)
        assert all(active[v] for v in near) and u not in near
        if not active[u]:
            assert near == []
    # users of the same taste (u % 4) share most items: they are each other's nearest neighbours
    same = np.mean([v % 4 == u % 4 for u in range(data.n_users) for v in table.of(u, 1)])
    assert same > 0.8


def test_every_item_gets_text_neighbours_among_seen_items(tiny, tmp_path):
    """One rule for trained and zero-shot items: text similarity among the items seen in train."""
    from reclm.text.encoder import TextEncoder

    data, split = tiny
    seen = items_with_train(split)
    assert (~seen).sum() >= 2
    encoder = TextEncoder(cache_dir=tmp_path)
    table = item_neighbours(data, split, 3, encoder=encoder)
    vectors = encoder.encode(data.item_texts())
    expected, _ = cosine_top_k(vectors, 3, candidates=seen)
    assert np.array_equal(table.neighbours, expected)
    for i in range(data.n_items):
        near = table.of(i)
        assert len(near) == 3 and all(seen[j] for j in near) and i not in near
        # the item text names the genre: text neighbours share it, trained item or new
        assert sum(j % 4 == i % 4 for j in near) >= 2


def test_item_side_only_needs_no_cf_model(tiny_run):
    """``users=False`` (no user-side stage on): item text neighbours and embeddings, no CF model trained."""
    run, data, split = tiny_run
    text = np.eye(4, dtype=np.float32)[np.arange(data.n_items) % 4] + 0.01 * np.arange(data.n_items)[:, None]

    class GenreEncoder:  # item text -> its genre (the sentence encoder runs in the test above)
        def encode(self, texts, desc=""):
            return text[: len(texts)]

    summary = build_neighbours(run, data, split, k=2, users=False, encoder=GenreEncoder())
    folder = run.stage("neighbours")
    assert not (folder / "users.npz").exists() and not list(folder.glob("cf-*"))
    assert "cf_embeddings" not in summary and summary["items_with_neighbours"] == data.n_items
    saved = np.load(folder / "item_text.npz")
    assert saved["ids"].tolist() == data.item_ids and np.allclose(saved["vectors"], text)


def test_build_neighbours_from_cf_embeddings_file(tiny_run):
    run, data, split = tiny_run
    rng = np.random.default_rng(1)
    folder = run.cf / "lightgcn-none-s1"
    folder.mkdir(parents=True)
    np.savez(
        folder / "embeddings.npz", users=rng.normal(size=(data.n_users, 8)), items=rng.normal(size=(data.n_items, 8))
    )
    text = rng.normal(size=(data.n_items, 4)).astype(np.float32)

    class FixedEncoder:  # the text similarity input is given, so no model is loaded here
        def encode(self, texts, desc=""):
            return text[: len(texts)]

    summary = build_neighbours(run, data, split, k=4, source="cf", encoder=FixedEncoder())
    assert summary["cf_embeddings"].endswith("lightgcn-none-s1/embeddings.npz")
    users = load_neighbours(run, data, "user")
    assert users.neighbours.shape == (data.n_users, 4)
    expected, _ = cosine_top_k(np.load(folder / "embeddings.npz")["users"], 4, candidates=users_with_train(split))
    active = users_with_train(split)
    assert np.array_equal(users.neighbours[active], expected[active])
    items = load_neighbours(run, data, "item")
    assert items.neighbours.shape == (data.n_items, 4)
    assert json.loads((run.stage("neighbours") / "neighbours.json").read_text())["k"] == 4


def test_shipped_user_neighbours_and_jsonl_reader(tiny_run, tmp_path):
    run, data, split = tiny_run
    path = tmp_path / "user_neighbours.jsonl"
    raw = data.user_ids
    lines = [
        json.dumps({"user": raw[u], "neighbours": [raw[(u + d) % data.n_users] for d in (1, 2)]})
        for u in range(data.n_users)
    ]
    path.write_text("\n".join(lines) + "\n")
    data.resources["user_neighbours"] = path
    build_neighbours(run, data, split, k=2, source="shipped", items=False)
    table = load_neighbours(run, data, "user")
    assert table.of(0) == [1, 2]
    # the pipeline's JSON Lines layout reads back to the same lists
    (run.stage("neighbours") / "users.npz").unlink()
    (run.stage("neighbours") / "users.jsonl").write_text("\n".join(lines) + "\n")
    assert load_neighbours(run, data, "user").of(5) == [6, 7]


def test_missing_neighbours_is_a_clear_error(tiny_run):
    run, data, _ = tiny_run
    with pytest.raises(DataError, match="reclm neighbours"):
        load_neighbours(run, data, "user")
    with pytest.raises(ValueError, match="expected one of cf, shipped"):
        build_neighbours(run, data, tiny_run[2], source="magic")


def test_table_roundtrip(tmp_path):
    table = NeighbourTable(np.array([[1, -1], [0, 1]]), np.array([[0.5, 0], [0.2, 0.1]]), {"a": 1})
    table.save(tmp_path / "t.npz")
    back = NeighbourTable.load(tmp_path / "t.npz")
    assert back.of(0) == [1] and back.of(1) == [0, 1] and back.meta == {"a": 1}
