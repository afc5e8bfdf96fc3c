"""Remote backend: any OpenAI-compatible chat-completions endpoint (vLLM, Ollama, a llama.cpp server, OpenAI),
for GPUs and clusters. Concurrency, retries with backoff, ``Retry-After`` and the token ledger come from the
``openai`` teacher's client (:mod:`reclm.llm.teachers.openai_compat`), and so do the spending cap
(``max_cost`` with ``price_in`` / ``price_out``) and the rule that a key never goes in clear to another machine.
A prompt that still fails after its retries comes back as ``None`` (the runner neither caches nor writes it,
so the next run asks again).

``base_url`` may list several servers running the same model (N vLLM / llama.cpp replicas used as one): each
request goes to the one with the fewest requests in flight (ties: round robin), at most ``concurrency`` in
flight on each. A server whose request fails at the connection level (refused, reset, a timeout) or after its
retries is left out for ``cooldown`` seconds and the prompt is asked of another; a prompt comes back as
``None`` only when every server it could go to is down (or it failed for its own sake: a 4xx). With one URL
nothing changes: connection errors are retried on it with backoff, and it is never left out.

The generation cache cannot see what the server runs, so the caller names it: ``adapter`` (the LoRA adapter
folder the server has loaded; its content hash goes into the key, so a retrained writer re-served under the
same name, or another ablation variant, never gets the old answers) or a ``fingerprint`` of its own. Without
either the generator is not cacheable: every run asks the server again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from os import PathLike
from typing import ClassVar

import httpx

from reclm.llm.chat import SYSTEM_PROMPT, Prompt, as_conversation
from reclm.llm.generation.base import DecodeParams, GenerationStopped, Generator, finish
from reclm.llm.teachers.openai_compat import (
    ChatClient,
    EndpointConfig,
    Ledger,
    RequestFailed,
    SpendingCapReached,
    run_coroutine,
    tokens,
)


@dataclass
class GenerationEndpoint(EndpointConfig):
    """An endpoint plus the decoding options of one ``generate`` call; prompts may be conversations.
    ``base_url``: one URL or a list of servers serving the same model (see the module docstring);
    ``cooldown``: seconds a server that failed is left out when there are several."""

    base_url: str | list[str] = "http://127.0.0.1:8000/v1"  # type: ignore[assignment]
    model: str = "default"
    api_key_env: str | None = "OPENAI_API_KEY"
    concurrency: int = 8
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    repetition_penalty: float = 1.0  # sent as vLLM's `repetition_penalty` field when not 1 (no OpenAI equivalent)
    system: str | None = SYSTEM_PROMPT
    fingerprint: str | None = None  # what the server runs (the adapter's content hash): part of the cache key
    cooldown: float = 30.0
    cap_hint: ClassVar[str] = "the generator's max_cost"

    def __post_init__(self) -> None:
        if not isinstance(self.base_url, str):
            self.base_url = list(self.base_url)
            if not self.base_url:
                raise ValueError("base_url: an empty list; expected one URL or more")
            bare = [str(url).rstrip("/") for url in self.base_url]
            if len(set(bare)) != len(bare):
                raise ValueError(f"base_url {self.base_url}: a URL is listed twice")
        if not self.cooldown >= 0:
            raise ValueError(f"cooldown {self.cooldown}: expected 0 or more seconds")
        super().__post_init__()

    @property
    def urls(self) -> list[str]:
        return [self.base_url] if isinstance(self.base_url, str) else list(self.base_url)

    def body(self, prompt: Prompt) -> dict:  # type: ignore[override]
        body = {
            "model": self.model,
            "messages": as_conversation(prompt, self.system),
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        if self.temperature > 0:
            body["top_p"] = self.top_p
            if self.seed is not None:
                body["seed"] = self.seed
        if self.stop:
            body["stop"] = list(self.stop)
        if self.repetition_penalty != 1.0:
            body["repetition_penalty"] = self.repetition_penalty
        return body


@dataclass
class Replica:
    """One server of the endpoint: requests in flight, until when it is left out after failing, and what it did."""

    url: str
    inflight: int = 0
    down_until: float = 0.0
    sent: int = 0  # prompts handed to it (each may take several HTTP requests: retries)
    answered: int = 0
    downs: int = 0  # times it went down (was left out)


class OpenAIGenerator(Generator):
    backend = "openai"

    def __init__(
        self, endpoint: GenerationEndpoint | None = None, adapter: str | PathLike | None = None, **options: object
    ):
        super().__init__()
        self.endpoint = endpoint or GenerationEndpoint(**options)  # type: ignore[arg-type]
        if adapter is not None:
            from reclm.llm.model import adapter_identity

            self.endpoint = replace(self.endpoint, fingerprint=f"adapter={adapter_identity(adapter)}")
        self.endpoint.headers()  # refuses to send a key in clear (to any of the URLs) before any request
        self.system = self.endpoint.system
        self.ledger = Ledger(
            model=self.endpoint.model,
            base_url=", ".join(self.endpoint.urls),
            price_in=self.endpoint.price_in,
            price_out=self.endpoint.price_out,
        )
        self.failed = 0
        # kept across generate calls (the runner sends chunks): a server left out stays out for its cool-down
        self.replicas = [Replica(url) for url in self.endpoint.urls]
        self.turn = 0  # where round robin starts among servers equally loaded

    @property
    def cacheable(self) -> bool:  # type: ignore[override]
        return self.endpoint.fingerprint is not None

    @property
    def identity(self) -> str:
        """With a fingerprint (what a cached generator has): the served model and the fingerprint, not the URLs,
        since replicas serving the same adapter answer alike, so adding, dropping or moving a server keeps the
        cache. Without one nothing is cached, and the identity (in the stats only) names the sorted URLs."""
        if self.endpoint.fingerprint is not None:
            return f"openai|{self.endpoint.model}|{self.endpoint.fingerprint}"
        urls = ",".join(sorted(url.rstrip("/") for url in self.endpoint.urls))
        return f"openai|{urls}|{self.endpoint.model}|unknown"

    def generate(self, prompts: Sequence[Prompt], params: DecodeParams) -> list[str | None]:  # type: ignore[override]
        config = replace(
            self.endpoint,
            temperature=params.temperature,
            max_tokens=params.max_new_tokens,
            top_p=params.top_p,
            seed=None if params.greedy else params.seed,
            stop=["\n"] if params.single_line else [],
            repetition_penalty=params.repetition_penalty,
        )
        client = ChatClient(config, self.ledger)
        replicas, several = self.replicas, len(self.replicas) > 1
        answers: list = [None] * len(prompts)
        not_asked = 0

        async def main() -> None:
            changed = asyncio.Condition()  # a slot freed or a server left out

            async def pick(tried: set[str]) -> Replica | None:
                """The live server with the fewest requests in flight that this prompt has not failed on (waits
                while all are full); None when there is none."""
                async with changed:
                    while True:
                        now = time.monotonic()
                        live = [r for r in replicas if r.url not in tried and r.down_until <= now]
                        if not live:
                            return None
                        free = [r for r in live if r.inflight < config.concurrency]
                        if free:
                            order = {r.url: (i - self.turn) % len(replicas) for i, r in enumerate(replicas)}
                            chosen = min(free, key=lambda r: (r.inflight, order[r.url]))
                            self.turn = (replicas.index(chosen) + 1) % len(replicas)
                            chosen.inflight += 1
                            chosen.sent += 1
                            return chosen
                        back = [r.down_until - now for r in replicas if r.url not in tried and r.down_until > now]
                        with contextlib.suppress(TimeoutError):  # wake when a slot frees or a cool-down ends
                            await asyncio.wait_for(changed.wait(), min(back) if back else None)

            async def release(replica: Replica, down: bool) -> None:
                async with changed:
                    replica.inflight -= 1
                    if down:
                        now = time.monotonic()
                        replica.downs += replica.down_until <= now  # requests in flight may fail after it went down
                        replica.down_until = now + config.cooldown
                    changed.notify_all()

            async def one(http: httpx.AsyncClient, prompt: Prompt):
                nonlocal not_asked
                tried: set[str] = set()
                while (replica := await pick(tried)) is not None:
                    down = False
                    try:
                        answer = await client.ask(http, prompt, replica.url, failover=several)  # type: ignore[arg-type]
                    except RequestFailed as exc:
                        down = several and exc.endpoint_down
                        if not down:  # the prompt's own failure (a 4xx): another server would answer alike
                            return None
                        tried.add(replica.url)
                        continue
                    except SpendingCapReached:
                        not_asked += 1
                        return None
                    else:
                        replica.answered += 1
                        return answer
                    finally:
                        await release(replica, down)
                return None  # every server is down, or failed on this prompt

            queue = deque(enumerate(prompts))
            workers = min(len(prompts), len(replicas) * config.concurrency)
            limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
            async with httpx.AsyncClient(timeout=config.timeout, limits=limits) as http:

                async def worker() -> None:
                    while queue:
                        index, prompt = queue.popleft()
                        answers[index] = await one(http, prompt)

                tasks = [asyncio.create_task(worker()) for _ in range(workers)]
                try:
                    await asyncio.gather(*tasks)
                except BaseException:  # an EndpointError (bad key, model or URL): stop the others too
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                    raise

        if prompts:
            run_coroutine(main())
        outputs: list[str | None] = []
        for answer in answers:
            if answer is None:
                outputs.append(None)
                continue
            self.prompt_tokens += tokens(answer.usage.get("prompt_tokens"))
            self.new_tokens += tokens(answer.usage.get("completion_tokens"))
            outputs.append(finish(answer.text, params))
        self.failed += outputs.count(None) - not_asked
        if not_asked:  # the answers bought before the cap go to the runner, which caches them
            raise GenerationStopped(client.cap_message(f"{not_asked} prompts not asked"), outputs)
        return outputs
