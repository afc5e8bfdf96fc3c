"""The openai backend against a real OpenAI-compatible HTTP server on loopback (FastAPI + uvicorn) that serves
the tiny model through the transformers backend."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from reclm.llm.generation import DecodeParams, GenerationCache, generate_texts, make_generator
from reclm.llm.generation.hf import TransformersGenerator
from reclm.llm.teachers.openai_compat import EndpointError


def chat_app(generator: TransformersGenerator) -> FastAPI:
    app = FastAPI()
    app.state.requests = []
    app.state.rate_limit_next = 0

    @app.post("/v1/chat/completions")
    async def complete(request: Request):
        body = await request.json()
        app.state.requests.append(body)
        if request.headers.get("authorization") != "Bearer sekrit":
            return JSONResponse({"error": "bad key"}, status_code=401)
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


@pytest.fixture(scope="module")
def server(tiny_model):
    generator = TransformersGenerator(tiny_model, batch_size=1, device="cpu")
    app = chat_app(generator)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not instance.started and time.time() < deadline:
        time.sleep(0.05)
    assert instance.started
    yield f"http://127.0.0.1:{port}/v1", app, generator
    instance.should_exit = True
    thread.join(timeout=10)


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
