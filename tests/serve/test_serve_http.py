"""The real server (``reclm serve`` in a subprocess on 127.0.0.1) called with httpx: every endpoint, every error
case, new users with profiles written on the fly, new items that reach users' top-k, concurrent requests."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

from reclm.llm.records import read_profiles

LIGHTGCN = "cf/lightgcn-text+profiles-s2020"
ROUTES = {"/health", "/users/{user_id}/recommendations", "/recommendations", "/items", "/users/{user_id}/profile"}


def base_part(items: list[dict], base_ids: set[str]) -> tuple[list[str], np.ndarray]:
    kept = [r for r in items if r["id"] in base_ids]
    return [r["id"] for r in kept], np.array([r["score"] for r in kept])


def train_items(info, raw_user: str) -> set[str]:
    data, split = info["data"], info["split"]
    user = data.user_ids.index(raw_user)
    return {data.item_ids[i] for i in split.train[split.train[:, 0] == user, 1]}


def test_health_and_docs(lightgcn_server, served_run):
    client = lightgcn_server.client
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"]["name"] == "lightgcn-text+profiles-s2020"
    assert health["users"] == 40 and health["items"] >= 60 and health["index"] == "numpy"
    assert health["item_fields"] == ["title", "year", "genres"]
    assert health["profiles"]["backend"] == "transformers" and health["profiles"]["used_by_model"]
    assert health["run"] == served_run[0].name and str(served_run[0]) not in str(health)  # no absolute path
    assert health["profiles"]["adapters"]["user"] == served_run[1]["adapter"].relative_to(served_run[0]).as_posix()
    assert health["limits"] == {"k": 1000, "history": 500, "added_items": 10_000, "stored_profiles": 100_000}
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    paths = set(client.get("/openapi.json").json()["paths"])
    assert ROUTES | {"/items/{item_id}/profile"} <= paths


def test_known_user_recommendations_follow_the_model(lightgcn_server, served_run, ranking):
    client = lightgcn_server.client
    info = served_run[1]
    base_ids = set(info["data"].item_ids)
    for user in ("1", "7", "22"):
        full = client.get(f"/users/{user}/recommendations", params={"k": 1000})
        assert full.status_code == 200
        body = full.json()
        assert body["user"] == user and body["model"] == "lightgcn-text+profiles-s2020"
        ids, scores = base_part(body["items"], base_ids)
        expected_ids, expected_scores = ranking(LIGHTGCN, user)
        assert ids == expected_ids
        np.testing.assert_allclose(scores, expected_scores, rtol=1e-4, atol=1e-4)
        assert not set(ids) & train_items(info, user)
        top5 = client.get(f"/users/{user}/recommendations?k=5").json()["items"]
        assert [r["id"] for r in top5] == [r["id"] for r in body["items"][:5]]
        assert all(a["score"] >= b["score"] for a, b in zip(top5, top5[1:]))
        assert top5[0]["text"].startswith("title: ")


def test_profiles_of_users_and_items(lightgcn_server, served_run):
    client = lightgcn_server.client
    root, info = served_run
    users = read_profiles(root / "profiles" / "users.jsonl", "user")
    items = read_profiles(root / "profiles" / "items.jsonl", "item")
    got = client.get("/users/3/profile").json()
    assert got == {"id": "3", "kind": "user", "profile": users["3"], "source": "run"}
    got = client.get("/items/10/profile").json()
    assert got == {"id": "10", "kind": "item", "profile": items["10"], "source": "run"}
    missing = client.get(f"/users/{info['missing_user']}/profile")
    assert missing.status_code == 404 and "has no profile" in missing.json()["detail"]
    assert "unknown user id" in client.get("/users/nobody/profile").json()["detail"]
    assert client.get("/items/nothing/profile").status_code == 404


def test_bad_input_gets_clear_errors_and_the_server_carries_on(lightgcn_server):
    client = lightgcn_server.client
    cases = [
        ("GET", "/users/nobody/recommendations", None, 404, "unknown user id 'nobody'"),
        ("GET", "/users/1/recommendations?k=0", None, 422, "greater than or equal to 1"),
        ("GET", "/users/1/recommendations?k=1001", None, 422, "less than or equal to 1000"),
        ("GET", "/users/1/recommendations?k=many", None, 422, "valid integer"),
        ("GET", f"/users/{'x' * 5000}/recommendations", None, 404, "unknown user id"),
        ("POST", "/recommendations", {}, 422, "Field required"),
        ("POST", "/recommendations", {"items": []}, 422, "at least 1 item"),
        ("POST", "/recommendations", {"items": [str(i) for i in range(501)]}, 422, "at most 500 items"),
        ("POST", "/recommendations", {"items": ["1", "no-such-item"]}, 404, "'no-such-item'"),
        ("POST", "/recommendations", {"items": ["1"], "k": 5000}, 422, "less than or equal to 1000"),
        ("POST", "/recommendations", {"items": ["1"], "kk": 5}, 422, "Extra inputs are not permitted"),
        ("POST", "/recommendations", {"items": "1"}, 422, "valid list"),
        ("POST", "/items", {"title": "no fields key"}, 422, "Field required"),
        ("POST", "/items", {"fields": {"title": "x", "plot": "y"}}, 422, "unknown item fields ['plot']"),
        ("POST", "/items", {"fields": {"title": "  ", "genres": ""}}, 422, "needs text in at least one field"),
        ("POST", "/items", {"id": "a/b", "fields": {"title": "x"}}, 422, "should match pattern"),
        ("POST", "/items", {"id": "1", "fields": {"title": "x"}}, 409, "item id '1' already exists"),
        ("POST", "/items", {"fields": {"title": "x" * 2001}}, 422, "at most 2000 characters"),
        ("POST", "/items", {"fields": {"title": 5}}, 422, "valid string"),
        ("GET", "/no/such/route", None, 404, "Not Found"),
    ]
    for method, path, body, status, message in cases:
        response = client.request(method, path, json=body)
        assert response.status_code == status, (path, body, response.text)
        assert message in str(response.json()["detail"]), (path, body, response.text)
    broken = client.post("/recommendations", content=b"{not json", headers={"content-type": "application/json"})
    assert broken.status_code == 422 and broken.json()["detail"]
    assert client.get("/health").json()["status"] == "ok"


def test_new_user_profile_is_written_then_cached(lightgcn_server, served_run):
    client = lightgcn_server.client
    data = served_run[1]["data"]
    horror = [data.item_ids[i] for i, g in enumerate(data.item_fields["genres"]) if g == "Horror"][:5]
    request = {"items": horror + [horror[0]], "k": 8}
    first = client.post("/recommendations", json=request)
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["profile_status"] == "generated" and isinstance(body["profile"], str)
    assert body["user"] is None and len(body["items"]) == 8
    assert not {r["id"] for r in body["items"]} & set(horror)
    again = client.post("/recommendations", json=request).json()
    assert again["profile_status"] == "cached" and again["profile"] == body["profile"]
    assert [(r["id"], round(r["score"], 5)) for r in again["items"]] == [
        (r["id"], round(r["score"], 5)) for r in body["items"]
    ]
    with_history = client.post("/recommendations", json={**request, "exclude_history": False}).json()
    assert with_history["profile_status"] == "cached" and len(with_history["items"]) == 8


def test_a_new_item_reaches_a_users_top_k(lightgcn_server, served_run, ranking):
    """A new item with the text and profile of a zero-shot item gets that item's score for every user (a new
    item is encoded exactly as the model encodes items it never trained on), so it enters the same top-k."""
    client = lightgcn_server.client
    root, info = served_run
    data, split = info["data"], info["split"]
    zero_shot = {data.item_ids[i] for i in split.zero_shot_items}
    best = None
    for user in data.user_ids:
        ids, _ = ranking(LIGHTGCN, user)
        for rank, item in enumerate(ids):
            if item in zero_shot:
                best = min(best or (rank, user, item), (rank, user, item))
                break
    rank, user, item = best
    assert rank < 8, best
    z = data.item_ids.index(item)
    fields = {name: str(values[z]) for name, values in data.item_fields.items()}
    profile = read_profiles(root / "profiles" / "items.jsonl", "item")[item]
    added = client.post("/items", json={"id": f"copy-of-{item}", "fields": fields, "profile": profile})
    assert added.status_code == 201, added.text
    assert added.json()["profile_status"] == "given" and added.json()["text"] == data.item_text(z)
    top = client.get(f"/users/{user}/recommendations", params={"k": 10}).json()["items"]
    scores = {r["id"]: r["score"] for r in top}
    assert f"copy-of-{item}" in scores and item in scores
    assert abs(scores[f"copy-of-{item}"] - scores[item]) < 1e-4
    profile_back = client.get(f"/items/copy-of-{item}/profile").json()
    assert profile_back == {"id": f"copy-of-{item}", "kind": "item", "profile": profile, "source": "given"}
    again = client.post("/items", json={"id": f"copy-of-{item}", "fields": fields})
    assert again.status_code == 409

    written = client.post("/items", json={"fields": {"title": "A brand new western", "genres": "Western"}})
    assert written.status_code == 201, written.text
    new = written.json()
    assert new["id"].startswith("new-") and new["profile_status"] == "generated"
    assert new["text"] == "title: A brand new western; genres: Western"
    stored = client.get(f"/items/{new['id']}/profile")
    if new["profile"]:
        assert stored.json()["profile"] == new["profile"] and stored.json()["source"] == "generated"
    else:  # the random tiny writer may end its line at once
        assert stored.status_code == 404
    everyone = client.get(f"/users/{user}/recommendations", params={"k": 1000}).json()["items"]
    assert new["id"] in {r["id"] for r in everyone}
    cold = client.post("/recommendations", json={"items": [new["id"], f"copy-of-{item}"], "k": 5})
    assert cold.status_code == 200 and not {r["id"] for r in cold.json()["items"]} & {new["id"], f"copy-of-{item}"}


def test_concurrent_requests_all_succeed_and_agree(lightgcn_server, served_run, ranking):
    client = lightgcn_server.client
    data = served_run[1]["data"]
    base_ids = set(data.item_ids)
    before = client.get("/health").json()
    users = [str(u) for u in range(1, 11)]
    jobs = [("GET", f"/users/{u}/recommendations?k=10", None) for u in users]
    jobs += [("POST", "/recommendations", {"items": [str(i), str(i + 4), str(i + 8)], "k": 10}) for i in range(1, 6)]
    jobs += [("POST", "/items", {"id": f"burst-{n}", "fields": {"title": f"Burst film {n}"}}) for n in range(5)]

    def call(job):
        method, path, body = job
        with httpx.Client(base_url=lightgcn_server.url, timeout=120) as own:
            return job, own.request(method, path, json=body)

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(call, jobs))
    assert all(r.status_code in (200, 201) for _, r in results), [r.text for _, r in results if r.status_code > 201]

    after = client.get("/health").json()
    assert after["added_items"] == before["added_items"] + 5 and after["items"] == before["items"] + 5
    assert after["profiles"]["writer"]["largest_batch"] >= 2  # concurrent profile requests shared a batch
    for n in range(5):
        assert client.get(f"/items/burst-{n}/profile").status_code in (200, 404)
    for (method, path, _), response in results:
        if method != "GET":
            continue
        user = path.split("/")[2]
        got_ids, got_scores = base_part(response.json()["items"], base_ids)
        expected_ids, expected_scores = ranking(LIGHTGCN, user)
        assert got_ids == expected_ids[: len(got_ids)]  # the same ranking, with some added items mixed in
        np.testing.assert_allclose(got_scores, expected_scores[: len(got_ids)], rtol=1e-4, atol=1e-4)
    same = [r.json() for job, r in results if job[1] == "/recommendations"]
    assert all(body["profile_status"] in ("generated", "cached") for body in same)
