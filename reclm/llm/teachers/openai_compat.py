"""The ``openai`` teacher: any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama, a
llama.cpp server...), spoken with ``httpx`` (no SDK).

- Concurrent requests, at most ``concurrency`` in flight.
- Retries with exponential backoff (and jitter) on 429, 5xx, timeouts and dropped connections; a
  ``Retry-After`` header (seconds or HTTP date) is honoured, and after a 429 every worker pauses.
- 401 / 403 / 404 stop the run at once (wrong key, model or URL); another 4xx fails that id only.
- A ledger, ``teacher/ledger.json``, adds up over runs: HTTP requests, retries, errors by kind,
  prompt / completion tokens (from ``usage``), cost from per-1k-token prices, ids that failed.
- Answers are written as they come; ``format_ok`` says whether one parses as a profile (SFT can
  filter on it), and unparsable answers are counted in the ledger's errors.
- Resumable: every answer is appended to ``users.jsonl`` / ``items.jsonl`` as it arrives; ids already
  there are never asked again. Item prompts use the user profiles this teacher wrote.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from reclm.data.dataset import RecDataset
from reclm.data.split import Split
from reclm.llm.prompts import item_prompts, item_train_users, parse_profile, user_histories, user_prompts
from reclm.llm.records import ProfileRecord, RecordWriter, done_ids, read_profiles
from reclm.llm.teachers.base import (
    OUTPUT_FILES,
    Teacher,
    TeacherReport,
    load_item_neighbours,
    progress_bar,
    restrict,
    sample_ids,
    write_json,
)

RETRY_STATUS = {408, 409, 425, 429}
FATAL_STATUS = {401, 403, 404}
MAX_RETRY_AFTER = 600.0


class EndpointError(ValueError):
    """The endpoint refuses every request (bad key, model or URL): stop the run."""


class RequestFailed(Exception):
    """One prompt could not be answered (after retries, or a non-retryable error)."""


@dataclass
class EndpointConfig:
    """Where and how to ask. ``api_key_env`` names the environment variable holding the key (unset
    variable: no Authorization header, as local servers expect). Prices are per 1,000 tokens."""

    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-3.5-turbo"
    api_key_env: str | None = "OPENAI_API_KEY"
    concurrency: int = 4
    max_retries: int = 6
    backoff: float = 1.0
    max_backoff: float = 60.0
    timeout: float = 60.0
    temperature: float = 0.0
    max_tokens: int = 160
    price_in: float = 0.0
    price_out: float = 0.0
    system: str | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency {self.concurrency}: expected at least 1")
        if self.max_retries < 0:
            raise ValueError(f"max_retries {self.max_retries}: expected 0 or more")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base URL {self.base_url!r}: expected http(s)://host[:port]/v1")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def headers(self) -> dict[str, str]:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        return {"Authorization": f"Bearer {key}"} if key else {}

    def body(self, prompt: str) -> dict:
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": prompt}
        ]
        return {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }

    def public(self) -> dict:
        """Options safe to write to disk (the key itself is never stored)."""
        return asdict(self)


@dataclass
class Ledger:
    """Running totals, cumulative over resumed runs."""

    model: str = ""
    base_url: str = ""
    runs: int = 0
    requests: int = 0
    answered: int = 0
    retries: int = 0
    failures: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    price_in: float = 0.0
    price_out: float = 0.0
    failed: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Ledger:
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text())
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def save(self, path: Path) -> None:
        write_json(path, {**asdict(self), "total_tokens": self.prompt_tokens + self.completion_tokens})

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def usage(self, usage: dict | None) -> None:
        usage = usage or {}
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.cost = round(self.cost + prompt / 1000 * self.price_in + completion / 1000 * self.price_out, 8)


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return min(MAX_RETRY_AFTER, max(0.0, float(value)))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(MAX_RETRY_AFTER, max(0.0, when.timestamp() - time.time()))


@dataclass
class Answer:
    text: str
    finish_reason: str | None
    usage: dict


class ChatClient:
    """Chat completions with bounded concurrency, retries and a shared pause after rate limiting."""

    def __init__(self, config: EndpointConfig, ledger: Ledger, on_change: Callable[[], None] = lambda: None):
        self.config = config
        self.ledger = ledger
        self.on_change = on_change
        self.pause_until = 0.0
        self.rng = random.Random(0)

    def backoff(self, attempt: int) -> float:
        delay = min(self.config.max_backoff, self.config.backoff * 2**attempt)
        return delay * (0.5 + 0.5 * self.rng.random())

    async def wait_for_pause(self) -> None:
        while (delay := self.pause_until - time.monotonic()) > 0:
            await asyncio.sleep(delay)

    async def ask(self, client: httpx.AsyncClient, prompt: str) -> Answer:
        cfg = self.config
        last = ""
        for attempt in range(cfg.max_retries + 1):
            await self.wait_for_pause()
            delay = self.backoff(attempt)
            try:
                response = await client.post(cfg.url, json=cfg.body(prompt), headers=cfg.headers())
            except httpx.TimeoutException:
                self.ledger.requests += 1
                last = "timeout"
            except httpx.TransportError as exc:
                self.ledger.requests += 1
                last = f"connection: {type(exc).__name__}"
            else:
                self.ledger.requests += 1
                status = response.status_code
                if status == 200:
                    answer = self.parse(response)
                    if answer is not None:
                        return answer
                    last = "malformed response"
                elif status in FATAL_STATUS:
                    self.ledger.error(str(status))
                    raise EndpointError(
                        f"{cfg.url} answered {status} for model {cfg.model!r}: {response.text[:200]!r} "
                        f"(check the base URL, the model name and ${cfg.api_key_env})"
                    )
                elif status in RETRY_STATUS or status >= 500:
                    last = str(status)
                    wait = retry_after_seconds(response.headers.get("retry-after"))
                    if wait is not None:
                        delay = wait
                    if status == 429:
                        self.pause_until = max(self.pause_until, time.monotonic() + delay)
                else:
                    self.ledger.error(str(status))
                    raise RequestFailed(f"{status}: {response.text[:200]}")
            self.ledger.error(last)
            self.on_change()
            if attempt == cfg.max_retries:
                break
            self.ledger.retries += 1
            await asyncio.sleep(delay)
        raise RequestFailed(f"gave up after {cfg.max_retries + 1} attempts (last: {last})")

    @staticmethod
    def parse(response: httpx.Response) -> Answer | None:
        try:
            data = response.json()
            choice = data["choices"][0]
            text = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None
        if not isinstance(text, str):
            return None
        return Answer(text.strip(), choice.get("finish_reason"), data.get("usage") or {})


def run_coroutine(coroutine) -> object:
    """``asyncio.run``, also from code that already runs an event loop (then in a worker thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


class OpenAITeacher(Teacher):
    """Profiles from an OpenAI-compatible endpoint (see the module docstring)."""

    kind = "openai"

    def __init__(self, endpoint: EndpointConfig | None = None, **kwargs):
        super().__init__(**kwargs)
        self.endpoint = endpoint or EndpointConfig()

    def options(self) -> dict:
        return {**super().options(), "endpoint": self.endpoint.public()}

    def write(
        self,
        data: RecDataset,
        split: Split,
        folder: Path,
        users: Sequence[int] | None,
        items: Sequence[int] | None,
        sides: list[str],
        report: TeacherReport,
    ) -> None:
        ledger_path = folder / "ledger.json"
        ledger = Ledger.load(ledger_path)
        ledger.model, ledger.base_url = self.endpoint.model, self.endpoint.base_url
        ledger.price_in, ledger.price_out = self.endpoint.price_in, self.endpoint.price_out
        ledger.runs += 1
        ledger.save(ledger_path)
        try:
            if "user" in sides:
                histories = user_histories(data, split)
                candidates = [u for u in range(data.n_users) if len(histories[u])]
                report.skip("users with an empty train history", data.n_users - len(candidates))
                chosen = sample_ids(restrict(candidates, users), self.max_users, self.seed)
                path = folder / OUTPUT_FILES["user"]
                done = done_ids(path, "user")
                todo = [u for u in chosen if data.user_ids[u] not in done]
                report.resumed["user"] = len(chosen) - len(todo)
                prompts = user_prompts(data, split, todo, self.budget)
                ids = {u: data.user_ids[u] for u in prompts}
                self.ask_all("user", prompts, ids, path, ledger, ledger_path, report)
            if "item" in sides:
                train_users = item_train_users(split)
                candidates = [i for i in range(data.n_items) if len(train_users[i])]
                report.skip("items without train interactions", data.n_items - len(candidates))
                chosen = sample_ids(restrict(candidates, items), self.max_items, self.seed)
                path = folder / OUTPUT_FILES["item"]
                done = done_ids(path, "item")
                todo = [i for i in chosen if data.item_ids[i] not in done]
                report.resumed["item"] = len(chosen) - len(todo)
                user_path = folder / OUTPUT_FILES["user"]
                index = data.user_index()
                profiles = read_profiles(user_path, "user") if user_path.is_file() else {}
                user_profiles = {index[k]: v for k, v in profiles.items() if k in index}
                prompts = item_prompts(
                    data, split, todo, user_profiles, neighbours=load_item_neighbours(data), budget=self.budget
                )
                ids = {i: data.item_ids[i] for i in prompts}
                self.ask_all("item", prompts, ids, path, ledger, ledger_path, report)
        finally:
            ledger.save(ledger_path)
        report.extra["ledger"] = {
            k: getattr(ledger, k) for k in ("requests", "retries", "prompt_tokens", "completion_tokens", "cost")
        }

    def ask_all(
        self,
        kind: str,
        prompts: dict[int, str],
        ids: dict[int, str],
        path: Path,
        ledger: Ledger,
        ledger_path: Path,
        report: TeacherReport,
    ) -> None:
        """Ask every prompt concurrently; append each answer as it arrives."""
        if not prompts:
            return
        failed_before = ledger.failures
        with RecordWriter(path) as out, progress_bar(len(prompts), f"teacher {kind}s (openai)", self.progress) as adv:
            client = ChatClient(self.endpoint, ledger, on_change=lambda: ledger.save(ledger_path))

            async def one(http: httpx.AsyncClient, gate: asyncio.Semaphore, key: int, prompt: str) -> None:
                async with gate:
                    try:
                        answer = await client.ask(http, prompt)
                    except RequestFailed as exc:
                        ledger.failures += 1
                        ledger.failed[f"{kind}:{ids[key]}"] = str(exc)
                    else:
                        ledger.answered += 1
                        ledger.usage(answer.usage)
                        ledger.failed.pop(f"{kind}:{ids[key]}", None)
                        extra = {"teacher": self.kind, "model": self.endpoint.model}
                        extra["format_ok"] = parse_profile(answer.text) is not None  # SFT may filter on it
                        if not extra["format_ok"]:
                            ledger.error("unparsable profile")
                        if answer.finish_reason:
                            extra["finish_reason"] = answer.finish_reason
                        out.write(ProfileRecord(kind, ids[key], prompt, answer.text, extra))  # type: ignore[arg-type]
                    ledger.save(ledger_path)
                    adv()

            async def main() -> None:
                gate = asyncio.Semaphore(self.endpoint.concurrency)
                limits = httpx.Limits(max_connections=self.endpoint.concurrency)
                async with httpx.AsyncClient(timeout=self.endpoint.timeout, limits=limits) as http:
                    tasks = [asyncio.create_task(one(http, gate, k, p)) for k, p in prompts.items()]
                    try:
                        await asyncio.gather(*tasks)
                    except BaseException:
                        for task in tasks:
                            task.cancel()
                        await asyncio.gather(*tasks, return_exceptions=True)
                        raise

            run_coroutine(main())
        report.written[kind] += len(prompts) - (ledger.failures - failed_before)
        report.skip(f"{kind}s failed after retries (asked again on the next run)", ledger.failures - failed_before)


__all__ = ["EndpointConfig", "EndpointError", "Ledger", "OpenAITeacher"]
