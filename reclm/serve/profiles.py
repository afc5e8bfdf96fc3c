"""On-the-fly profiles: the run's tuned writer (generation module, one worker thread) behind a micro-batching
queue, and the text encoder behind a lock.

Why batch: a CPU decodes several prompts at once for little more than the cost of one (``../shared/MODELS.md``:
SmolLM2 on 2 cores, 13.4 new tokens/s for one prompt, 59.7 tokens/s in total over a batch of 16). Requests
that arrive while a batch is being written wait in the queue and go together into the next one; a request
arriving at an idle writer waits at most ``max_wait`` seconds for company. ``benchmarks/serve_load.py
--new-users`` measures it.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reclm.llm.generation import DecodeParams, GenerationCache, generate_texts, make_generator, prompt_key

PROFILE_BACKENDS = ("ct2", "transformers", "none")
_STOP = object()


class QueueFull(RuntimeError):
    """More jobs are waiting than the writer accepts."""


class MicroBatcher:
    """A queue and one worker thread that runs ``run_batch(jobs) -> results`` on up to ``max_batch`` jobs at a
    time. ``submit`` returns a :class:`concurrent.futures.Future`."""

    def __init__(
        self,
        run_batch: Callable[[list[Any]], Sequence[Any]],
        max_batch: int = 16,
        max_wait: float = 0.02,
        max_pending: int = 256,
        name: str = "micro-batcher",
    ):
        if max_batch < 1 or max_pending < 1:
            raise ValueError("max_batch and max_pending must be >= 1")
        self.run_batch = run_batch
        self.max_batch, self.max_wait, self.max_pending = max_batch, max_wait, max_pending
        self.queue: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.pending = 0
        self.batches = 0
        self.jobs = 0
        self.largest = 0
        self.busy_seconds = 0.0
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def submit(self, job: Any) -> Future:
        with self.lock:
            if self.pending >= self.max_pending:
                raise QueueFull(f"{self.pending} jobs already waiting (limit {self.max_pending})")
            self.pending += 1
        future: Future = Future()
        self.queue.put((job, future))
        return future

    def _collect(self, first: tuple) -> tuple[list[tuple], bool]:
        batch, stop = [first], False
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                entry = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if entry is _STOP:
                stop = True
                break
            batch.append(entry)
        return batch, stop

    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self.queue.get()
            if first is _STOP:
                break
            batch, stop = self._collect(first)
            live = [(job, future) for job, future in batch if future.set_running_or_notify_cancel()]
            started = time.perf_counter()
            try:
                if live:
                    results = self.run_batch([job for job, _ in live])
                    for (_, future), result in zip(live, results):
                        future.set_result(result)
            except BaseException as exc:  # every waiting request gets the error, the worker lives on
                for _, future in live:
                    if not future.done():
                        future.set_exception(exc)
            finally:
                with self.lock:
                    self.pending -= len(batch)
                    self.batches += 1
                    self.jobs += len(live)
                    self.largest = max(self.largest, len(live))
                    self.busy_seconds += time.perf_counter() - started

    def stats(self) -> dict:
        with self.lock:
            return {
                "pending": self.pending,
                "batches": self.batches,
                "jobs": self.jobs,
                "largest_batch": self.largest,
                "busy_seconds": round(self.busy_seconds, 3),
            }

    def close(self, timeout: float = 5.0) -> None:
        self.queue.put(_STOP)
        self.thread.join(timeout)


class LockedEncoder:
    """A TextEncoder used from many threads: one encode at a time (the model is loaded once, eagerly)."""

    def __init__(self, name: str):
        from reclm.text.encoder import TextEncoder

        self.encoder = TextEncoder(name, show_progress=False)
        self.name = name
        self.lock = threading.Lock()
        with self.lock:
            self.dim = self.encoder.dim

    def encode(self, texts: list[str]) -> np.ndarray:
        with self.lock:
            return self.encoder.encode(list(texts), desc="serve")

    def encode_profiles(self, profiles: Sequence[str]) -> list[np.ndarray | None]:
        """Embeddings of profiles; an empty profile has none (the model then sees a zero vector, as in training)."""
        texts = [p.strip() for p in profiles]
        vectors = iter(self.encode([t for t in texts if t])) if any(texts) else iter(())
        return [next(vectors) if t else None for t in texts]


class BoundedCache(GenerationCache):
    """The generation cache in ``serve.sqlite``, holding at most ``limit`` texts: past it, texts are written
    and returned but no longer stored (clients cannot grow the file without bound)."""

    def __init__(self, path: Path, limit: int | None = None):
        super().__init__(path)
        self.limit = limit

    def put(self, generator: str, params: str, items: Sequence[tuple[str, str]]) -> None:
        if self.limit is not None:
            room = max(0, self.limit - self.count())
            items = list(items)[:room]
        if items:
            super().put(generator, params, items)


@dataclass
class Written:
    profile: str
    vector: np.ndarray | None


class ProfileWriter:
    """Writes user and item profiles with the run's generator(s), batched, cached in ``cache_path`` (the
    generation module's SQLite cache, at most ``max_cached`` texts), and embeds them."""

    def __init__(
        self,
        backend: str,
        base_model: str,
        adapters: dict[str, Path | None],
        params: DecodeParams,
        cache_path: Path,
        encoder: LockedEncoder,
        batch_size: int = 16,
        max_wait: float = 0.02,
        max_pending: int = 256,
        threads: int | None = None,
        max_cached: int | None = None,
    ):
        if backend not in ("ct2", "transformers"):
            raise ValueError(f"profile backend {backend!r}: expected one of {', '.join(PROFILE_BACKENDS)}")
        self.backend, self.params, self.encoder = backend, params, encoder
        self.adapters = adapters
        made: dict[str, Any] = {}
        self.generators: dict[str, Any] = {}
        for kind, adapter in adapters.items():
            key = str(adapter)
            if key not in made:
                made[key] = make_generator(backend, base_model, adapter, batch_size=batch_size, threads=threads)
            self.generators[kind] = made[key]
        self.cache = BoundedCache(cache_path, max_cached)
        self.batcher = MicroBatcher(self._write, batch_size, max_wait, max_pending, name="profile-writer")

    def identity(self, kind: str) -> str:
        return f"{self.generators[kind].identity}|{self.params.key()}"

    def key(self, kind: str, prompt: str) -> str:
        """Cache key of a profile: generator (backend, base model, adapter), decoding parameters and prompt."""
        text = f"{self.identity(kind)}|{prompt_key(prompt, self.generators[kind].system)}"
        return hashlib.sha256(text.encode()).hexdigest()

    def cached(self, kind: str, prompt: str) -> str | None:
        """The profile the generation cache already holds for this prompt (no queueing)."""
        generator = self.generators[kind]
        key = prompt_key(prompt, generator.system)
        return self.cache.get(generator.identity, self.params.key(), [key]).get(key)

    def submit(self, kind: str, prompt: str) -> Future:
        """A future of :class:`Written`."""
        if kind not in self.generators:
            raise ValueError(f"profile kind {kind!r}: expected user or item")
        return self.batcher.submit((kind, prompt))

    def _write(self, jobs: list[tuple[str, str]]) -> list[Written]:
        texts: list[str] = [""] * len(jobs)
        groups: dict[int, list[int]] = {}
        for position, (kind, _) in enumerate(jobs):
            groups.setdefault(id(self.generators[kind]), []).append(position)
        for positions in groups.values():
            generator = self.generators[jobs[positions[0]][0]]
            prompts = [jobs[p][1] for p in positions]
            written, _ = generate_texts(
                generator, prompts, self.params, self.cache, chunk_size=len(prompts), progress=False
            )
            for position, text in zip(positions, written):
                texts[position] = (text or "").strip()
        vectors = self.encoder.encode_profiles(texts)
        return [Written(text, vector) for text, vector in zip(texts, vectors)]

    def stats(self) -> dict:
        return {"backend": self.backend, **self.batcher.stats()}

    def close(self) -> None:
        self.batcher.close()
        for generator in {id(g): g for g in self.generators.values()}.values():
            generator.close()
        self.cache.close()
