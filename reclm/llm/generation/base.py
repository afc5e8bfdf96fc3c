"""The one generation interface: ``Generator.generate(prompts, params) -> texts``.

A prompt is a user message (``str``) or a conversation (see :mod:`reclm.llm.chat`); each backend applies
the chat template with our short system prompt. Profiles are one line, so by default decoding stops at the
first newline as well as at the end-of-turn token (``DecodeParams.single_line``): both local backends stop on
the same token set, which is what keeps their greedy outputs identical.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from reclm.llm.chat import SYSTEM_PROMPT, Prompt


@dataclass(frozen=True)
class DecodeParams:
    """``temperature`` 0 is greedy; otherwise sampling with ``top_p`` / ``top_k`` (0: off) and a fixed ``seed``.
    ``repetition_penalty`` > 1 divides the scores of tokens already in the sequence (CTRL's penalty, as in
    transformers and CTranslate2): a small writer's greedy lists stop repeating entries ("Movie lover, Movie
    lover, ..."); 1 is off (docs/results.md, "Repetition penalty")."""

    max_new_tokens: int = 48
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    single_line: bool = True
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (got {self.repetition_penalty}; 1 is off)")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def key(self) -> str:
        """Canonical text of the parameters that change an output (the seed only matters when sampling)."""
        values = asdict(self)
        if self.greedy:
            values.update(top_p=1.0, top_k=0, seed=0)
        if self.repetition_penalty == 1.0:  # off: the key profiles had before the setting existed
            del values["repetition_penalty"]
        return json.dumps(values, sort_keys=True)


def prompt_key(prompt: Prompt, system: str | None = SYSTEM_PROMPT) -> str:
    """Hash of a prompt as the model sees it (the message(s) and the system prompt)."""
    text = json.dumps([system, prompt], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def local_identity(engine: str, model: Any, adapter: Any) -> str:
    """``<engine>|<model>@<fingerprint>|adapter=<fingerprint>``: what the generation cache files a local
    backend's outputs under (``engine`` names the backend and its precision, e.g. ``ct2-int8``)."""
    from reclm.llm.model import adapter_identity, model_identity

    return f"{engine}|{model_identity(model)}|adapter={adapter_identity(adapter)}"


def finish(text: str, params: DecodeParams) -> str:
    """A generated text cut at the first newline (single-line outputs) and stripped."""
    if params.single_line:
        text = text.split("\n", 1)[0]
    return text.strip()


def stop_token_ids(tokenizer: Any, single_line: bool, extra: Sequence[int] = ()) -> list[int]:
    """End-of-turn / end-of-text ids, plus (single-line) every vocabulary token whose text has a newline."""
    ids = set(extra)
    for token in (tokenizer.eos_token, "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"):
        if token is None:
            continue
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    if single_line:
        ids |= newline_token_ids(tokenizer)
    return sorted(ids)


_NEWLINE_CACHE: dict[tuple[str, int], frozenset[int]] = {}


def newline_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of tokens that decode to text containing a newline (computed once per tokenizer)."""
    key = (str(getattr(tokenizer, "name_or_path", "")), len(tokenizer))
    if key not in _NEWLINE_CACHE:
        size = len(tokenizer)
        texts = tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=False)
        _NEWLINE_CACHE[key] = frozenset(i for i, text in enumerate(texts) if "\n" in text)
    return _NEWLINE_CACHE[key]


class GenerationStopped(ValueError):
    """Generation stopped before every prompt was answered (a spending cap): ``texts`` holds the answers of the
    call so far (``None`` where none), which the runner caches before passing the error on."""

    def __init__(self, message: str, texts: Sequence[str | None]):
        super().__init__(message)
        self.texts = list(texts)


class Generator(ABC):
    """A text generator over chat prompts. ``identity`` names everything that changes its outputs besides the
    prompt and the decoding parameters (backend, base model, adapter, precision): the cache key. A generator
    that cannot name what writes its outputs (a served model of unknown origin) is not ``cacheable``."""

    backend: str = "base"
    system: str | None = SYSTEM_PROMPT
    cacheable: bool = True

    def __init__(self) -> None:
        self.prompt_tokens = 0  # running totals, for tokens/s reports
        self.new_tokens = 0

    @property
    @abstractmethod
    def identity(self) -> str: ...

    @abstractmethod
    def generate(self, prompts: Sequence[Prompt], params: DecodeParams) -> list[str]: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (threads, connections, servers)."""

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Positions grouped into batches of similar length (ascending), so little padding or ragged prefill."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
