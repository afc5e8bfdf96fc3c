"""The openai backend against real OpenAI-compatible HTTP servers on loopback (FastAPI + uvicorn) that serve
the tiny model through the transformers backend: one server, and several used as one (load spreading,
failover when one stops or fails, every one down)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from reclm.llm.generation import DecodeParams, GenerationCache, generate_texts, make_generator
from reclm.llm.generation.hf import TransformersGenerator
from reclm.llm.teachers.openai_compat import EndpointError


def chat_app(generator: TransformersGenerator) -> FastAPI:
    """``app.state.on_request(n)`` (optional) runs before the ``n``-th request (from 1) is answered; a status
    code it returns is answered instead."""
    app = FastAPI()
    app.state.requests = []
    app.state.rate_limit_next = 0
    app.state.on_request = None

    @app.post("/v1/chat/completions")
    async def complete(request: Request):
        body = await request.json()
        app.state.requests.append(body)
        if request.headers.get("authorization") != "Bearer sekrit":
            return JSONResponse({"error": "bad key"}, status_code=401)
        if app.state.on_request is not None and (status := app.state.on_request(len(app.state.requests))):
            return JSONResponse({"error": "scripted"}, status_code=status)
        if app.state.rate_limit_next > 0:
            app.state.rate_limit_next -= 1
            return JSONResponse({"error": "slow down"}, status_code=429, headers={"Retry-After": "0"})
        last = body["messages"][-1]["content"]
        if "BROKEN" in last:
            return JSONResponse({"error": "boom"}, status_code=500)
        params = DecodeParams(
            max_new_tokens=body["max_tokens"],
            temperature=body.get("temperature", 0.0),
            single_line="\n" in body.get("stop", []),
        )
        before_in, before_out = generator.prompt_tokens, generator.new_tokens
        # the messages already hold the system prompt: render them exactly as the local backend does
        text = generator.generate([body["messages"]], params)[0]
        usage = {
            "prompt_tokens": generator.prompt_tokens - before_in,
            "completion_tokens": generator.new_tokens - before_out,
        }
        message = {"role": "assistant", "content": text}
        return {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}], "usage": usage}

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(app: FastAPI) -> Iterator[tuple[str, uvicorn.Server]]:
    """``app`` on a free loopback port, in a thread: (base URL, server; ``should_exit = True`` stops it)."""
    port = free_port()
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not instance.started and time.time() < deadline:
        time.sleep(0.05)
    assert instance.started
    try:
        yield f"http://127.0.0.1:{port}/v1", instance
    finally:
        instance.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(tiny_model):
    generator = TransformersGenerator(tiny_model, batch_size=1, device="cpu")
    app = chat_app(generator)
    with serve(app) as (url, _):
        yield url, app, generator


@pytest.fixture(scope="module")
def second_server(tiny_model):
    """A replica: the same tiny model behind another port (its own generator, as a second machine would)."""
    app = chat_app(TransformersGenerator(tiny_model, batch_size=1, device="cpu"))
    with serve(app) as (url, instance):
        yield url, app, instance


def test_openai_backend_matches_the_local_model(server, prompts, monkeypatch, tmp_path):
    url, app, local = server
    monkeypatch.setenv("RECLM_TEST_KEY", "sekrit")
    remote = make_generator(
        "openai", "tiny", base_url=url, api_key_env="RECLM_TEST_KEY", concurrency=3, fingerprint="tiny-random"
    )
    params = DecodeParams(max_new_tokens=8)
    expected = local.generate(prompts, params)
    app.state.requests.clear()
    assert remote.generate(prompts, params) == expected
    sent = app.state.requests[0]
    assert sent["model"] == "tiny" and sent["max_tokens"] == 8 and sent["stop"] == ["\n"]
    assert sent["messages"][0]["role"] == "system"
    assert remote.new_tokens > 0 and remote.ledger.answered == len(prompts)

    # through the runner: cached by endpoint + model + what it serves, so a second run sends no request
    cache = GenerationCache(tmp_path / "gen.sqlite")
    generate_texts(remote, prompts, params, cache, progress=False)
    app.state.requests.clear()
    texts, stats = generate_texts(remote, prompts, params, cache, progress=False)
    assert texts == expected and stats.generated == 0 and app.state.requests == []


def test_retries_rate_limits_and_reports_failures(server, monkeypatch, tmp_path):
    url, app, _ = server
    monkeypatch.setenv("RECLM_TEST_KEY", "sekrit")
    options = {"api_key_env": "RECLM_TEST_KEY", "max_retries": 2, "backoff": 0.01, "fingerprint": "tiny-random"}
    remote = make_generator("openai", "tiny", base_url=url, **options)
    app.state.rate_limit_next = 2
    out = remote.generate(["History: A.", "BROKEN prompt"], DecodeParams(max_new_tokens=4))
    assert out[0] and out[1] is None  # 429s were retried; the 500s gave up after the retries
    ledger = remote.ledger
    assert ledger.errors["429"] == 2 and ledger.retries == ledger.requests - 2 and remote.failed == 1

    cache = GenerationCache(tmp_path / "gen.sqlite")
    texts, stats = generate_texts(remote, ["BROKEN again", "History: B."], DecodeParams(max_new_tokens=4), cache,
                                  progress=False)  # fmt: skip
    assert texts[0] is None and stats.failed == 1 and stats.generated == 1
    assert cache.count(remote.identity) == 1  # the failure is not cached: a later run asks again

    monkeypatch.delenv("RECLM_TEST_KEY")
    with pytest.raises(EndpointError, match="401"):
        remote.generate(["History: C."], DecodeParams(max_new_tokens=4))


# ---------------------------------------------------------------- several servers used as one

MANY = [f"Movies watched: {g} film {k}. Write the profile." for k in range(4) for g in ("Action", "Drama", "Comedy")]
PARAMS = DecodeParams(max_new_tokens=6)


def several(urls: list[str], **options) -> object:
    defaults = {"api_key_env": "RECLM_TEST_KEY", "fingerprint": "tiny-random", "max_retries": 0, "backoff": 0.01}
    return make_generator("openai", "tiny", base_url=urls, **{**defaults, **options})


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("RECLM_TEST_KEY", "sekrit")


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there: connections are refused


def test_two_servers_share_one_generation(server, second_server, key, tmp_path):
    (url_a, app_a, local), (url_b, app_b, _) = server, second_server
    app_a.state.requests.clear()
    app_b.state.requests.clear()
    expected = local.generate(MANY, PARAMS)
    remote = several([url_a, url_b], concurrency=2)
    assert remote.generate(MANY, PARAMS) == expected  # the same answers as one server's
    a, b = len(app_a.state.requests), len(app_b.state.requests)
    assert a + b == len(MANY) and a >= 3 and b >= 3  # both served a share
    assert [r.answered for r in remote.replicas] == [a, b] and remote.ledger.answered == len(MANY)

    # the cache key names the served model, not the servers: one server finds what two generated
    one = several(url_b)
    assert one.identity == remote.identity == several([url_b, url_a]).identity
    cache = GenerationCache(tmp_path / "gen.sqlite")
    generate_texts(remote, MANY, PARAMS, cache, progress=False)
    app_b.state.requests.clear()
    texts, stats = generate_texts(one, MANY, PARAMS, cache, progress=False)
    assert texts == expected and stats.cached == len(MANY) and app_b.state.requests == []
    cache.close()


def test_a_server_stopped_mid_run_loses_nothing(tiny_model, server, key):
    url_b, app_b, local = server
    expected = local.generate(MANY, PARAMS)
    app_a = chat_app(TransformersGenerator(tiny_model, batch_size=1, device="cpu"))
    with serve(app_a) as (url_a, instance):

        def stop_after_three(n: int) -> None:
            if n == 3:  # answers this one, then is gone: uvicorn's shutdown, at once (here, on its loop)
                for listening in instance.servers:
                    listening.close()
                for connection in list(instance.server_state.connections):
                    connection.shutdown()  # this request's connection closes once it is answered
                instance.should_exit = True

        app_a.state.on_request = stop_after_three
        remote = several([url_a, url_b], concurrency=1, max_retries=3, cooldown=60)
        assert remote.generate(MANY, PARAMS) == expected  # nothing lost: B answered the rest
        down, up = remote.replicas
        assert down.answered == 3 and up.answered == len(MANY) - 3
        # one request found A gone (refused or dropped); A was left out from then on, nothing retried on it
        assert down.downs == 1 and down.sent == down.answered + 1 and up.downs == 0
        connection_errors = {k: v for k, v in remote.ledger.errors.items() if k != "429"}
        assert sum(connection_errors.values()) == 1 and remote.ledger.retries == 0 and remote.failed == 0
        more = [f"Movies watched: Western film {k}." for k in range(4)]
        assert remote.generate(more, PARAMS) == local.generate(more, PARAMS)
        assert down.sent == down.answered + 1  # still in its cool-down: not asked again


def test_a_failing_server_is_left_out_for_its_cooldown(tiny_model, server, key):
    url_b, app_b, local = server
    app_a = chat_app(TransformersGenerator(tiny_model, batch_size=1, device="cpu"))
    arrived: list[float] = []

    def fail_third_and_its_retry(n: int) -> int | None:
        arrived.append(time.monotonic())
        return 503 if n in (3, 4) else None

    app_a.state.on_request = fail_third_and_its_retry
    with serve(app_a) as (url_a, _):
        remote = several([url_a, url_b], concurrency=1, max_retries=1, cooldown=0.5)
        assert remote.generate(MANY, PARAMS) == local.generate(MANY, PARAMS)  # the failed prompt went to B
        assert remote.replicas[0].downs == 1 and remote.ledger.errors == {"503": 2} and remote.failed == 0
        # after its retry failed too, A was asked nothing for its cool-down
        assert all(t - arrived[3] >= 0.5 for t in arrived[4:])

        time.sleep(max(0.0, arrived[3] + 0.6 - time.monotonic()))  # A is back: it takes its share again
        before = len(arrived)
        more = [f"Movies watched: Horror film {k}." for k in range(6)]
        assert remote.generate(more, PARAMS) == local.generate(more, PARAMS)
        assert len(arrived) - before >= 2


def test_every_server_down_gives_nones_that_are_asked_again(key, tmp_path):
    remote = several([dead_url(), dead_url()], max_retries=5, backoff=1.0, cooldown=60)
    started = time.perf_counter()
    assert remote.generate(["History: A.", "History: B.", "History: C."], PARAMS) == [None] * 3
    assert time.perf_counter() - started < 2  # no backoff on a refused connection: the next server is asked
    assert [r.downs for r in remote.replicas] == [1, 1] and remote.failed == 3
    requests = remote.ledger.requests
    cache = GenerationCache(tmp_path / "gen.sqlite")
    texts, stats = generate_texts(remote, ["History: D."], PARAMS, cache, progress=False)
    assert texts == [None] and stats.failed == 1 and cache.count(remote.identity) == 0  # a rerun asks again
    assert remote.ledger.requests == requests  # both still cooling down: nothing was sent
    cache.close()


def test_a_key_goes_in_clear_to_no_listed_server(monkeypatch, server):
    monkeypatch.setenv("RECLM_TEST_KEY", "sekrit")
    url = server[0]
    with pytest.raises(EndpointError, match=r"in clear over http:// to gpu-box\.lan"):
        several([url, "http://gpu-box.lan:8000/v1"])
    assert several([url, "https://gpu-box.lan/v1", "http://localhost:9/v1"]).endpoint.headers()
    assert several([url, "http://gpu-box.lan:8000/v1"], api_key_env=None).endpoint.headers() == {}
    for bad, error in (([], "empty"), ([url, url + "/"], "twice"), ([url, "gpu-box:8000/v1"], "http")):
        with pytest.raises(ValueError, match=error):
            several(bad)


def test_the_config_and_the_cli_take_one_url_or_a_list(tmp_path):
    from reclm.cli.writer import split_urls
    from reclm.llm import generation
    from reclm.pipeline.config import ConfigError, validate_config
    from reclm.pipeline.stages.generation import make_generator as stage_generator

    a, b = "http://127.0.0.1:8001/v1", "http://127.0.0.1:8002/v1"
    base = {"stages": {"teacher": "offline"}}

    def config(base_url: object):
        return validate_config({**base, "generation": {"backend": "openai", "base_url": base_url, "api_key_env": None}})

    one, two = config(a), config([a, b])
    assert one.generation.base_url == a and two.generation.base_url == [a, b]
    for bad in ([], [a, a], ["ftp://x/v1"], "127.0.0.1:8000"):
        with pytest.raises(ConfigError, match="base_url"):
            config(bad)
    adapter = tmp_path / "adapter"  # what the servers have loaded: only its files' hash matters here
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    single, pair = (stage_generator(generation, c, adapter) for c in (one, two))
    assert single.endpoint.urls == [a] and pair.endpoint.urls == [a, b]
    assert single.identity == pair.identity  # a second replica of the same served adapter keeps the cache
    assert split_urls(f"{a}, {b}") == [a, b] and split_urls(a) == a
    slow = validate_config({**base, "generation": {"backend": "openai", "base_url": [a, b], "cooldown": 120}})
    assert stage_generator(generation, slow, adapter).endpoint.cooldown == 120 and pair.endpoint.cooldown == 30
    with pytest.raises(ConfigError, match="cooldown"):
        validate_config({**base, "generation": {"cooldown": -1}})


@pytest.mark.parametrize("stage", ["profiles", "rl"])
def test_the_stage_keys_leave_out_where_the_servers_are(stage):
    """More replicas, a moved server, another concurrency or cooldown: the same profiles (and the same RL
    adapter), the same stage key; what is asked of the model (here its length) changes it."""
    from reclm.pipeline.config import validate_config
    from reclm.pipeline.table import STAGES

    (table_entry,) = [s for s in STAGES if s.name == stage]

    def key(**generation):
        return table_entry.config(validate_config({"generation": {"backend": "openai", **generation}}))

    one = key(base_url="http://127.0.0.1:8001/v1")
    moved = key(base_url=["http://127.0.0.1:8002/v1", "http://127.0.0.1:8003/v1"], concurrency=32, cooldown=5)
    assert one == moved
    assert key(base_url="http://127.0.0.1:8001/v1", max_new_tokens=64) != one
