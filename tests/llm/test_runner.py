"""The generation runner on a real tiny model: deduplication, the on-disk cache, resuming after a crash."""

from __future__ import annotations

import pytest

from reclm.llm.generation import DecodeParams, GenerationCache, Job, generate_records, generate_texts
from reclm.llm.generation.ct2 import CT2Generator
from reclm.llm.records import read_records

PARAMS = DecodeParams(max_new_tokens=6)


@pytest.fixture(scope="module")
def generator(tiny_model):
    return CT2Generator(tiny_model, quantization="float32", batch_size=4, device="cpu")


def jobs() -> list[Job]:
    prompts = ["History: A, B.", "History: C.", "History: A, B.", "History: D, E, F.", "History: C.", "Hi"]
    return [Job("user", str(100 + k), p) for k, p in enumerate(prompts)]


def test_identical_prompts_are_generated_once_and_cached(generator, tmp_path):
    cache = GenerationCache(tmp_path / "gen.sqlite")
    before = generator.new_tokens
    stats = generate_records(generator, jobs(), PARAMS, tmp_path / "users.jsonl", cache, chunk_size=2, progress=False)
    assert (stats.jobs, stats.distinct, stats.cached, stats.generated, stats.failed) == (6, 4, 0, 4, 0)
    assert stats.new_tokens == generator.new_tokens - before > 0 and stats.profiles_per_s > 0
    records = read_records(tmp_path / "users.jsonl")
    assert [r.id for r in records] == [str(100 + k) for k in range(6)]
    assert records[0].profile == records[2].profile and records[1].profile == records[4].profile
    assert records[0].prompt == "History: A, B." and records[0].kind == "user"
    assert cache.count(generator.identity) == 4

    # a second run generates nothing and writes the same records
    tokens = generator.new_tokens
    again = generate_records(generator, jobs(), PARAMS, tmp_path / "again.jsonl", cache, progress=False)
    assert (again.cached, again.generated) == (4, 0) and generator.new_tokens == tokens
    assert [r.to_dict() for r in read_records(tmp_path / "again.jsonl")] == [r.to_dict() for r in records]

    # other decoding parameters are another cache entry
    other = generate_records(generator, jobs(), DecodeParams(max_new_tokens=3), tmp_path / "o.jsonl", cache,
                             progress=False)  # fmt: skip
    assert other.generated == 4


class CrashAfter:
    """A real generator that dies after ``chunks`` calls, as a process killed mid-run would."""

    def __init__(self, inner, chunks: int):
        self.inner, self.left = inner, chunks
        self.identity, self.system = inner.identity, inner.system

    @property
    def prompt_tokens(self):
        return self.inner.prompt_tokens

    @property
    def new_tokens(self):
        return self.inner.new_tokens

    def generate(self, prompts, params):
        if self.left == 0:
            raise KeyboardInterrupt
        self.left -= 1
        return self.inner.generate(prompts, params)


def test_a_crashed_run_resumes_without_regenerating(generator, tmp_path):
    cache = GenerationCache(tmp_path / "gen.sqlite")
    prompts = [f"History: item {k}." for k in range(7)]
    with pytest.raises(KeyboardInterrupt):
        generate_texts(CrashAfter(generator, 2), prompts, PARAMS, cache, chunk_size=2, progress=False)
    assert cache.count(generator.identity) == 4  # two chunks were saved before the crash
    texts, stats = generate_texts(generator, prompts, PARAMS, cache, chunk_size=2, progress=False)
    assert (stats.cached, stats.generated) == (4, 3)
    fresh, _ = generate_texts(generator, prompts, PARAMS, GenerationCache(tmp_path / "other.sqlite"), progress=False)
    assert texts == fresh  # resumed output equals an uninterrupted run
