"""Issue 21 on the endpoint side (items 1, 2, 9, 18): the served writer in the generation cache key, teacher
answers kept across option changes, no key in clear over the network, odd ``usage`` replies, the spending cap.
Every endpoint is a real OpenAI-compatible HTTP server on loopback, run in a thread."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from reclm.cli.main import app
from reclm.llm.generation import DecodeParams, GenerationCache, generate_texts, make_generator
from reclm.llm.prompts import format_profile
from reclm.llm.records import read_records
from reclm.llm.teachers import EndpointConfig, EndpointError, Ledger, OpenAITeacher, SpendingCapReached
from reclm.pipeline.config import validate_config
from reclm.pipeline.engine import Pipeline, StageError
from reclm.pipeline.stages.data import make_teacher
from reclm.pipeline.table import build_stages

KEY_ENV = "RECLM_TEST_HARDENING_KEY"
Reply = Callable[[dict], tuple[str, object]]


def profile_reply(body: dict) -> tuple[str, object]:
    """A profile in the format; usage: a quarter token per prompt character (below the cap's estimate)."""
    prompt = body["messages"][-1]["content"]
    return format_profile([f"Reader {len(prompt)}"], ["Films"]), {
        "prompt_tokens": len(prompt) // 4,
        "completion_tokens": 5,
    }


class Endpoint:
    """``POST /v1/chat/completions`` answering ``reply(body) -> (text, usage)``; logs every request."""

    def __init__(self, reply: Reply = profile_reply):
        self.reply = reply
        self.log: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.log.append({"body": body, "auth": self.headers.get("Authorization")})
                text, usage = server.reply(body)
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                data = json.dumps({"choices": [choice], "usage": usage}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def prompts(self, start: int = 0) -> list[str]:
        return [entry["body"]["messages"][-1]["content"] for entry in self.log[start:]]

    def __enter__(self) -> Endpoint:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def write_adapter(folder: Path, weights: bytes) -> Path:
    """A LoRA adapter folder as a trainer leaves it (config + weights): what the generation key hashes."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


def teacher_endpoint(server: Endpoint, **options) -> EndpointConfig:
    defaults = dict(base_url=server.base_url, model="teacher", api_key_env=None, concurrency=2, max_tokens=10)
    return EndpointConfig(**{**defaults, **options})


# ---------------------------------------------------------------- item 1


def test_the_served_adapter_keys_the_generation_cache(tmp_path):
    """A writer retrained and re-served under the same name, or another ablation variant, never gets the
    cached answers of the old one; an endpoint whose writer is not named is not cached at all."""
    served = {"version": 1}

    def reply(body: dict) -> tuple[str, object]:
        return f"v{served['version']} {body['messages'][-1]['content']}", {}

    prompts, params = ["History: A.", "History: B."], DecodeParams(max_new_tokens=8)
    adapter = write_adapter(tmp_path / "rl" / "adapter", b"weights 1")
    variant = write_adapter(tmp_path / "collab" / "adapter", b"weights collab")
    cache = GenerationCache(tmp_path / "generations.sqlite")
    with Endpoint(reply) as server:

        def generate(writer: Path | None) -> tuple[list, int]:
            generator = make_generator("openai", "writer", writer, base_url=server.base_url, api_key_env=None)
            before = len(server.log)
            texts, _ = generate_texts(generator, prompts, params, cache, progress=False)
            return texts, len(server.log) - before

        assert generate(adapter) == (["v1 History: A.", "v1 History: B."], 2)
        assert generate(adapter) == (["v1 History: A.", "v1 History: B."], 0)  # same writer: cached
        write_adapter(adapter, b"weights 2")  # retrained in place, re-served under the same name
        served["version"] = 2
        assert generate(adapter) == (["v2 History: A.", "v2 History: B."], 2)
        served["version"] = 3
        assert generate(variant) == (["v3 History: A.", "v3 History: B."], 2)  # an ablation variant
        assert generate(None) == (["v3 History: A.", "v3 History: B."], 2)
        assert generate(None)[1] == 2  # no writer named: asked every time
    cache.close()


# ---------------------------------------------------------------- item 9


def test_a_key_never_goes_in_clear_to_another_machine(tiny, tmp_path, monkeypatch):
    data, split = tiny
    monkeypatch.setenv(KEY_ENV, "sk-secret")
    remote = EndpointConfig(base_url="http://192.0.2.10:8000/v1", api_key_env=KEY_ENV, timeout=0.2, max_retries=0)
    with pytest.raises(EndpointError, match=r"refusing to send \$RECLM_TEST_HARDENING_KEY in clear .* 192\.0\.2\.10"):
        OpenAITeacher(remote, max_users=3, progress=False).run(data, split, tmp_path, sides=["user"])
    assert not (tmp_path / "teacher" / "users.jsonl").exists()
    with pytest.raises(EndpointError, match="https"):
        make_generator("openai", "m", base_url="http://gpu-box.lan:8000/v1", api_key_env=KEY_ENV)
    for url in ("https://api.example.com/v1", "http://localhost:8000/v1", "http://127.0.0.7/v1", "http://[::1]:80/v1"):
        assert EndpointConfig(base_url=url, api_key_env=KEY_ENV).headers() == {"Authorization": "Bearer sk-secret"}
    assert EndpointConfig(base_url="http://192.0.2.10/v1", api_key_env=None).headers() == {}  # no key: nothing to leak

    # loopback: the key goes; api_key_env null (allowed in a config too): no Authorization header at all
    with Endpoint() as server:
        OpenAITeacher(teacher_endpoint(server, api_key_env=KEY_ENV), max_users=2, progress=False).run(
            data, split, tmp_path / "keyed", sides=["user"]
        )
        config = validate_config(
            {
                "stages": {"teacher": "openai"},
                "generation": {"api_key_env": None},
                "teacher": {"users": 2, "openai": {"base_url": server.base_url, "api_key_env": None}},
            }
        )
        make_teacher(config, progress=False).run(data, split, tmp_path / "keyless", sides=["user"])
        assert [e["auth"] for e in server.log] == ["Bearer sk-secret"] * 2 + [None] * 2


# ---------------------------------------------------------------- item 18: usage


def test_a_reply_with_an_odd_usage_does_not_abort_the_batch(tiny, tmp_path):
    data, split = tiny
    odd = [[1, 2], "12", None, {"prompt_tokens": "many", "completion_tokens": -3}, {"prompt_tokens": 1e400}, 7]
    counter = iter(range(10**6))

    def reply(body: dict) -> tuple[str, object]:
        n = next(counter)
        usage = odd[n] if n < len(odd) else {"prompt_tokens": 10, "completion_tokens": 2}
        return format_profile([f"Reader {n}"], ["Films"]), usage

    with Endpoint(reply) as server:
        OpenAITeacher(teacher_endpoint(server), max_users=8, progress=False).run(data, split, tmp_path, sides=["user"])
        assert len(read_records(tmp_path / "teacher" / "users.jsonl")) == 8
        ledger = Ledger.load(tmp_path / "teacher" / "ledger.json")
        assert ledger.answered == 8 and (ledger.prompt_tokens, ledger.completion_tokens) == (20, 4)

        counter = iter(range(10**6))
        generator = make_generator("openai", "writer", base_url=server.base_url, api_key_env=None)
        texts = generator.generate([f"History: {k}." for k in range(8)], DecodeParams(max_new_tokens=8))
        assert all(texts) and (generator.prompt_tokens, generator.new_tokens) == (20, 4)


# ---------------------------------------------------------------- item 18: the spending cap


def test_the_spending_cap_stops_before_passing_it_and_keeps_every_answer(tiny, tmp_path):
    data, split = tiny
    prices = dict(price_in=1.0, price_out=1.0)  # $ per 1k tokens: an answer costs about $0.5 here
    with Endpoint() as server:
        capped = teacher_endpoint(server, max_cost=2.5, **prices)
        with pytest.raises(SpendingCapReached, match=r"spent of the \$2\.5000 cap .* raise the cap \(--max-cost"):
            OpenAITeacher(capped, progress=False).run(data, split, tmp_path, sides=["user"])
        ledger = Ledger.load(tmp_path / "teacher" / "ledger.json")
        bought = read_records(tmp_path / "teacher" / "users.jsonl")
        assert 0 < len(bought) == ledger.answered == ledger.requests == len(server.log) < data.n_users
        assert ledger.cost <= 2.5

        asked = len(server.log)
        report = OpenAITeacher(teacher_endpoint(server, **prices), progress=False).run(
            data, split, tmp_path, sides=["user"]
        )
        assert report.resumed["user"] == len(bought) and len(server.log) - asked == report.written["user"]
        assert sorted(server.prompts()) == sorted(r.prompt for r in read_records(tmp_path / "teacher" / "users.jsonl"))
        ledger = Ledger.load(tmp_path / "teacher" / "ledger.json")
        assert ledger.runs == 2 and ledger.answered == len(server.log)

        # the generation backend: answers bought before the cap are cached, the rest asked on the next run
        cache = GenerationCache(tmp_path / "generations.sqlite")
        prompts, params = [f"History: film {k}." for k in range(6)], DecodeParams(max_new_tokens=10)
        options = dict(base_url=server.base_url, api_key_env=None, fingerprint="writer-1", concurrency=1)
        options.update(price_in=0.0, price_out=1.0)  # at most $0.01 a request (10 tokens), $0.005 charged
        generator = make_generator("openai", "writer", max_cost=0.027, **options)
        with pytest.raises(ValueError, match="spending cap reached"):
            generate_texts(generator, prompts, params, cache, progress=False)
        assert 0 < cache.count(generator.identity) == generator.ledger.answered < 6
        assert generator.ledger.cost <= 0.027
        before = len(server.log)
        texts, stats = generate_texts(
            make_generator("openai", "writer", **options), prompts, params, cache, progress=False
        )
        assert all(texts) and stats.cached == generator.ledger.answered and len(server.log) - before == stats.generated
        cache.close()


def test_reclm_teacher_max_cost_is_one_line_and_a_rerun_goes_on(tiny_files, tmp_path):
    runner, run = CliRunner(), tmp_path / "run"
    prepare = ["prepare", "--dataset", tiny_files / "inter.csv", "--item-text", tiny_files / "items.csv", "--out", run]
    assert runner.invoke(app, [str(a) for a in prepare]).exit_code == 0
    with Endpoint() as server:
        args = ["teacher", str(run), "--kind", "openai", "--base-url", server.base_url, "--api-key-env", ""]
        args += ["--only", "users", "--quiet", "--max-tokens", "10", "--price-in", "1", "--price-out", "1"]
        result = runner.invoke(app, [*args, "--concurrency", "1", "--max-cost", "3"])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert lines[-1].startswith("error: spending cap reached: $") and "--max-cost" in lines[-1], result.output
        assert "Traceback" not in result.output
        bought = len(read_records(run / "teacher" / "users.jsonl"))
        assert 0 < bought == len(server.log)
        result = runner.invoke(app, [*args, "--max-cost", "100"])
        assert result.exit_code == 0, result.output
        assert len(server.log) == len(read_records(run / "teacher" / "users.jsonl")) > bought


# ---------------------------------------------------------------- item 2 (and the cap from the config)


def test_teacher_stage_keeps_paid_answers_across_option_changes(tiny_files, tmp_path):
    """Transport, price and cap fields do not touch the teacher stage; a larger sample asks only for the new
    users; the ledger keeps its history; the cap stops the stage with one line and a rerun goes on."""
    stages = [s for s in build_stages() if s.name in ("prepare", "teacher")]
    root = tmp_path / "run"
    with Endpoint() as server:
        openai = {"base_url": server.base_url, "model": "t", "api_key_env": None, "max_tokens": 10}
        openai.update(price_in=1.0, price_out=1.0)

        def run(teacher: dict, **endpoint) -> str:
            raw = {
                "dataset": str(tiny_files / "inter.csv"),
                "item_text": str(tiny_files / "items.csv"),
                "stages": {"teacher": "openai"},
                "teacher": {"users": 4, "items": 2, **teacher, "openai": {**openai, **endpoint}},
            }
            console = Console(file=io.StringIO())
            outcomes = Pipeline(validate_config(raw), root, stages, console=console).run()
            return {o.name: o.action for o in outcomes}["teacher"]

        with pytest.raises(StageError, match=r"^stage 'teacher': spending cap reached: \$.* teacher\.max_cost"):
            run({"max_cost": 1.0})
        paid = len(server.log)
        assert 0 < paid < 6
        assert run({"max_cost": 5.0}) == "ran"  # the same key: the interrupted work goes on
        assert len(server.log) == 6  # 4 users + 2 items, each asked once
        ledger = Ledger.load(root / "teacher" / "ledger.json")
        assert ledger.runs == 2 and ledger.requests == 6

        changed = dict(concurrency=1, timeout=5.0, max_retries=0, price_in=2.0, price_out=3.0, api_key_env="NOPE")
        assert run({"max_cost": 0.5}, **changed) == "cached" and len(server.log) == 6

        first = server.prompts()
        assert run({"users": 6}) == "ran"
        new = server.prompts(6)
        assert len(new) == 2 and not set(new) & set(first)  # only the two new users
        ledger = Ledger.load(root / "teacher" / "ledger.json")
        assert ledger.runs == 3 and ledger.requests == 8 and ledger.cached == 6
        assert len(read_records(root / "teacher" / "users.jsonl")) == 6
