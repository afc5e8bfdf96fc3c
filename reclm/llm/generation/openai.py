"""Remote backend: any OpenAI-compatible chat-completions endpoint (vLLM, Ollama, a llama.cpp server, OpenAI),
for GPUs and clusters. Concurrency, retries with backoff, ``Retry-After`` and the token ledger come from the
``openai`` teacher's client (:mod:`reclm.llm.teachers.openai_compat`). A prompt that still fails after its
retries comes back as ``None`` (the runner neither caches nor writes it, so the next run asks again).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import httpx

from reclm.llm.chat import SYSTEM_PROMPT, Prompt, as_conversation
from reclm.llm.generation.base import DecodeParams, Generator, finish
from reclm.llm.teachers.openai_compat import ChatClient, EndpointConfig, Ledger, RequestFailed, run_coroutine


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

    def __init__(self, endpoint: GenerationEndpoint | None = None, **options: object):
        super().__init__()
        self.endpoint = endpoint or GenerationEndpoint(**options)  # type: ignore[arg-type]
        self.system = self.endpoint.system
        self.ledger = Ledger(model=self.endpoint.model, base_url=self.endpoint.base_url)
        self.failed = 0

    @property
    def identity(self) -> str:
        return f"openai|{self.endpoint.base_url.rstrip('/')}|{self.endpoint.model}"

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

        async def main() -> list:
            gate = asyncio.Semaphore(config.concurrency)
            async with httpx.AsyncClient(timeout=config.timeout) as http:

                async def one(prompt: Prompt):
                    async with gate:
                        try:
                            return await client.ask(http, prompt)  # type: ignore[arg-type]
                        except RequestFailed:
                            return None

                return await asyncio.gather(*(one(p) for p in prompts))

        answers = run_coroutine(main())
        outputs: list[str | None] = []
        for answer in answers:  # type: ignore[union-attr]
            if answer is None:
                self.failed += 1
                outputs.append(None)
                continue
            self.ledger.usage(answer.usage)
            self.ledger.answered += 1
            self.prompt_tokens += int(answer.usage.get("prompt_tokens") or 0)
            self.new_tokens += int(answer.usage.get("completion_tokens") or 0)
            outputs.append(finish(answer.text, params))
        return outputs
