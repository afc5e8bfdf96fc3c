"""The server as an attacker or an unlucky operator meets it (issue 21): the API key and the trusted-host check,
bounds on what clients can store, the body size limit, errors that echo nothing, every error status over real
HTTP with the server answering afterwards, two servers on one run, and the shared embedding cache under a
second process's long write. Real engines over a copy of the tiny run, real uvicorn servers or the app."""

from __future__ import annotations

import json
import logging
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from reclm.serve import Recommender, ServeOptions, create_app
from reclm.serve.security import AccessPolicy

LIGHTGCN = "cf/lightgcn-text+profiles-s2020"
REPO = Path(__file__).resolve().parents[2]
KEY = "k3y-for-the-tests-0123456789"
NO_KEY = AccessPolicy()  # a loopback server without a key


def client_of(app, url: str = "http://127.0.0.1", **headers: str) -> TestClient:
    return TestClient(app, base_url=url, raise_server_exceptions=False, headers=headers)


def engine(run: Path, **options) -> Recommender:
    options = {"model": LIGHTGCN, "profile_backend": "none", "threads": 1, **options}
    return Recommender(run, ServeOptions(**options))


@pytest.fixture
def open_engine():
    """``open_engine(run, **options) -> Recommender``, closed at the end of the test (after the servers)."""
    opened: list[Recommender] = []

    def make(run: Path, **options) -> Recommender:
        opened.append(engine(run, **options))
        return opened[-1]

    yield make
    for served in opened:
        served.close()


def item(title: str, **extra) -> dict:
    profile = "User identity: drama fans; User interests: Drama."
    return {"fields": {"title": title, "genres": "Drama"}, "profile": profile, **extra}


# ---------------------------------------------------------------- item 8: key, hosts, bounds


def test_a_non_loopback_bind_needs_a_key():
    with pytest.raises(ValueError, match=r"--host 0\.0\.0\.0 is not loopback: set an API key in \$RECLM_API_KEY"):
        AccessPolicy.for_bind("0.0.0.0", environ={})
    with pytest.raises(ValueError, match=r"\$MY_KEY is too short"):
        AccessPolicy.for_bind("10.1.2.3", key_env="MY_KEY", environ={"MY_KEY": "short"})
    policy = AccessPolicy.for_bind("10.1.2.3", "MY_KEY", ["Recs.Example"], environ={"MY_KEY": KEY})
    assert policy.api_key == KEY and {"10.1.2.3", "recs.example", "localhost"} <= policy.allowed_hosts
    assert AccessPolicy.for_bind("127.0.0.1", environ={}).api_key is None  # optional on loopback
    assert "0.0.0.0" not in AccessPolicy.for_bind("0.0.0.0", environ={"RECLM_API_KEY": KEY}).allowed_hosts


def test_writes_need_the_key_and_the_host_must_be_trusted(run_copy, open_engine, live_server):
    policy = AccessPolicy.for_bind("127.0.0.1", environ={"RECLM_API_KEY": KEY}, allowed_hosts=["recs.example"])
    server = live_server(create_app(open_engine(run_copy()), policy=policy))
    client = server.client
    cases = [
        ({}, 401),
        ({"X-API-Key": "wrong-key-0123456789"}, 401),
        ({"Authorization": f"Basic {KEY}"}, 401),
        ({"X-API-Key": KEY[:-1]}, 401),
        ({"X-API-Key": KEY}, 201),
        ({"Authorization": f"Bearer {KEY}"}, 201),
    ]
    for n, (headers, status) in enumerate(cases):
        response = client.post("/items", json=item(f"Keyed {n}"), headers=headers)
        assert response.status_code == status, (headers, response.text)
        if status == 401:
            assert "API key" in response.json()["detail"] and response.headers["www-authenticate"] == "Bearer"
    no_key = client.post("/recommendations", json={"items": ["1", "2"], "k": 3})
    assert no_key.status_code == 401
    assert client.post("/recommendations", json={"items": ["1"]}, headers={"X-API-Key": KEY}).status_code == 200
    assert client.get("/users/1/recommendations?k=3").status_code == 200  # reads need no key

    for host in ("evil.example", "evil.example:80", "localhost.evil.example", "127.0.0.1.nip.io", ""):
        rebound = client.get("/users/1/recommendations", headers={"Host": host})
        assert rebound.status_code == 400 and "Host header not allowed" in rebound.json()["detail"], host
    for host in ("localhost", f"localhost:{server.port}", f"127.0.0.1:{server.port}", "RECS.example:443"):
        assert client.get("/health", headers={"Host": host}).status_code == 200, host
    assert "openapi" in client.get("/openapi.json").text  # the key is documented in /docs
    assert "X-API-Key" in json.dumps(client.get("/openapi.json").json()["components"]["securitySchemes"])


def test_a_keyless_server_takes_writes_from_loopback_only(run_copy, open_engine):
    """A server started without a key (however it was bound) refuses writes arriving on a non-loopback
    address; the address the connection arrived on is a trusted Host name (clients that use the IP)."""
    app = create_app(open_engine(run_copy()), policy=NO_KEY)
    remote = client_of(app, "http://192.0.2.10:8000")
    refused = remote.post("/items", json=item("From afar"))
    assert refused.status_code == 403 and "need an API key" in refused.json()["detail"]
    assert remote.post("/recommendations", json={"items": ["1"]}).status_code == 403
    assert remote.get("/users/1/recommendations?k=2").status_code == 200
    assert client_of(app).post("/items", json=item("From here")).status_code == 201


def test_what_clients_can_store_is_bounded(run_copy, open_engine, tiny_lm):
    run = run_copy()
    options = {"max_added_items": 2, "max_stored_profiles": 1, "batch_wait_ms": 0}
    client = client_of(create_app(open_engine(run, profile_backend="transformers", **options), policy=NO_KEY))
    assert client.post("/items", json=item("First")).status_code == 201
    assert client.post("/items", json=item("Second", id="second")).status_code == 201
    for body in (item("Third"), item("Third", id="third"), {"fields": {"title": "Written"}}):
        full = client.post("/items", json=body)
        assert full.status_code == 403 and "most items clients may add (2)" in full.json()["detail"], full.text
    limits = client.get("/health").json()["limits"]
    assert limits == {"k": 1000, "history": 500, "added_items": 2, "stored_profiles": 1}

    histories = (["1", "2"], ["3", "4"], ["5", "6"], ["1", "2"], ["3", "4"])
    statuses = [client.post("/recommendations", json={"items": h, "k": 3}).json()["profile_status"] for h in histories]
    assert statuses == ["generated", "generated", "generated", "cached", "generated"]  # only the first is kept
    with sqlite3.connect(run / "serve.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM serve_users").fetchone()[0] == 1
        assert db.execute("SELECT COUNT(*) FROM gen").fetchone()[0] == 1
        assert db.execute("SELECT COUNT(*) FROM serve_items").fetchone()[0] == 2


# ---------------------------------------------------------------- items 10, 12, 13: bodies and error replies


def test_bodies_over_the_limit_get_413_and_errors_echo_nothing(run_copy, open_engine, live_server):
    server = live_server(create_app(open_engine(run_copy()), policy=AccessPolicy(max_body_bytes=4096)))
    client, as_json = server.client, {"content-type": "application/json"}
    big = client.post("/items", json=item("x" * 5000))
    assert big.status_code == 413 and big.json() == {"detail": "request body over 4096 bytes"}
    chunks = (b" " * 1000 for _ in range(10))  # no Content-Length: the limit counts what arrives
    chunked = client.post("/recommendations", content=chunks, headers=as_json)
    assert chunked.status_code == 413 and chunked.json()["detail"] == "request body over 4096 bytes"
    small = client.post("/recommendations", content=iter([b'{"items": ', b'["1", "2"], "k": 2}']), headers=as_json)
    assert small.status_code == 200 and len(small.json()["items"]) == 2

    secret = "SECRET-9f8e7d"
    for body in (
        {"id": f"a/{secret}", "fields": {"title": "x"}},
        {"fields": {"title": [secret]}},
        {"items": [secret * 30]},
        {"items": ["1"], "k": secret},
        {"items": ["1"], "exclude_history": {"a": secret}},
    ):
        response = client.post("/recommendations" if "items" in body else "/items", json=body)
        assert response.status_code == 422 and secret not in response.text, response.text
        assert all("input" not in error for error in response.json()["detail"])
    surrogates = b'{"items": ["1"], "\\ud800x": 1, "k": "\\udfff"}'  # lone surrogates: no UTF-8 form
    lone = client.post("/recommendations", content=surrogates, headers=as_json)
    assert lone.status_code == 422 and "input" not in lone.json()["detail"][0]
    long_key = client.post("/items", json={"fields": {"t" * 3000: "x"}, "p" * 1000: 1})  # named, cut short
    assert long_key.status_code == 422 and len(long_key.content) < 600, long_key.text
    assert {"type": "extra_forbidden", "loc": ["body", "p" * 100 + "..."]} in [
        {k: e[k] for k in ("type", "loc")} for e in long_key.json()["detail"]
    ]
    assert client.get("/health").status_code == 200


@pytest.fixture(scope="module")
def non_finite_client(served_run, cache_dir, tmp_path_factory):
    import shutil

    run = tmp_path_factory.mktemp("non-finite") / "run"
    shutil.copytree(served_run[0], run, ignore=shutil.ignore_patterns("serve.sqlite*"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RECLM_CACHE", str(cache_dir))
        served = engine(run)
        yield client_of(create_app(served, policy=NO_KEY))
        served.close()


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("/recommendations", '{"items": ["1", "2"], "k": NaN}'),
        ("/recommendations", '{"items": ["1"], "k": Infinity}'),
        ("/recommendations", '{"items": [NaN], "k": 3}'),
        ("/recommendations", '{"items": ["1"], "exclude_history": -Infinity}'),
        ("/items", '{"fields": {"title": NaN}}'),
        ("/items", '{"id": Infinity, "fields": {"title": "x"}}'),
        ("/items", '{"fields": {"title": "x"}, "profile": NaN}'),
        ("/items", "NaN"),
    ],
)
def test_nan_and_infinity_are_422_not_500(non_finite_client, path, raw):
    response = non_finite_client.post(path, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["detail"] and "NaN" not in response.text and "Infinity" not in response.text


# ---------------------------------------------------------------- item 23 (and 12): every error status over HTTP


def train_id_only_model(run: Path) -> str:
    """A BiasMF with ID embeddings only (feature mode none) in the run: it cannot take new items."""
    from reclm.cf.config import CFConfig
    from reclm.cf.trainer import train_cf
    from reclm.rundir import RunDir

    rundir = RunDir(run)
    data, split = rundir.load()
    config = CFConfig(
        backbone="bias-mf", features="none", dim=8, lr=0.01, batch_size=256, epochs=2, patience=100,
        eval_every=1, device="cpu", threads=1, seed=2020,
    )  # fmt: skip
    train_cf(split, config, None, rundir.cf / config.run_name(), show_progress=False, user_ids=data.user_ids)
    return f"cf/{config.run_name()}"


def test_every_error_status_over_http_and_the_server_carries_on(run_copy, open_engine, live_server, tiny_lm, caplog):
    """400 (a Host not allowed; new items for an ID-only model), 503 (the writer's queue full), 504 (a profile
    past its limit), 500 (serve.sqlite broken under the server): each a JSON body, each followed by a normal
    answer. /health shows no absolute path."""
    run = run_copy()
    id_only = train_id_only_model(run)
    slow = open_engine(run, profile_backend="transformers", batch_wait_ms=4000, max_pending=1, profile_timeout=0.5)
    client = live_server(create_app(slow, policy=NO_KEY)).client
    other = live_server(create_app(open_engine(run, model=id_only), policy=NO_KEY)).client

    def carries_on(client: httpx.Client = client) -> None:
        answer = client.get("/users/1/recommendations", params={"k": 3})
        assert answer.status_code == 200 and len(answer.json()["items"]) == 3

    def error(response: httpx.Response, status: int, message: str) -> None:
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == "application/json" and message in response.json()["detail"]

    error(client.get("/health", headers={"Host": "rebind.example"}), 400, "Host header not allowed")
    carries_on()
    error(other.post("/items", json=item("Not for ID models")), 400, "only item ID embeddings")
    carries_on(other)

    started = time.monotonic()
    error(client.post("/recommendations", json={"items": ["1", "2", "3"]}), 504, "more than 0.5 s")
    error(client.post("/recommendations", json={"items": ["4", "5", "6"]}), 503, "the profile writer is busy")
    assert time.monotonic() - started < 4, "the batching window closed before the 503 was reached"
    carries_on()
    while client.get("/health").json()["profiles"]["writer"]["pending"]:
        time.sleep(0.1)
    slow.options.profile_timeout, slow.writer.batcher.max_wait = 60.0, 0.0  # the writer is fine again
    written = client.post("/recommendations", json={"items": ["4", "5", "6"], "k": 2})
    assert written.status_code == 200 and written.json()["profile_status"] == "generated"

    with sqlite3.connect(run / "serve.sqlite") as db:
        db.execute("DROP TABLE serve_items")
    with caplog.at_level(logging.ERROR, logger="reclm.serve"):
        broken = client.post("/items", json=item("Into a broken store"))
    error(broken, 500, "internal error (reference ")
    assert "no such table" not in broken.text and "OperationalError" not in broken.text
    reference = broken.json()["detail"].split("reference ")[1].split(";")[0]
    logged = [r for r in caplog.records if reference in r.getMessage()]
    assert logged and "no such table" in str(logged[0].exc_info[1])
    carries_on()

    health = client.get("/health").json()
    assert health["run"] == run.name and health["profiles"]["adapters"]["user"] == "sft/adapter"
    assert str(run.parent) not in json.dumps(health)
    missing = client.get(f"/users/{slow.data.user_ids[-1]}/profile").json()["detail"]
    assert "(profiles/users.jsonl)" in missing and str(run) not in missing


# ---------------------------------------------------------------- item 17: two servers, one run


def test_two_servers_on_one_run_never_hand_out_the_same_new_id(run_copy, open_engine):
    run = run_copy()
    clients = [client_of(create_app(open_engine(run), policy=NO_KEY)) for _ in range(2)]
    ids = []
    for n in range(6):
        response = clients[n % 2].post("/items", json=item(f"Shared run {n}"))
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    assert len(set(ids)) == 6 and all(i.startswith("new-") for i in ids), ids
    assert clients[1].post("/items", json=item("Same id", id=ids[0])).status_code == 409  # the other's item
    restarted = open_engine(run)
    assert set(ids) <= set(restarted.item_ids[restarted.n_base :])


# ---------------------------------------------------------------- item 16: the shared embedding cache

HOLDER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
db.execute("INSERT OR REPLACE INTO emb VALUES ('m', 'held', x'0000803f')")
print("holding", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("COMMIT")
"""

WRITER = """
import sys
import numpy as np
from reclm.text.encoder import EmbeddingCache
cache = EmbeddingCache(__import__("pathlib").Path(sys.argv[1]))
for n in range(40):
    cache.put("m", [f"{sys.argv[2]}-{n}"], np.full((1, 4), n, np.float32))
    assert len(cache.get("m", [f"{sys.argv[2]}-{n}"])) == 1
print("wrote", flush=True)
"""


def test_the_embedding_cache_is_shared_with_a_long_writer(tmp_path):
    """Another process (``reclm run`` encoding a catalog) holds the write lock for 6 s, longer than SQLite's
    default 5 s timeout: reads go on at once (WAL) and other writers, here and in a third process, wait."""
    from reclm.text.encoder import EmbeddingCache

    path = tmp_path / "text.sqlite"
    cache = EmbeddingCache(path)
    cache.put("m", ["before"], np.ones((1, 4), np.float32))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), "6"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        started = time.monotonic()
        assert set(cache.get("m", ["before", "held"])) == {"before"}  # the other's write is not committed yet
        assert time.monotonic() - started < 2
        command = [sys.executable, "-c", WRITER, str(path), "other"]
        writer = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO)
        for n in range(10):
            cache.put("m", [f"here-{n}"], np.full((1, 4), n, np.float32))
        assert time.monotonic() - started > 4  # the first put waited for the holder's commit
        assert writer.wait(120) == 0 and writer.stdout.read().strip() == "wrote"
        assert holder.wait(30) == 0
    finally:
        holder.kill()
    keys = ["before", "held"] + [f"here-{n}" for n in range(10)] + [f"other-{n}" for n in range(40)]
    assert set(cache.get("m", keys)) == set(keys)
    assert cache.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
