"""Generation runner: deduplicated, cached, resumable profile generation with a progress bar.

Identical prompts are generated once (MIND: 57,128 users, 15,173 distinct train histories). Every answer is
stored in a SQLite cache keyed by (generator identity = backend + base model + adapter hash + precision,
decoding parameters, prompt hash) as soon as its chunk finishes, so a crashed or interrupted run, or a second
run, generates only what is missing. The output is a records file (:mod:`reclm.llm.records`). The chunks may
run elsewhere (:mod:`reclm.llm.generation.ray_runner`: Ray actors); their answers are still cached here.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from reclm.llm.chat import Prompt
from reclm.llm.generation.base import DecodeParams, GenerationStopped, Generator, prompt_key
from reclm.llm.records import ProfileRecord, write_records
from reclm.utils import cache_root


@dataclass
class Job:
    """One profile to write: ``kind`` user|item, the raw ``id``, and its prompt."""

    kind: str
    id: str
    prompt: Prompt


def default_cache_path() -> Path:
    return cache_root() / "generations.sqlite"


class GenerationCache:
    """``(generator identity, decoding params, prompt hash) -> text`` in SQLite (thread-safe in one process)."""

    def __init__(self, path: str | Path | None = None, readonly: bool = False):
        self.path = Path(path) if path else default_cache_path()
        self.lock = threading.Lock()
        if readonly:  # a dry run looks, and creates nothing
            self.db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, check_same_thread=False, timeout=60)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS gen (generator TEXT, params TEXT, prompt TEXT, text TEXT, "
            "PRIMARY KEY (generator, params, prompt))"
        )
        self.db.commit()

    @classmethod
    def existing(cls, path: str | Path | None = None) -> GenerationCache | None:
        """The cache opened read-only, or None when there is none yet."""
        path = Path(path) if path else default_cache_path()
        if not path.is_file():
            return None
        try:
            return cls(path, readonly=True)
        except sqlite3.Error:
            return None

    def get(self, generator: str, params: str, keys: Sequence[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        with self.lock:
            for start in range(0, len(keys), 900):
                chunk = list(keys[start : start + 900])
                marks = ",".join("?" * len(chunk))
                rows = self.db.execute(
                    f"SELECT prompt, text FROM gen WHERE generator = ? AND params = ? AND prompt IN ({marks})",
                    [generator, params, *chunk],
                ).fetchall()
                found.update(rows)
        return found

    def put(self, generator: str, params: str, items: Sequence[tuple[str, str]]) -> None:
        with self.lock:
            self.db.executemany(
                "INSERT OR REPLACE INTO gen VALUES (?, ?, ?, ?)", [(generator, params, k, t) for k, t in items]
            )
            self.db.commit()

    def count(self, generator: str | None = None) -> int:
        with self.lock:
            if generator is None:
                return self.db.execute("SELECT COUNT(*) FROM gen").fetchone()[0]
            return self.db.execute("SELECT COUNT(*) FROM gen WHERE generator = ?", [generator]).fetchone()[0]

    def close(self) -> None:
        with self.lock:
            self.db.close()


@dataclass
class GenerationStats:
    jobs: int = 0
    distinct: int = 0
    cached: int = 0
    generated: int = 0
    failed: int = 0
    seconds: float = 0.0
    prompt_tokens: int = 0
    new_tokens: int = 0
    generator: str = ""

    @property
    def profiles_per_s(self) -> float:
        return self.generated / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "seconds": round(self.seconds, 2),
            "profiles_per_s": round(self.profiles_per_s, 3),
            "new_tokens_per_s": round(self.tokens_per_s, 1),
            "mean_new_tokens": round(self.new_tokens / self.generated, 1) if self.generated else 0.0,
            "mean_prompt_tokens": round(self.prompt_tokens / self.generated, 1) if self.generated else 0.0,
        }


def prompt_size(prompt: Prompt) -> int:
    return len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)


def prompt_as_text(prompt: Prompt) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)


def run_chunks(
    generator: Generator, chunks: Sequence[Sequence[Prompt]], params: DecodeParams
) -> Iterator[tuple[int, list[str | None], GenerationStopped | None]]:
    """``(chunk index, texts, stopped)`` for each chunk as it finishes (``stopped``: the generator stopped early
    and ``texts`` holds what it got). Here the chunks run in turn; a generator with its own ``generate_chunks``
    (:class:`~reclm.llm.generation.ray_runner.RayGenerator`) runs them its way, e.g. in parallel on several
    workers, yielding in the order they finish: the caller's dedup and cache logic is the same either way."""
    own = getattr(generator, "generate_chunks", None)
    if own is not None:
        yield from own(chunks, params)
        return
    for index, chunk in enumerate(chunks):
        try:
            yield index, list(generator.generate(chunk, params)), None
        except GenerationStopped as exc:
            yield index, exc.texts, exc


def generate_texts(
    generator: Generator,
    prompts: Sequence[Prompt],
    params: DecodeParams,
    cache: GenerationCache | None = None,
    chunk_size: int = 64,
    progress: bool = True,
    desc: str = "generating",
) -> tuple[list[str | None], GenerationStats]:
    """Texts for ``prompts`` (``None`` where a remote request failed), each distinct prompt generated at most
    once and only when the cache lacks it (a generator that is not ``cacheable`` neither reads nor fills the
    cache). Chunks of similar prompt length are generated (:func:`run_chunks`) and each is cached as soon as it
    is done, here in this process only (one writer); when the generator stops early (:class:`GenerationStopped`)
    the answers it got are cached before the error is passed on."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from reclm.progress import progress as make_progress

    own_cache = cache is None
    cache = cache or GenerationCache()
    keys = [prompt_key(p, generator.system) for p in prompts]
    distinct: dict[str, Prompt] = {}
    for key, prompt in zip(keys, prompts):
        distinct.setdefault(key, prompt)
    identity, params_key = generator.identity, params.key()
    cacheable = getattr(generator, "cacheable", True)
    found = cache.get(identity, params_key, list(distinct)) if cacheable else {}
    stats = GenerationStats(jobs=len(prompts), distinct=len(distinct), cached=len(found), generator=identity)
    todo = sorted((k for k in distinct if k not in found), key=lambda k: prompt_size(distinct[k]))

    bar = make_progress(
        TextColumn(desc), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[speed]}"),
        TimeRemainingColumn(), disable=not progress,
    )  # fmt: skip
    prompt_before, new_before = generator.prompt_tokens, generator.new_tokens
    started = time.perf_counter()
    try:
        with bar:
            task = bar.add_task(desc, total=len(todo), speed="")
            chunks = [todo[start : start + chunk_size] for start in range(0, len(todo), chunk_size)]
            with contextlib.closing(run_chunks(generator, [[distinct[k] for k in c] for c in chunks], params)) as runs:
                for index, texts, stopped in runs:
                    chunk = chunks[index]
                    done = [(k, t) for k, t in zip(chunk, texts) if t is not None]
                    if cacheable:
                        cache.put(identity, params_key, done)
                    found.update(done)
                    stats.generated += len(done)
                    stats.failed += len(chunk) - len(done)
                    stats.seconds = time.perf_counter() - started
                    stats.prompt_tokens = generator.prompt_tokens - prompt_before
                    stats.new_tokens = generator.new_tokens - new_before
                    speed = f"{stats.profiles_per_s:.2f}/s {stats.tokens_per_s:.0f} tok/s"
                    bar.update(task, advance=len(chunk), speed=speed)
                    if stopped is not None:
                        raise stopped
    finally:
        if own_cache:
            cache.close()
    return [found.get(k) for k in keys], stats


def generate_records(
    generator: Generator,
    jobs: Sequence[Job],
    params: DecodeParams,
    out_path: str | Path,
    cache: GenerationCache | None = None,
    chunk_size: int = 64,
    progress: bool = True,
    desc: str = "profiles",
) -> GenerationStats:
    """Generate a profile for every job and write ``out_path`` (records ``{kind, id, prompt, profile}``, in job
    order; jobs whose generation failed are left out and reported in ``stats.failed``)."""
    texts, stats = generate_texts(generator, [j.prompt for j in jobs], params, cache, chunk_size, progress, desc)
    records = [
        ProfileRecord(j.kind, j.id, prompt_as_text(j.prompt), text)  # type: ignore[arg-type]
        for j, text in zip(jobs, texts)
        if text is not None
    ]
    write_records(out_path, records)
    return stats
