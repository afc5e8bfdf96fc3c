"""Remote backend: any OpenAI-compatible chat-completions endpoint (vLLM, Ollama, a llama.cpp server, OpenAI),
for GPUs and clusters. Concurrency, retries with backoff, ``Retry-After`` and the token ledger come from the
``openai`` teacher's client (:mod:`reclm.llm.teachers.openai_compat`), and so do the spending cap
(``max_cost`` with ``price_in`` / ``price_out``) and the rule that a key never goes in clear to another machine.
A prompt that still fails after its retries comes back as ``None`` (the runner neither caches nor writes it,
so the next run asks again).

The generation cache cannot see what the server runs, so the caller names it: ``adapter`` (the LoRA adapter
folder the server has loaded; its content hash goes into the key, so a retrained writer re-served under the
same name, or another ablation variant, never gets the old answers) or a ``fingerprint`` of its own. Without
either the generator is not cacheable: every run asks the server again.
"""

from __future__ import annotations

import asyncio
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
    """An endpoint plus the decoding options of one ``generate`` call; prompts may be conversations."""

    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "default"
    api_key_env: str | None = "OPENAI_API_KEY"
    concurrency: int = 8
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    system: str | None = SYSTEM_PROMPT
    fingerprint: str | None = None  # what the server runs (the adapter's content hash): part of the cache key
    cap_hint: ClassVar[str] = "the generator's max_cost"

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
        return body


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
        self.endpoint.headers()  # refuses to send a key in clear before any request
        self.system = self.endpoint.system
        self.ledger = Ledger(
            model=self.endpoint.model,
            base_url=self.endpoint.base_url,
            price_in=self.endpoint.price_in,
            price_out=self.endpoint.price_out,
        )
        self.failed = 0

    @property
    def cacheable(self) -> bool:  # type: ignore[override]
        return self.endpoint.fingerprint is not None

    @property
    def identity(self) -> str:
        served = self.endpoint.fingerprint or "unknown"
        return f"openai|{self.endpoint.base_url.rstrip('/')}|{self.endpoint.model}|{served}"

    def generate(self, prompts: Sequence[Prompt], params: DecodeParams) -> list[str | None]:  # type: ignore[override]
        config = replace(
            self.endpoint,
            temperature=params.temperature,
            max_tokens=params.max_new_tokens,
            top_p=params.top_p,
            seed=None if params.greedy else params.seed,
            stop=["\n"] if params.single_line else [],
        )
        client = ChatClient(config, self.ledger)
        not_asked = 0

        async def main() -> list:
            gate = asyncio.Semaphore(config.concurrency)
            async with httpx.AsyncClient(timeout=config.timeout) as http:

                async def one(prompt: Prompt):
                    nonlocal not_asked
                    async with gate:
                        try:
                            return await client.ask(http, prompt)  # type: ignore[arg-type]
                        except RequestFailed:
                            return None
                        except SpendingCapReached:
                            not_asked += 1
                            return None

                return await asyncio.gather(*(one(p) for p in prompts))

        answers = run_coroutine(main())
        outputs: list[str | None] = []
        for answer in answers:  # type: ignore[union-attr]
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
