"""Profile generation: one interface over three backends, and a cached, deduplicated, resumable runner.

- :class:`~reclm.llm.generation.hf.TransformersGenerator`: the reference (transformers ``generate``).
- :class:`~reclm.llm.generation.ct2.CT2Generator`: the fast CPU backend (CTranslate2 int8, adapter merged).
- :class:`~reclm.llm.generation.openai.OpenAIGenerator`: any OpenAI-compatible endpoint (vLLM, Ollama...).
"""

from __future__ import annotations

import os
from typing import Any

from reclm.llm.generation.base import DecodeParams, Generator, local_identity, prompt_key
from reclm.llm.generation.runner import GenerationCache, GenerationStats, Job, generate_records, generate_texts

BACKENDS = ("ct2", "transformers", "openai")
ALIASES = {"ctranslate2": "ct2", "hf": "transformers"}


def make_generator(
    backend: str,
    model: str | os.PathLike | None = None,
    adapter: str | os.PathLike | None = None,
    batch_size: int = 16,
    **options: Any,
) -> Generator:
    """A generator by backend name (``ct2`` | ``transformers`` | ``openai``; ``ctranslate2`` is accepted too).
    ``openai`` takes endpoint options (``base_url``, ``model`` = the served model name, ``concurrency``,
    ``max_cost``...); its ``adapter`` is the one the server has loaded: not applied here, only fingerprinted
    into the cache key (without it, or a ``fingerprint`` option, nothing it writes is cached)."""
    from reclm.llm.model import DEFAULT_MODEL

    backend = ALIASES.get(backend, backend)
    if backend == "ct2":
        from reclm.llm.generation.ct2 import CT2Generator

        return CT2Generator(model or DEFAULT_MODEL, adapter, batch_size=batch_size, **options)
    if backend == "transformers":
        from reclm.llm.generation.hf import TransformersGenerator

        return TransformersGenerator(model or DEFAULT_MODEL, adapter, batch_size=batch_size, **options)
    if backend == "openai":
        from reclm.llm.generation.openai import OpenAIGenerator

        if model is not None:
            options["model"] = str(model)
        return OpenAIGenerator(adapter=adapter, **options)
    raise ValueError(f"unknown generation backend {backend!r}: expected one of {', '.join(BACKENDS)}")


def cache_identity(
    backend: str,
    model: str | os.PathLike | None = None,
    adapter: str | os.PathLike | None = None,
    device: str | None = None,
    quantization: str | None = None,
) -> str | None:
    """The identity a local generator would file its outputs under in the generation cache, computed
    without loading it (a dry run counts what a resumed run finds cached); None for ``openai``."""
    from reclm.llm.model import DEFAULT_MODEL, default_dtype, resolve_device

    backend, model = ALIASES.get(backend, backend), model or DEFAULT_MODEL
    if backend == "ct2":
        from reclm.llm.generation.ct2 import ct2_device, default_quantization

        return local_identity(f"ct2-{quantization or default_quantization(ct2_device(device))}", model, adapter)
    if backend == "transformers":
        dtype = str(default_dtype(resolve_device(device))).replace("torch.", "")
        return local_identity(f"transformers-{dtype}", model, adapter)
    return None


__all__ = [
    "BACKENDS",
    "DecodeParams",
    "GenerationCache",
    "GenerationStats",
    "Generator",
    "Job",
    "cache_identity",
    "generate_records",
    "generate_texts",
    "make_generator",
    "prompt_key",
]
