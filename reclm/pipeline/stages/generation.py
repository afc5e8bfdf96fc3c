"""Which generation backend, batch size and precision the run's profile writers use, and building them."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from reclm.pipeline.config import PipelineConfig
from reclm.pipeline.stages.common import local_ray_cpus, user_generator


def writer_options(cfg: PipelineConfig) -> dict[str, Any]:
    """ProfileWriter options of collaborative tuning's distilled profiles (also in its cache key)."""
    return {
        "batch_size": generation_batch_size(cfg),
        "max_new_tokens": cfg.generation.max_new_tokens,
        **precision_key(cfg),
    }


def on_cuda() -> bool:
    from reclm.llm.model import resolve_device

    return resolve_device(None).startswith("cuda")


def generation_backend(cfg: PipelineConfig) -> str:
    """``generation.backend`` with ``auto`` resolved on this machine: transformers on CUDA, else ctranslate2.
    Stage keys hold the resolved value (the outputs differ between backends)."""
    backend = cfg.generation.backend
    if backend != "auto":
        return backend
    return "transformers" if on_cuda() else "ctranslate2"


def generation_batch_size(cfg: PipelineConfig) -> int:
    """``generation.batch_size``, or for ``null`` 256 on CUDA and 16 on CPU."""
    size = cfg.generation.batch_size
    if size is not None:
        return size
    return 256 if on_cuda() else 16


def generation_quantization(cfg: PipelineConfig) -> str | None:
    """The CTranslate2 precision the profiles are written at (``auto`` resolved: it depends on the CPU)."""
    if generation_backend(cfg) != "ctranslate2":
        return None
    from reclm.llm.generation.ct2 import ct2_device, default_quantization

    return cfg.generation.quantization or default_quantization(ct2_device(None))


def precision_key(cfg: PipelineConfig) -> dict[str, str]:
    """``{"quantization": q}`` for stage keys when CTranslate2 writes at ``q`` other than int8, else empty:
    int8 was the only CPU precision before it came to depend on the CPU, so runs made at int8 keep their keys."""
    quantization = generation_quantization(cfg)
    return {} if quantization in (None, "int8") else {"quantization": quantization}


def writer_backend(cfg: PipelineConfig) -> str:
    """The local backend that writes the distilled profiles collaborative tuning needs: the generation
    backend, except ``openai`` (a served model has no SFT adapter to apply), then transformers."""
    backend = generation_backend(cfg)
    return "transformers" if backend == "openai" else backend


def profiles_executor(cfg: PipelineConfig) -> Any:
    """``executor: ray`` with something to generate: one Ray session for the whole stage (a local Ray is
    started once for users and items, and stopped with its workers when the stage ends or fails); else none.
    Not part of the stage's key: Ray workers write the same profiles (reclm.llm.generation.ray_runner)."""
    if cfg.executor != "ray" or (user_generator(cfg) is None and not cfg.stages.item_side):
        return contextlib.nullcontext()
    from reclm.distributed import ray_session

    return ray_session(cfg.ray.address, local_ray_cpus(cfg))


def user_writers(cfg: PipelineConfig) -> list[str]:
    """The stages whose adapters write the user profiles, in the order the profiles stage runs them: the
    last generator, then (with ``stages.ablation``) each earlier one."""
    chain = cfg.stages.generators()
    return [chain[-1], *chain[:-1]] if chain and cfg.stages.ablation else chain[-1:]


def decode_params(cfg: PipelineConfig) -> Any:
    """The profiles stage's decoding parameters (part of every generation-cache key)."""
    from reclm.llm.generation import DecodeParams

    gen = cfg.generation
    return DecodeParams(gen.max_new_tokens, gen.temperature, gen.top_p, 0, gen.seed)


def profile_generator(generation: Any, cfg: PipelineConfig, adapter: Path | None) -> Any:
    """The profiles' generator: :func:`make_generator`'s, or with ``executor: ray`` a pool of Ray workers that
    each build that same generator themselves (reclm.llm.generation.ray_runner), ``ray.cpus_per_run`` CPUs
    (its threads) and ``ray.gpus_per_run`` GPUs each, as many as the cluster holds: same cache identity,
    same texts, the cache written by this process only. The ``openai`` backend stays in this process even
    then: it already spreads its requests over the servers, and N actors would send N times
    ``generation.concurrency`` to each."""
    if cfg.executor != "ray" or generation_backend(cfg) == "openai":
        return make_generator(generation, cfg, adapter)
    from types import SimpleNamespace

    from reclm.llm.generation.ray_runner import GeneratorSpec, RayGenerator

    spec = make_generator(SimpleNamespace(make_generator=GeneratorSpec.of), cfg, adapter)  # its arguments
    spec.options.pop("threads", None)  # a worker's threads: its Ray CPUs
    ray = cfg.ray
    return RayGenerator(
        spec, address=ray.address, cpus_per_worker=ray.cpus_per_run, gpus_per_worker=ray.gpus_per_run,
        num_cpus=local_ray_cpus(cfg),
    )  # fmt: skip


def make_generator(generation: Any, cfg: PipelineConfig, adapter: Path | None) -> Any:
    gen, backend = cfg.generation, generation_backend(cfg)
    if backend == "openai":
        options: dict[str, Any] = {
            "base_url": gen.base_url,
            "api_key_env": gen.api_key_env,
            "concurrency": gen.concurrency,
            "cooldown": gen.cooldown,
        }
        return generation.make_generator("openai", gen.served_model, adapter, generation_batch_size(cfg), **options)
    options = {"threads": cfg.threads}
    if backend == "ctranslate2" and gen.quantization:
        options["quantization"] = gen.quantization
    return generation.make_generator(backend, cfg.llm.base_model, adapter, generation_batch_size(cfg), **options)
