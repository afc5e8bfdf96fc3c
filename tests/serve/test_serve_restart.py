"""Servers started, stopped and started again on the same run: added items survive a restart (and FAISS
serves them as NumPy did), ``--profile-backend none``, the default model choice and the CTranslate2 writer."""

from __future__ import annotations

import numpy as np

LIGHTGCN = "cf/lightgcn-text+profiles-s2020"


def test_a_restart_keeps_added_items(start_server, served_run):
    root, _ = served_run
    first = start_server(root, "--model", LIGHTGCN, "--profile-backend", "none")
    profile = "User identity: night owl, horror fan; User interests: Horror, suspense."
    item = {"id": "keep-me", "fields": {"title": "The night that stayed", "genres": "Horror"}, "profile": profile}
    added = first.client.post("/items", json=item)
    assert added.status_code == 201, added.text
    before = first.client.get("/users/4/recommendations", params={"k": 1000}).json()["items"]
    cold = first.client.post("/recommendations", json={"items": ["3", "7", "11"], "k": 5}).json()
    assert cold["profile_status"] == "disabled" and cold["profile"] is None and len(cold["items"]) == 5
    assert first.client.get("/health").json()["profiles"]["backend"] == "none"
    first.stop()

    second = start_server(root, "--model", LIGHTGCN, "--profile-backend", "none", "--faiss-min-items", "1")
    health = second.client.get("/health").json()
    assert health["index"] == "faiss" and health["added_items"] >= 1
    assert second.client.get("/items/keep-me/profile").json()["profile"] == profile
    after = second.client.get("/users/4/recommendations", params={"k": 1000}).json()["items"]
    # the same items with the same scores (an added copy of an item ties with it: FAISS and NumPy may order
    # exact ties differently)
    scores_before, scores_after = ({r["id"]: r["score"] for r in ranked} for ranked in (before, after))
    assert scores_after.keys() == scores_before.keys()
    ids = sorted(scores_before)
    np.testing.assert_allclose([scores_after[i] for i in ids], [scores_before[i] for i in ids], rtol=1e-4, atol=1e-4)
    assert all(a["score"] >= b["score"] - 1e-6 for a, b in zip(after, after[1:]))
    assert "keep-me" in {r["id"] for r in after}
    assert second.client.post("/items", json=item).status_code == 409
    again = second.client.post("/recommendations", json={"items": ["3", "7", "11"], "k": 5}).json()
    assert [r["id"] for r in again["items"]] == [r["id"] for r in cold["items"]]


def test_default_model_is_the_best_by_validation_and_ct2_writes_profiles(start_server, served_run, ranking):
    root, info = served_run
    with_profiles = {k: r for k, r in info["results"].items() if k.endswith("text+profiles")}
    best = max(with_profiles, key=lambda k: with_profiles[k].valid["ndcg@20"])
    server = start_server(root, "--profile-backend", "ct2", "--threads", "1")
    health = server.client.get("/health").json()
    assert health["model"]["name"] == f"{best}-s2020" and health["profiles"]["backend"] == "ct2"
    assert health["model"]["valid"]["ndcg@20"] == with_profiles[best].valid["ndcg@20"]
    body = server.client.get("/users/9/recommendations", params={"k": 1000}).json()["items"]
    base_ids = set(info["data"].item_ids)
    ids = [r["id"] for r in body if r["id"] in base_ids]
    expected_ids, expected_scores = ranking(f"cf/{best}-s2020", "9")
    assert ids == expected_ids
    np.testing.assert_allclose([r["score"] for r in body if r["id"] in base_ids], expected_scores, atol=1e-4)
    new_user = server.client.post("/recommendations", json={"items": ["2", "6", "10"], "k": 5})
    assert new_user.status_code == 200, new_user.text
    assert new_user.json()["profile_status"] == "generated" and len(new_user.json()["items"]) == 5
    item = server.client.post("/items", json={"fields": {"title": "Ct2 written", "genres": "Drama"}})
    assert item.status_code == 201 and item.json()["profile_status"] == "generated"
