"""Profile generation sharded over a real local Ray (2 CPUs) on the tiny model: the same texts, records and cache
as one process, and a worker killed mid-run costs only its unfinished shard."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
from pathlib import Path

import pytest

from reclm.llm.generation import DecodeParams, GenerationCache, Job, generate_records, generate_texts, make_generator
from reclm.llm.records import read_records

ray = pytest.importorskip("ray")

from reclm.llm.generation.ray_runner import GeneratorSpec, RayGenerator  # noqa: E402

# the workers cannot import this test module: its spec subclass travels by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

PARAMS = DecodeParams(max_new_tokens=6)
OPTIONS = {"quantization": "float32", "device": "cpu"}
PROMPTS = [f"History: item {k}{', sequel' * (k % 4)}." for k in range(12)]  # 12 distinct, of several lengths


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def local_generator(tiny_model):
    return make_generator("ct2", tiny_model, batch_size=4, **OPTIONS)


@pytest.fixture(scope="module")
def local_texts(local_generator, tmp_path_factory):
    cache = GenerationCache(tmp_path_factory.mktemp("local") / "gen.sqlite")
    return generate_texts(local_generator, PROMPTS, PARAMS, cache, chunk_size=2, progress=False)[0]


@dataclasses.dataclass
class KillableSpec(GeneratorSpec):
    """Test-only: a worker kills its own process (SIGKILL) when a shard arrives while the file ``trigger``
    exists (the first to rename it away does), and logs every prompt it answered to ``log``, one per line."""

    trigger: str = ""
    log: str = ""

    def build(self):
        return Killable(super().build(), self)


class Killable:
    def __init__(self, inner, spec: KillableSpec):
        self.inner, self.spec = inner, spec
        self.identity, self.system = inner.identity, inner.system

    @property
    def prompt_tokens(self):
        return self.inner.prompt_tokens

    @property
    def new_tokens(self):
        return self.inner.new_tokens

    def generate(self, prompts, params):
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.spec.trigger, f"{self.spec.trigger}.pulled")
            os.kill(os.getpid(), signal.SIGKILL)
        texts = self.inner.generate(prompts, params)
        with open(self.spec.log, "a") as log:
            log.write("".join(f"{p}\n" for p in prompts))
        return texts

    def close(self):
        self.inner.close()


class KillAfterFirstShard(GenerationCache):
    """The driver's cache, which pulls the trigger once the first shard is stored: the next shard a worker
    takes kills it."""

    def __init__(self, path: Path, trigger: Path):
        super().__init__(path)
        self.trigger = trigger

    def put(self, generator, params, items):
        super().put(generator, params, items)
        if not Path(f"{self.trigger}.pulled").exists():
            self.trigger.touch()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ray-generation")


@pytest.fixture(scope="module")
def pool(local_ray, tiny_model, folder):
    """Two workers (one restart each), shared by the tests (each start loads torch and the model); half a Ray
    CPU each, so that another worker can start beside them."""
    spec = KillableSpec("ct2", str(tiny_model), None, 4, OPTIONS, str(folder / "trigger"), str(folder / "log"))
    with RayGenerator(spec, workers=2, cpus_per_worker=0.5, max_restarts=1) as generator:
        yield generator


def generated(log: Path) -> list[str]:
    """Prompts the workers answered, sorted, then forgotten (the next test counts its own)."""
    lines = sorted(log.read_text().splitlines()) if log.is_file() else []
    log.unlink(missing_ok=True)
    return lines


def cache_rows(cache: GenerationCache) -> list[tuple]:
    return sorted(cache.db.execute("SELECT * FROM gen").fetchall())


def test_ray_generation_writes_what_local_generation_writes(pool, local_generator, folder, tmp_path):
    jobs = [Job("user", str(k), p) for k, p in enumerate(PROMPTS + PROMPTS[:3])]  # 3 repeated prompts
    local_cache = GenerationCache(tmp_path / "local.sqlite")
    generate_records(local_generator, jobs, PARAMS, tmp_path / "local.jsonl", local_cache, chunk_size=2,
                     progress=False)  # fmt: skip
    assert pool.identity == local_generator.identity and len(set(pool.pids())) == 2
    cache = GenerationCache(tmp_path / "ray.sqlite")
    stats = generate_records(pool, jobs, PARAMS, tmp_path / "ray.jsonl", cache, chunk_size=2, progress=False)
    assert (stats.jobs, stats.distinct, stats.cached, stats.generated, stats.failed) == (15, 12, 0, 12, 0)
    assert stats.new_tokens > 0 and pool.resubmitted == 0 and generated(folder / "log") == sorted(PROMPTS)
    again = generate_records(pool, jobs, PARAMS, tmp_path / "again.jsonl", cache, progress=False)
    assert (again.cached, again.generated) == (12, 0) and generated(folder / "log") == []
    local = [r.to_dict() for r in read_records(tmp_path / "local.jsonl")]
    assert [r.to_dict() for r in read_records(tmp_path / "ray.jsonl")] == local
    assert [r.to_dict() for r in read_records(tmp_path / "again.jsonl")] == local
    assert cache_rows(cache) == cache_rows(local_cache)


def test_a_worker_killed_mid_run_costs_only_its_unfinished_shard(pool, local_texts, folder, tmp_path):
    cache = KillAfterFirstShard(tmp_path / "gen.sqlite", folder / "trigger")
    pids = pool.pids()
    texts, stats = generate_texts(pool, PROMPTS, PARAMS, cache, chunk_size=2, progress=False)
    assert (folder / "trigger.pulled").is_file() and pool.resubmitted == 1  # the killed worker's shard, once
    assert len(set(pool.pids(timeout=600)) - set(pids)) == 1  # restarted: slow when Ray workers (nice 15) share the CPU
    assert texts == local_texts and (stats.generated, stats.failed) == (12, 0) and cache.count() == 12
    assert generated(folder / "log") == sorted(PROMPTS)  # each prompt answered once: nothing finished was redone


def test_a_run_whose_workers_all_died_resumes_where_it_stopped(local_ray, tiny_model, local_generator, local_texts,
                                                               tmp_path):  # fmt: skip
    spec = KillableSpec("ct2", str(tiny_model), None, 4, OPTIONS, str(tmp_path / "trigger"), str(tmp_path / "log"))
    cache = KillAfterFirstShard(tmp_path / "gen.sqlite", tmp_path / "trigger")
    lone = RayGenerator(spec, workers=1, cpus_per_worker=0.5, max_restarts=0)  # beside the shared pool's CPU
    with lone, pytest.raises(RuntimeError, match="every generation worker died"):
        generate_texts(lone, PROMPTS, PARAMS, cache, chunk_size=2, progress=False)
    assert cache.count() == 2 and len(generated(tmp_path / "log")) == 2  # the first shard, cached by the driver
    # the cache is the one a local run reads: the rest is generated here, in this process
    texts, stats = generate_texts(local_generator, PROMPTS, PARAMS, cache, chunk_size=2, progress=False)
    assert (stats.cached, stats.generated) == (2, 10) and texts == local_texts


def test_the_profiles_stage_on_ray_hands_its_workers_the_local_generator_and_keeps_its_key(monkeypatch):
    from reclm.llm import generation
    from reclm.llm.generation import ray_runner
    from reclm.pipeline.config import PipelineConfig
    from reclm.pipeline.stages.generation import profile_generator
    from reclm.pipeline.table import build_stages

    made = []
    monkeypatch.setattr(ray_runner, "RayGenerator", lambda spec, **options: made.append((spec, options)) or spec)
    monkeypatch.setattr(generation, "make_generator", lambda *args, **options: (args, options))
    settings = {"threads": 3, "generation": {"quantization": "float32"}}
    local = PipelineConfig.model_validate(settings)
    ray_section = {"address": "ray://head:10001", "cpus_per_run": 2}
    on_ray = PipelineConfig.model_validate({**settings, "executor": "ray", "ray": ray_section})
    spec = profile_generator(generation, on_ray, Path("run/sft/adapter"))
    args, options = profile_generator(generation, local, Path("run/sft/adapter"))
    assert (spec.backend, spec.model, spec.adapter, spec.batch_size) == (*args[:2], "run/sft/adapter", args[3])
    assert spec.options == {k: v for k, v in options.items() if k != "threads"} == {"quantization": "float32"}
    assert made[0][1] == {"address": "ray://head:10001", "cpus_per_worker": 2, "gpus_per_worker": 0, "num_cpus": 3}
    profiles = next(s for s in build_stages() if s.name == "profiles")
    assert profiles.config(on_ray) == profiles.config(local)


def test_openai_limits_hold_for_all_workers_together(local_ray):
    """Each actor's OpenAI generator would otherwise allow the whole ``concurrency`` and ``max_cost``."""
    from reclm.llm.generation.openai import GenerationEndpoint
    from reclm.llm.generation.ray_runner import shared_limits

    url = "http://127.0.0.1:9/v1"  # never asked: building the generators sends nothing
    spec = GeneratorSpec.of("openai", "served", None, 4, base_url=url, api_key_env=None, concurrency=8, max_cost=1.5)
    with RayGenerator(spec, workers=3, cpus_per_worker=0.5) as generator:
        assert generator.spec.options["concurrency"] == 2 and generator.spec.options["max_cost"] == 0.5
        assert generator.identity.startswith("openai")
    endpoint = GenerationEndpoint(base_url=url, api_key_env=None, concurrency=2)
    shared = shared_limits(GeneratorSpec.of("openai", None, None, 4, endpoint=endpoint), 4)
    assert shared.options["endpoint"].concurrency == 1 and shared.options["endpoint"].max_cost is None
    local = GeneratorSpec.of("ct2", "model", None, 4, threads=2)
    assert shared_limits(local, 4) == local


def test_the_profiles_stage_keeps_an_openai_generation_in_the_driver_on_ray():
    from reclm.llm import generation
    from reclm.llm.generation.openai import OpenAIGenerator
    from reclm.pipeline.config import PipelineConfig
    from reclm.pipeline.stages.generation import profile_generator

    on_ray = PipelineConfig.model_validate(
        {"executor": "ray", "generation": {"backend": "openai", "served_model": "m", "api_key_env": None}}
    )
    generator = profile_generator(generation, on_ray, None)
    assert isinstance(generator, OpenAIGenerator) and generator.endpoint.concurrency == 8
