"""Profile generation sharded over Ray actors: N models at once, the same cache and records as one process.

:class:`RayGenerator` stands in for a :class:`~reclm.llm.generation.base.Generator` in ``generate_texts`` /
``generate_records``, so deduplication, the cache lookup and the split of the uncached prompts into chunks of
similar length stay the runner's (:mod:`reclm.llm.generation.runner`). Each chunk (a shard) goes to a free one
of N Ray actors, each of which built its own generator from a picklable :class:`GeneratorSpec` (the model is
loaded once per actor, never shipped). The answers come back to this process, the driver, which alone writes
them into the SQLite cache as each shard finishes (one writer: SQLite on shared storage with many writers is
asking for trouble), so a rerun generates only what is missing. An actor that dies mid-shard (its process
killed, its node lost) is restarted by Ray (``max_restarts``) and its shard goes to the next free actor;
finished shards are never generated again.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from reclm.distributed import ray_session
from reclm.llm.chat import Prompt
from reclm.llm.generation.base import DecodeParams, GenerationStopped, Generator

SHARD_ATTEMPTS = 3  # a shard whose worker died this many times is an error (it may be what kills them)
PROBE_EVERY = 0.5  # seconds between looks at a worker that Ray is restarting


@dataclass
class GeneratorSpec:
    """What a worker needs to build its generator itself: the arguments of
    :func:`reclm.llm.generation.make_generator` (paths as strings: they must exist on every node)."""

    backend: str
    model: str | None = None
    adapter: str | None = None
    batch_size: int = 16
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        backend: str,
        model: str | os.PathLike | None = None,
        adapter: str | os.PathLike | None = None,
        batch_size: int = 16,
        **options: Any,
    ) -> GeneratorSpec:
        """The spec of ``make_generator(backend, model, adapter, batch_size, **options)`` (same signature)."""
        return cls(backend, str(model) if model else None, str(adapter) if adapter else None, batch_size, options)

    def build(self) -> Generator:
        from reclm.llm.generation import make_generator

        return make_generator(self.backend, self.model, self.adapter, self.batch_size, **self.options)


class GenerationWorker:
    """One Ray actor: its generator is built once, in ``__init__``, then each call answers one shard."""

    def __init__(self, spec: GeneratorSpec):
        self.generator = spec.build()

    def describe(self) -> tuple[str, str | None, bool]:
        """``(identity, system prompt, cacheable)``: what the driver's cache keys need."""
        g = self.generator
        return g.identity, g.system, getattr(g, "cacheable", True)

    def pid(self) -> int:
        return os.getpid()

    def generate(self, prompts: Sequence[Prompt], params: DecodeParams) -> tuple[list, str | None, int, int]:
        """``(texts, stop message or None, prompt tokens, new tokens)`` for one shard."""
        g = self.generator
        prompt_before, new_before = g.prompt_tokens, g.new_tokens
        try:
            texts, stopped = list(g.generate(prompts, params)), None
        except GenerationStopped as exc:
            texts, stopped = exc.texts, str(exc)
        return texts, stopped, g.prompt_tokens - prompt_before, g.new_tokens - new_before

    def close(self) -> None:
        self.generator.close()


def shared_limits(spec: GeneratorSpec, workers: int) -> GeneratorSpec:
    """An ``openai`` spec whose limits hold for all ``workers`` together: each actor gets its share of the
    requests in flight (``concurrency``, at least 1) and of the spending cap (``max_cost``), which are
    otherwise per generator (N actors: N times the cap). Other backends are returned as they are."""
    if spec.backend != "openai" or workers <= 1:
        return spec
    from reclm.llm.generation.openai import GenerationEndpoint

    options = dict(spec.options)
    endpoint = options.get("endpoint")
    limits = endpoint if isinstance(endpoint, GenerationEndpoint) else GenerationEndpoint(**options)
    shares = {"concurrency": max(1, limits.concurrency // workers)}
    if limits.max_cost is not None:
        shares["max_cost"] = limits.max_cost / workers
    if isinstance(endpoint, GenerationEndpoint):
        options["endpoint"] = replace(endpoint, **shares)
    else:
        options.update(shares)
    return replace(spec, options=options)


def default_workers(ray: Any, cpus_per_worker: float, gpus_per_worker: float) -> int:
    """As many workers as the cluster's CPUs (and GPUs, when each asks for some) hold, at least one."""
    resources = ray.cluster_resources()
    n = math.floor(resources.get("CPU", 1) / cpus_per_worker) if cpus_per_worker else 1
    if gpus_per_worker:
        n = min(n, math.floor(resources.get("GPU", 0) / gpus_per_worker))
    return max(1, n)


class RayGenerator(Generator):
    """A :class:`Generator` whose shards run on ``workers`` Ray actors (default: the cluster's CPUs divided by
    ``cpus_per_worker``), each with its own generator built from ``spec``. Ray is reached through
    :func:`reclm.distributed.ray_session` (``address``, else ``RAY_ADDRESS``, else a local Ray of ``num_cpus``
    CPUs, stopped on :meth:`close`; an already initialised Ray is used as it is). Local backends get
    ``threads = cpus_per_worker`` unless ``spec`` sets them. ``resubmitted`` counts shards handed out again
    after their worker died. An ``openai`` spec's ``concurrency`` and ``max_cost`` are shared out among the
    workers (:func:`shared_limits`). Use it as a context manager, or call :meth:`close` (it ends the actors)."""

    backend = "ray"

    def __init__(
        self,
        spec: GeneratorSpec,
        workers: int | None = None,
        address: str | None = None,
        cpus_per_worker: float = 1,
        gpus_per_worker: float = 0,
        max_restarts: int = 2,
        num_cpus: int | None = None,
    ):
        super().__init__()
        if spec.backend != "openai" and "threads" not in spec.options:
            spec = replace(spec, options={**spec.options, "threads": max(1, int(cpus_per_worker))})
        self.spec, self.resubmitted = spec, 0
        self.actors: list[Any] = []
        self.dead: set[int] = set()  # workers Ray will not restart again
        self._session = contextlib.ExitStack()
        self.ray = self._session.enter_context(ray_session(address, num_cpus))
        try:
            self.workers = workers or default_workers(self.ray, cpus_per_worker, gpus_per_worker)
            actor = self.ray.remote(GenerationWorker).options(
                num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=max_restarts, max_task_retries=0
            )
            spec = self.spec = shared_limits(spec, self.workers)
            self.actors = [actor.remote(spec) for _ in range(self.workers)]
            self._identity, self.system, self.cacheable = self.ray.get(self.actors[0].describe.remote())
        except BaseException:
            self.close()
            raise

    @property
    def identity(self) -> str:
        return self._identity

    def pids(self, timeout: float = 120) -> list[int]:
        """The workers' process ids, waiting for those that Ray is restarting."""
        from ray.exceptions import ActorUnavailableError

        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.ray.get([a.pid.remote() for a in self.actors])
            except ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(PROBE_EVERY)

    def generate(self, prompts: Sequence[Prompt], params: DecodeParams) -> list[str]:
        """One shard on one worker (the runner hands :meth:`generate_chunks` all of them at once)."""
        for _, texts, stopped in self.generate_chunks([prompts], params):
            if stopped is not None:
                raise stopped
            return texts  # type: ignore[return-value]
        return []

    def generate_chunks(
        self, chunks: Sequence[Sequence[Prompt]], params: DecodeParams
    ) -> Iterator[tuple[int, list[str | None], GenerationStopped | None]]:
        """``(chunk index, texts, stopped)`` for each chunk as it finishes (see ``runner.run_chunks``): chunks
        are handed out in order, one at a time to each free worker. A chunk whose worker died goes back to the
        front of the queue; the worker is probed until Ray has restarted it (then it gets work again) or
        gives it up (``max_restarts`` spent). A chunk that its workers died on ``SHARD_ATTEMPTS`` times, or
        workers all gone, is an error: what was finished is cached already."""
        from ray.exceptions import ActorUnavailableError, RayActorError

        pending = deque(range(len(chunks)))
        idle = deque(w for w in range(len(self.actors)) if w not in self.dead)
        running: dict[Any, tuple[int, int | None]] = {}  # object ref -> (worker, chunk; None: a probe)
        recovering: list[tuple[float, int]] = []  # (when to probe, worker)
        attempts: Counter[int] = Counter()
        try:
            while pending or any(c is not None for _, c in running.values()):
                while pending and idle:
                    worker, chunk = idle.popleft(), pending.popleft()
                    running[self.actors[worker].generate.remote(list(chunks[chunk]), params)] = (worker, chunk)
                now = time.monotonic()
                for due, worker in [r for r in recovering if r[0] <= now]:
                    recovering.remove((due, worker))
                    running[self.actors[worker].pid.remote()] = (worker, None)
                if not running and not recovering:
                    raise RuntimeError("every generation worker died (Ray restarted each max_restarts times)")
                wait = max(0.0, min(due for due, _ in recovering) - now) if recovering else None
                if not running:
                    time.sleep(wait or 0)
                    continue
                ready, _ = self.ray.wait(list(running), num_returns=1, timeout=wait)
                if not ready:
                    continue
                worker, chunk = running.pop(ready[0])
                try:
                    result = self.ray.get(ready[0])
                except ActorUnavailableError:  # restarting: look again soon
                    recovering.append((time.monotonic() + PROBE_EVERY, worker))
                    if chunk is not None:
                        self.requeue(chunk, pending, attempts, len(chunks[chunk]))
                    continue
                except RayActorError as exc:  # died: Ray restarts it unless its restarts are spent
                    if chunk is None:
                        self.dead.add(worker)  # a call to an actor that is gone for good
                    else:
                        recovering.append((time.monotonic(), worker))
                        self.requeue(chunk, pending, attempts, len(chunks[chunk]), exc)
                    continue
                idle.append(worker)
                if chunk is None:
                    continue
                texts, stopped, prompt_tokens, new_tokens = result
                self.prompt_tokens += prompt_tokens
                self.new_tokens += new_tokens
                yield chunk, texts, GenerationStopped(stopped, texts) if stopped is not None else None
        finally:
            for ref in running:  # left early: what is queued is dropped, what runs finishes unread
                with contextlib.suppress(Exception):
                    self.ray.cancel(ref)

    def requeue(
        self, chunk: int, pending: deque, attempts: Counter, size: int, cause: BaseException | None = None
    ) -> None:
        """Put a chunk whose worker failed back at the front of the queue (its worker's death counts as an
        attempt: a chunk that kills every worker it meets must end the run, not loop)."""
        attempts[chunk] += 1
        if attempts[chunk] >= SHARD_ATTEMPTS:
            raise RuntimeError(f"a shard of {size} prompts lost its worker {attempts[chunk]} times") from cause
        self.resubmitted += 1
        pending.appendleft(chunk)

    def close(self) -> None:
        """End the actors (their models go with them) and the Ray session this generator started, if any."""
        for actor in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(actor)
        self.actors = []
        self._session.close()
