"""The openai teacher against a real HTTP server on loopback speaking the chat-completions protocol."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from reclm.llm.prompts import format_profile, item_train_users, user_prompts
from reclm.llm.records import read_records
from reclm.llm.teachers import EndpointConfig, EndpointError, Ledger, OpenAITeacher
from reclm.llm.teachers.openai_compat import retry_after_seconds

KEY_ENV = "RECLM_TEST_TEACHER_KEY"
COMPLETION_TOKENS = 5


class ChatServer:
    """``POST /v1/chat/completions``. ``decide(n, prompt) -> (status, headers, delay)`` scripts each
    request (``n`` counts requests from 0); a 200 answers a profile derived from the prompt."""

    def __init__(self, decide):
        self.decide = decide
        self.lock = threading.Lock()
        self.log: list[dict] = []
        self.inflight = 0
        self.max_inflight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                with server.lock:
                    n = len(server.log)
                    entry = {"n": n, "start": time.monotonic(), "prompt": prompt, "body": body}
                    entry["auth"] = self.headers.get("Authorization")
                    server.log.append(entry)
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                try:
                    status, headers, delay = server.decide(n, prompt)
                    entry["status"] = status
                    time.sleep(delay)
                    if status == 200:
                        tokens = len(prompt.split())
                        payload = {
                            "id": f"chat-{n}",
                            "object": "chat.completion",
                            "model": body["model"],
                            "choices": [
                                {
                                    "index": 0,
                                    "message": {"role": "assistant", "content": answer_for(prompt)},
                                    "finish_reason": "stop",
                                }
                            ],
                            "usage": {
                                "prompt_tokens": tokens,
                                "completion_tokens": COMPLETION_TOKENS,
                                "total_tokens": tokens + COMPLETION_TOKENS,
                            },
                        }
                        entry["usage"] = payload["usage"]
                    else:
                        payload = {"error": {"message": f"scripted {status}"}}
                    data = json.dumps(payload).encode()
                    try:
                        self.send_response(status)
                        for key, value in headers.items():
                            self.send_header(key, value)
                        self.send_header("Content-Type", "application/json")
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        self.wfile.write(data)
                    except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                        entry["status"] = "abandoned"
                    entry["end"] = time.monotonic()
                finally:
                    with server.lock:
                        server.inflight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> ChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def answer_for(prompt: str) -> str:
    return format_profile([f"Reader {len(prompt)}"], ["Films", "Word count"])


def endpoint(server: ChatServer, **overrides) -> EndpointConfig:
    options = dict(
        base_url=server.base_url,
        model="teacher-test",
        api_key_env=KEY_ENV,
        concurrency=3,
        max_retries=4,
        backoff=0.01,
        timeout=1.0,
        price_in=0.5,
        price_out=1.5,
    )
    return EndpointConfig(**{**options, **overrides})


def test_retries_ledger_concurrency_and_resume(tiny, tmp_path, monkeypatch):
    data, split = tiny
    monkeypatch.setenv(KEY_ENV, "sk-test")
    poisoned = user_prompts(data, split, [5])[5]  # this prompt always gets a 400: that id fails

    def decide(n, prompt):
        if prompt == poisoned:
            return 400, {}, 0.0
        if n == 0:
            return 429, {"Retry-After": "1"}, 0.0
        if n == 1:
            return 200, {}, 2.0  # longer than the client timeout: retried
        if n == 2:
            return 200, {}, 0.3  # in flight while the 429 arrives
        if n % 4 == 3:
            return 500, {}, 0.0
        return 200, {}, 0.05

    with ChatServer(decide) as server:
        teacher = OpenAITeacher(endpoint(server), progress=False)
        report = teacher.run(data, split, tmp_path)
        time.sleep(0.2)
        log = list(server.log)
        max_inflight = server.max_inflight

        users = {r.id: r for r in read_records(tmp_path / "teacher" / "users.jsonl")}
        items = {r.id: r for r in read_records(tmp_path / "teacher" / "items.jsonl")}
        expected_users = user_prompts(data, split)
        assert set(users) == {data.user_ids[u] for u in expected_users if u != 5}
        for u, prompt in expected_users.items():
            if u != 5:
                record = users[data.user_ids[u]]
                assert record.prompt == prompt and record.profile == answer_for(prompt)
                assert record.extra["model"] == "teacher-test" and record.extra["format_ok"] is True
        with_train = [i for i, us in enumerate(item_train_users(split)) if len(us)]
        assert set(items) == {data.item_ids[i] for i in with_train}
        some_item = items[data.item_ids[with_train[0]]]
        assert "Profiles of users who interacted with it: [User identity: Reader" in some_item.prompt

        ledger = Ledger.load(tmp_path / "teacher" / "ledger.json")
        answered = [e for e in log if e.get("status") == 200 and "usage" in e and e["n"] != 1]
        assert ledger.requests == len(log)
        assert ledger.answered == len(users) + len(items) == len(answered)
        assert ledger.prompt_tokens == sum(e["usage"]["prompt_tokens"] for e in answered)
        assert ledger.completion_tokens == COMPLETION_TOKENS * len(answered)
        assert ledger.cost == pytest.approx(ledger.prompt_tokens / 1000 * 0.5 + ledger.completion_tokens / 1000 * 1.5)
        assert ledger.errors["429"] == 1 and ledger.errors["timeout"] == 1 and ledger.errors["400"] == 1
        assert ledger.errors["500"] == sum(e.get("status") == 500 for e in log) > 0
        assert ledger.failures == 1 and list(ledger.failed) == [f"user:{data.user_ids[5]}"]
        assert report.skipped == {
            "users failed after retries (asked again on the next run)": 1,
            "items without train interactions": data.n_items - len(with_train),
        }
        assert all(e["auth"] == "Bearer sk-test" for e in log)
        assert all(e["body"]["model"] == "teacher-test" and e["body"]["temperature"] == 0.0 for e in log)
        # at most 3 in flight (the request the client gave up on after its timeout still runs server-side)
        served = [e for e in log if e["n"] != 1]
        overlap = max(sum(o["start"] <= e["start"] < o["end"] for o in served) for e in served)
        assert 2 <= overlap <= 3 and max_inflight <= 4
        # after the 429 (Retry-After: 1) nobody asked again for a second (requests 1 and 2 were in flight)
        rate_limited = log[0]
        assert min(e["start"] for e in log[3:]) - rate_limited["end"] >= 0.95

        # resume: answered ids are never asked again; only the failed one is
        before = len(server.log)
        again = OpenAITeacher(endpoint(server), progress=False).run(data, split, tmp_path)
        new = server.log[before:]
        assert [e["prompt"] for e in new] == [poisoned]
        assert again.resumed == {"user": len(expected_users) - 1, "item": len(with_train)}
        assert again.written == {"user": 0, "item": 0}
        ledger = Ledger.load(tmp_path / "teacher" / "ledger.json")
        assert ledger.runs == 2 and ledger.requests == len(server.log) and ledger.failures == 2


def test_a_crash_loses_nothing_and_the_sample_extends(tiny, tmp_path, monkeypatch):
    data, split = tiny
    monkeypatch.delenv(KEY_ENV, raising=False)
    state = {"down_after": 3}

    def decide(n, prompt):
        return (401, {}, 0.0) if n >= state["down_after"] else (200, {}, 0.0)

    with ChatServer(decide) as server:
        config = endpoint(server, concurrency=1)
        with pytest.raises(EndpointError, match="401"):
            OpenAITeacher(config, max_users=6, seed=1, progress=False).run(data, split, tmp_path, sides=["user"])
        assert all(e["auth"] is None for e in server.log)  # no key in the environment: no header
        first = {r.id for r in read_records(tmp_path / "teacher" / "users.jsonl")}
        assert len(first) == 3  # the answers that arrived before the failure were kept
        state["down_after"] = 10**9
        before = len(server.log)
        report = OpenAITeacher(config, max_users=6, seed=1, progress=False).run(data, split, tmp_path, sides=["user"])
        assert len(server.log) - before == 3 and report.resumed["user"] == 3
        six = {r.id for r in read_records(tmp_path / "teacher" / "users.jsonl")}
        assert len(six) == 6 and first < six
        before = len(server.log)
        OpenAITeacher(config, max_users=9, seed=1, progress=False).run(data, split, tmp_path, sides=["user"])
        assert len(server.log) - before == 3  # a larger sample with the same seed extends the first


def test_retry_after_forms_and_bad_config():
    assert retry_after_seconds("2") == 2.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    with pytest.raises(ValueError, match="base URL"):
        EndpointConfig(base_url="localhost:8000")
    with pytest.raises(ValueError, match="concurrency"):
        EndpointConfig(concurrency=0)
