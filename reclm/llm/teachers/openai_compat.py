"""The ``openai`` teacher: any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama, a
llama.cpp server...), spoken with ``httpx`` (no SDK).

- Concurrent requests, at most ``concurrency`` in flight.
- Retries with exponential backoff (and jitter) on 429, 5xx, timeouts and dropped connections; a
  ``Retry-After`` header (seconds or HTTP date) is honoured, and after a 429 every worker pauses.
- 401 / 403 / 404 stop the run at once (wrong key, model or URL); another 4xx fails that id only.
- A ledger, ``teacher/ledger.json``, adds up over runs: HTTP requests, retries, errors by kind,
  prompt / completion tokens (from ``usage``; a reply without a usable ``usage`` counts none), cost from
  per-1k-token prices, ids that failed.
- A spending cap, ``max_cost`` (USD, the ledger's total): no request is sent that could take the total past
  it (estimated from the prices, the prompt's length and ``max_tokens``); the answers bought until then
  are kept and the run stops with :class:`SpendingCapReached`, one line saying how to go on.
- The key is sent over https, or over plain http to a loopback host only: never in clear across a network.
- Answers are written as they come; ``format_ok`` says whether one parses as a profile (SFT can
  filter on it), and unparsable answers are counted in the ledger's errors.
- Resumable: every answer is appended to ``users.jsonl`` / ``items.jsonl`` as it arrives; ids already
  there are never asked again. Item prompts use the user profiles this teacher wrote.
- Answers are also kept per prompt in ``$RECLM_CACHE/teacher_answers.sqlite``, keyed by what changes an
  answer (base URL, model, system prompt, temperature, ``max_tokens``, the prompt), so a run with other
  options or a larger sample asks only for prompts never answered (``fresh`` asks again).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import httpx

from reclm.data.dataset import RecDataset
from reclm.data.split import Split
from reclm.llm.prompts import item_prompts, item_train_users, parse_profile, user_histories, user_prompts
from reclm.llm.records import ProfileRecord, RecordWriter, done_ids, read_profiles, read_records
from reclm.llm.teachers.base import (
    OUTPUT_FILES,
    Teacher,
    TeacherReport,
    load_item_neighbours,
    progress_bar,
    restrict,
    sample_ids,
)
from reclm.utils import is_loopback, write_json

if TYPE_CHECKING:
    from reclm.llm.generation.runner import GenerationCache

RETRY_STATUS = {408, 409, 425, 429}
FATAL_STATUS = {401, 403, 404}
MAX_RETRY_AFTER = 600.0


class EndpointError(ValueError):
    """The endpoint refuses every request (bad key, model or URL): stop the run."""


class RequestFailed(Exception):
    """One prompt could not be answered (after retries, or a non-retryable error). ``endpoint_down``: the
    endpoint failed rather than the prompt (no connection, a timeout, or retryable errors until the retries
    ran out), so a generator with several endpoints asks another one."""

    def __init__(self, message: str, endpoint_down: bool = False):
        super().__init__(message)
        self.endpoint_down = endpoint_down


class SpendingCapReached(ValueError):
    """The next request could take the spending past ``max_cost``: nothing more is asked."""


def tokens(value: object) -> int:
    """A token count from a reply's ``usage`` (anything but a non-negative number counts 0)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return 0
    return int(value)


@dataclass
class EndpointConfig:
    """Where and how to ask. ``api_key_env`` names the environment variable holding the key (``None`` or
    an unset variable: no Authorization header, as local servers expect). Prices are per 1,000 tokens;
    ``max_cost`` (USD, ``None``: no cap) bounds the ledger's total cost."""

    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-3.5-turbo"
    api_key_env: str | None = "OPENAI_API_KEY"
    concurrency: int = 8
    max_retries: int = 6
    backoff: float = 1.0
    max_backoff: float = 60.0
    timeout: float = 60.0
    temperature: float = 0.0
    max_tokens: int = 160
    # 0: unpriced, as a served model (GenerationEndpoint); `reclm teacher` and the pipeline pass teacher.openai's
    price_in: float = 0.0
    price_out: float = 0.0
    system: str | None = None
    max_cost: float | None = None
    cap_hint: ClassVar[str] = "--max-cost, or teacher.max_cost in a pipeline config"  # where the cap is raised

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency {self.concurrency}: expected at least 1")
        if self.max_cost is not None and not self.max_cost >= 0:
            raise ValueError(f"max_cost {self.max_cost}: expected a cost of 0 or more (USD)")
        if self.max_retries < 0:
            raise ValueError(f"max_retries {self.max_retries}: expected 0 or more")
        for base_url in self.urls:
            if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
                raise ValueError(f"base URL {base_url!r}: expected http(s)://host[:port]/v1")

    @property
    def urls(self) -> list[str]:
        """The base URLs requests go to: one here (the generation endpoint may list several)."""
        return [self.base_url]

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def headers(self) -> dict[str, str]:
        """The Authorization header, when a key is set; refuses to send it in clear to another machine (checked
        for every base URL)."""
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if not key:
            return {}
        for base_url in self.urls:
            url = httpx.URL(base_url)
            if url.scheme != "https" and not is_loopback(url.host):
                raise EndpointError(
                    f"refusing to send ${self.api_key_env} in clear over http:// to {url.host}: use an https:// "
                    f"base URL, a loopback address, or no key (api_key_env null / --api-key-env '')"
                )
        return {"Authorization": f"Bearer {key}"}

    def answer_key(self) -> tuple[str, str]:
        """(identity, parameters) an answer is cached under: what changes it besides the prompt (and the
        system prompt, part of the prompt's hash); not transport, prices or the cap."""
        params = json.dumps({"temperature": self.temperature, "max_tokens": self.max_tokens}, sort_keys=True)
        return f"teacher|{self.base_url.rstrip('/')}|{self.model}", params

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
    cached: int = 0  # answers taken from the answer cache (not bought again)
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

    def usage(self, usage: object) -> None:
        usage = usage if isinstance(usage, dict) else {}
        prompt, completion = tokens(usage.get("prompt_tokens")), tokens(usage.get("completion_tokens"))
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
    """Chat completions with bounded concurrency, retries, a shared pause after rate limiting and the
    spending cap. Each answer's usage goes into the ledger as it arrives."""

    def __init__(self, config: EndpointConfig, ledger: Ledger, on_change: Callable[[], None] = lambda: None):
        self.config = config
        self.ledger = ledger
        self.on_change = on_change
        self.headers = config.headers()  # refuses an unsafe key before any request
        self.pause_until: dict[str, float] = {}  # chat URL -> when its pause after a 429 ends
        self.rng = random.Random(0)
        self.reserved = 0.0  # estimated cost of the requests in flight
        self.tokens_per_char: float | None = None  # the largest prompt tokens / characters seen
        self.capped = False

    def backoff(self, attempt: int) -> float:
        delay = min(self.config.max_backoff, self.config.backoff * 2**attempt)
        return delay * (0.5 + 0.5 * self.rng.random())

    async def wait_for_pause(self, url: str) -> None:
        while (delay := self.pause_until.get(url, 0.0) - time.monotonic()) > 0:
            await asyncio.sleep(delay)

    @staticmethod
    def characters(body: dict) -> int:
        return sum(len(str(m.get("content", ""))) for m in body["messages"])

    def reserve(self, body: dict) -> float:
        """The estimated cost of sending ``body`` (an upper estimate: ``max_tokens`` completion tokens, and
        2 characters a token until replies show the real rate), held until its answer is in the ledger;
        raises :class:`SpendingCapReached` when it could take the total past ``max_cost``."""
        cfg = self.config
        if self.capped:
            raise SpendingCapReached(self.cap_message())
        if cfg.max_cost is None:
            return 0.0
        prompt = math.ceil(self.characters(body) * (self.tokens_per_char or 0.5)) + 16
        cost = prompt / 1000 * cfg.price_in + cfg.max_tokens / 1000 * cfg.price_out
        if self.ledger.cost + self.reserved + cost > cfg.max_cost:
            self.capped = True
            raise SpendingCapReached(self.cap_message())
        self.reserved += cost
        return cost

    def cap_message(self, detail: str = "the next request could pass it") -> str:
        return (
            f"spending cap reached: ${self.ledger.cost:.4f} spent of the ${self.config.max_cost:.4f} cap ({detail}); "
            f"every answer bought so far is kept: raise the cap ({self.config.cap_hint}) and run again to continue"
        )

    def bought(self, answer: Answer, body: dict) -> None:
        self.ledger.answered += 1
        self.ledger.usage(answer.usage)
        prompt, characters = tokens(answer.usage.get("prompt_tokens")), self.characters(body)
        if prompt and characters:
            self.tokens_per_char = max(self.tokens_per_char or 0.0, prompt / characters)

    async def ask(
        self, client: httpx.AsyncClient, prompt: str, base_url: str | None = None, failover: bool = False
    ) -> Answer:
        """One answer. ``base_url``: ask that endpoint rather than the config's (a 429 pauses that one only);
        ``failover``: a dropped connection or a timeout fails at once (``endpoint_down``, so that another
        endpoint is asked) rather than being retried here."""
        cfg = self.config
        url = cfg.url if base_url is None else base_url.rstrip("/") + "/chat/completions"
        body = cfg.body(prompt)
        last = ""
        for attempt in range(cfg.max_retries + 1):
            await self.wait_for_pause(url)
            delay = self.backoff(attempt)
            held = self.reserve(body)
            unreachable = False
            try:
                response = await client.post(url, json=body, headers=self.headers)
            except httpx.TimeoutException:
                self.ledger.requests += 1
                last, unreachable = "timeout", True
            except httpx.TransportError as exc:
                self.ledger.requests += 1
                last, unreachable = f"connection: {type(exc).__name__}", True
            else:
                self.ledger.requests += 1
                status = response.status_code
                if status == 200:
                    answer = self.parse(response)
                    if answer is not None:
                        self.bought(answer, body)
                        return answer
                    last = "malformed response"
                elif status in FATAL_STATUS:
                    self.ledger.error(str(status))
                    raise EndpointError(
                        f"{url} answered {status} for model {cfg.model!r}: {response.text[:200]!r} "
                        f"(check the base URL, the model name and ${cfg.api_key_env})"
                    )
                elif status in RETRY_STATUS or status >= 500:
                    last = str(status)
                    wait = retry_after_seconds(response.headers.get("retry-after"))
                    if wait is not None:
                        delay = wait
                    if status == 429:
                        self.pause_until[url] = max(self.pause_until.get(url, 0.0), time.monotonic() + delay)
                else:
                    self.ledger.error(str(status))
                    raise RequestFailed(f"{status}: {response.text[:200]}")
            finally:
                self.reserved -= held
            self.ledger.error(last)
            self.on_change()
            if failover and unreachable:
                raise RequestFailed(f"{url}: {last}", endpoint_down=True)
            if attempt == cfg.max_retries:
                break
            self.ledger.retries += 1
            await asyncio.sleep(delay)
        raise RequestFailed(f"gave up after {cfg.max_retries + 1} attempts (last: {last})", endpoint_down=True)

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
        usage = data.get("usage")  # anything but a mapping: usage unknown (the answer still counts)
        reason = choice.get("finish_reason")
        return Answer(
            text.strip(), reason if isinstance(reason, str) else None, usage if isinstance(usage, dict) else {}
        )


def run_coroutine(coroutine) -> object:
    """``asyncio.run``, also from code that already runs an event loop (then in a worker thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


class OpenAITeacher(Teacher):
    """Profiles from an OpenAI-compatible endpoint (see the module docstring). ``answer_cache``: the SQLite
    file answers are kept in per prompt (default ``$RECLM_CACHE/teacher_answers.sqlite``)."""

    kind = "openai"

    def __init__(self, endpoint: EndpointConfig | None = None, answer_cache: str | Path | None = None, **kwargs):
        super().__init__(**kwargs)
        self.endpoint = endpoint or EndpointConfig()
        self.answer_cache = Path(answer_cache) if answer_cache else None

    def options(self) -> dict:
        return {**super().options(), "endpoint": self.endpoint.public()}

    def open_cache(self) -> GenerationCache:
        from reclm.llm.generation.runner import GenerationCache  # here: the generation package uses this module
        from reclm.utils import cache_root

        return GenerationCache(self.answer_cache or cache_root() / "teacher_answers.sqlite")

    def adopt(self, previous: Path, folder: Path) -> int:
        """Carry an earlier output of this teacher (``previous``) over to a new ``folder``: its ledger (so the
        spending history and the cap count it) unless ``folder`` has one, and its answers into the answer
        cache when the same endpoint, model and decoding wrote them. Returns the answers adopted."""
        if (previous / "ledger.json").is_file() and not (folder / "ledger.json").exists():
            folder.mkdir(parents=True, exist_ok=True)
            Ledger.load(previous / "ledger.json").save(folder / "ledger.json")
        try:
            owner = json.loads((previous / "teacher.json").read_text())
        except (OSError, ValueError):
            return 0
        written_by = owner.get("options", {}).get("endpoint", {}) if owner.get("kind") == self.kind else {}
        fields = ("base_url", "model", "temperature", "max_tokens", "system")
        if not written_by or any(written_by.get(k) != getattr(self.endpoint, k) for k in fields):
            return 0
        from reclm.llm.generation.base import prompt_key

        answers = [
            (prompt_key(r.prompt, self.endpoint.system), stored(r.profile, r.extra.get("finish_reason")))
            for name in OUTPUT_FILES.values()
            if (previous / name).is_file()
            for r in read_records(previous / name)
        ]
        cache = self.open_cache()
        try:
            cache.put(*self.endpoint.answer_key(), answers)
        finally:
            cache.close()
        return len(answers)

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
        client = ChatClient(self.endpoint, ledger, on_change=lambda: ledger.save(ledger_path))
        ledger.model, ledger.base_url = self.endpoint.model, self.endpoint.base_url
        ledger.price_in, ledger.price_out = self.endpoint.price_in, self.endpoint.price_out
        ledger.runs += 1
        ledger.save(ledger_path)
        cache = self.open_cache()
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
                self.ask_all("user", prompts, ids, path, client, cache, ledger_path, report)
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
                self.ask_all("item", prompts, ids, path, client, cache, ledger_path, report)
        finally:
            ledger.save(ledger_path)
            cache.close()
        report.extra["ledger"] = {
            k: getattr(ledger, k) for k in ("requests", "retries", "prompt_tokens", "completion_tokens", "cost")
        }

    def ask_all(
        self,
        kind: str,
        prompts: dict[int, str],
        ids: dict[int, str],
        path: Path,
        client: ChatClient,
        cache: GenerationCache,
        ledger_path: Path,
        report: TeacherReport,
    ) -> None:
        """Take what the answer cache holds, ask every other prompt concurrently; append each answer as it
        arrives (and keep it in the cache). Raises :class:`SpendingCapReached` after the answers in flight
        when the cap stopped the asking."""
        if not prompts:
            return
        from reclm.llm.generation.base import prompt_key

        ledger, identity = client.ledger, self.endpoint.answer_key()
        keys = {k: prompt_key(p, self.endpoint.system) for k, p in prompts.items()}
        found = {} if self.fresh else cache.get(*identity, list(keys.values()))
        failed_before, not_asked = ledger.failures, 0
        with RecordWriter(path) as out, progress_bar(len(prompts), f"teacher {kind}s (openai)", self.progress) as adv:

            def keep(key: int, text: str, finish_reason: str | None) -> None:
                extra = {"teacher": self.kind, "model": self.endpoint.model}
                extra["format_ok"] = parse_profile(text) is not None  # SFT may filter on it
                if not extra["format_ok"]:
                    ledger.error("unparsable profile")
                if finish_reason:
                    extra["finish_reason"] = finish_reason
                out.write(ProfileRecord(kind, ids[key], prompts[key], text, extra))  # type: ignore[arg-type]
                ledger.failed.pop(f"{kind}:{ids[key]}", None)

            cached = [k for k in prompts if keys[k] in found]
            for key in cached:
                answer = json.loads(found[keys[key]])
                keep(key, answer["text"], answer.get("finish_reason"))
                adv()
            ledger.cached += len(cached)
            report.extra.setdefault("cached", {})[kind] = len(cached)

            async def one(http: httpx.AsyncClient, gate: asyncio.Semaphore, key: int, prompt: str) -> None:
                nonlocal not_asked
                async with gate:
                    try:
                        answer = await client.ask(http, prompt)
                    except SpendingCapReached:
                        not_asked += 1
                    except RequestFailed as exc:
                        ledger.failures += 1
                        ledger.failed[f"{kind}:{ids[key]}"] = str(exc)
                    else:
                        keep(key, answer.text, answer.finish_reason)
                        cache.put(*identity, [(keys[key], stored(answer.text, answer.finish_reason))])
                    ledger.save(ledger_path)
                    adv()

            async def main() -> None:
                gate = asyncio.Semaphore(self.endpoint.concurrency)
                limits = httpx.Limits(max_connections=self.endpoint.concurrency)
                async with httpx.AsyncClient(timeout=self.endpoint.timeout, limits=limits) as http:
                    todo = [(k, p) for k, p in prompts.items() if keys[k] not in found]
                    tasks = [asyncio.create_task(one(http, gate, k, p)) for k, p in todo]
                    try:
                        await asyncio.gather(*tasks)
                    except BaseException:
                        for task in tasks:
                            task.cancel()
                        await asyncio.gather(*tasks, return_exceptions=True)
                        raise

            run_coroutine(main())
        failed = ledger.failures - failed_before
        report.written[kind] += len(prompts) - failed - not_asked
        report.skip(f"{kind}s failed after retries (asked again on the next run)", failed)
        if not_asked:
            raise SpendingCapReached(client.cap_message(f"{not_asked} {kind} prompts not asked"))


def stored(text: str, finish_reason: str | None) -> str:
    """An answer as the answer cache keeps it."""
    return json.dumps({"text": text, "finish_reason": finish_reason}, ensure_ascii=False)


__all__ = ["EndpointConfig", "EndpointError", "Ledger", "OpenAITeacher", "SpendingCapReached"]
