"""The CF runs of ``reclm run`` (stage 11), trained one after another or several at once.

On CPU the pipeline trains one run per core, each single-threaded, in worker processes: these models
are too small for torch to use two threads well (ml-100k, 2 cores, ten ``text`` runs of 10 epochs: 60 s
in two single-threaded workers against 80 s one after another with two threads; ``benchmarks/cf_parallel.py``).
On CUDA, and with ``cf.jobs: 1``, runs are trained in this process.
Each run is committed on its own as soon as it finishes, so an interrupted stage keeps finished runs;
a run cut short resumes from the state it saved in its folder (reclm.cf.trainer). Workers die with the
pipeline process (:func:`die_with_parent`), ``kill -9`` included: none outlives it to write into a unit's
``.partial`` folder while a restarted run resumes there.
With ``executor: ray`` (:func:`run_in_ray`) the runs are Ray tasks instead, on a local Ray or a cluster.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import multiprocessing
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reclm.utils import available_cores


@dataclass
class CFJob:
    """One CF run: its CFConfig fields, the feature files it reads and the folder it writes."""

    name: str
    params: dict[str, Any]
    out: Path
    item_text: Path | None = None
    user_profiles: Path | None = None
    item_profiles: Path | None = None
    text_run: Path | None = None  # from_text: the folder of the text run this one uses (its model.pt, model_cold.pt)
    after: str | None = None  # the name of that text run: a job of the same batch must finish before this one starts
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobResult:
    name: str
    test: dict[str, float]
    epochs_run: int
    worker_peak_mb: float | None = None  # peak resident memory of the worker process that trained it


def job_plan(requested: int | None, device: str, pending: int, cores: int | None = None) -> tuple[int, int]:
    """(runs at once, torch threads per run): ``requested`` or, on CPU, one single-threaded run per core
    (``cores``: the pipeline's thread budget, default the cores available)."""
    import torch

    cores = cores or available_cores()
    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    jobs = max(1, min(requested or (1 if on_gpu else cores), pending))
    return jobs, max(1, cores // jobs)


def job_features(job: CFJob, user_ids: Sequence[str], item_ids: Sequence[str]) -> Any:
    import numpy as np

    from reclm.cf import SideFeatures
    from reclm.cf.features import attach_profiles

    features = SideFeatures()
    if job.item_text is not None:
        features.item_text = np.load(job.item_text)["vectors"]
    mode = job.params.get("features", "none")
    return attach_profiles(features, mode, job.user_profiles, job.item_profiles, list(user_ids), list(item_ids))


def train_job(job: CFJob, data: Any, split: Any, threads: int | None, show_progress: bool) -> JobResult:
    from reclm.cf import CFConfig, train_cf
    from reclm.cf.trainer import load_text_run

    params = dict(job.params)
    if threads is not None:
        params.setdefault("threads", threads)
    features = job_features(job, data.user_ids, data.item_ids)
    text_state, text_cold_state = load_text_run(job.text_run) if job.text_run is not None else (None, None)
    result = train_cf(
        split,
        CFConfig(**params),
        features,
        job.out,
        show_progress=show_progress,
        user_ids=data.user_ids,
        extra_info=job.extra,
        text_state=text_state,
        text_cold_state=text_cold_state,
    )
    return JobResult(job.name, dict(result.test), result.epochs_run)


_WORKER_DATA: dict[str, Any] = {}
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent: int) -> None:
    """Worker initializer: SIGKILL this worker when the process ``parent`` that spawned it dies. On Linux the
    kernel sends it (``prctl(PR_SET_PDEATHSIG)``); everywhere a thread also checks the parent id twice a
    second, which covers other systems and a parent that died before the ``prctl``."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    threading.Thread(target=watch_parent, args=(parent,), name="watch-parent", daemon=True).start()


def watch_parent(parent: int, every: float = 0.5) -> None:
    while os.getppid() == parent:
        time.sleep(every)
    os.kill(os.getpid(), signal.SIGKILL)


def worker_train(root: str, job: CFJob, threads: int) -> JobResult:
    """A worker process's run: the run directory's data is loaded once per process."""
    from reclm.rundir import RunDir

    if root not in _WORKER_DATA:
        _WORKER_DATA[root] = RunDir(Path(root)).load()
    data, split = _WORKER_DATA[root]
    result = train_job(job, data, split, threads, show_progress=False)
    result.worker_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return result


def in_dependency_order(jobs: Sequence[CFJob]) -> list[CFJob]:
    """``jobs`` with every job after the job it waits for (``after``): the order to train them one by one."""
    names = {job.name for job in jobs}
    return sorted(jobs, key=lambda job: job.after in names)


def chain_costs(jobs: Sequence[CFJob], cost: Callable[[CFJob], float]) -> dict[str, float]:
    """Each job's ``cost`` plus that of the costliest chain of jobs waiting for it: the longest chain first
    keeps a slow text run and its profile runs from being left alone at the end of the stage."""
    waiting_for: dict[str, list[CFJob]] = {}
    for job in jobs:
        if job.after is not None:
            waiting_for.setdefault(job.after, []).append(job)
    chains: dict[str, float] = {}

    def chain(job: CFJob, seen: frozenset[str] = frozenset()) -> float:
        if job.name not in chains:
            after = [chain(j, seen | {job.name}) for j in waiting_for.get(job.name, []) if j.name not in seen]
            chains[job.name] = cost(job) + max(after, default=0.0)
        return chains[job.name]

    for job in jobs:
        chain(job)
    return chains


def schedule(
    jobs: Sequence[CFJob],
    submit: Callable[[CFJob], Any],
    wait_any: Callable[[list[Any]], Iterable[Any]],
    on_finished: Callable[[CFJob, Any], None],
    running: dict[Any, CFJob],
    slots: int | None = None,
    priority: dict[str, float] | None = None,
) -> None:
    """Run ``jobs`` on an executor: each is submitted (``submit`` returns its handle) as soon as the job it waits
    for (``after``, where that one is among ``jobs``) has finished, so a profile run starts the moment its text
    run is committed. ``wait_any`` returns finished handles; ``on_finished`` commits one (before its dependents
    start). ``running`` is the caller's, to cancel what is outstanding on an error.

    At most ``slots`` jobs are submitted at once (None: every ready one); ready jobs go in descending
    ``priority`` (by job name; e.g. :func:`chain_costs`), ties in the given order."""
    names = {job.name for job in jobs}
    priority = priority or {}
    waiting, ready, done = list(jobs), [], set()
    while waiting or ready or running:
        for job in [job for job in waiting if job.after not in names or job.after in done]:
            waiting.remove(job)
            ready.append(job)
        ready.sort(key=lambda job: -priority.get(job.name, 0.0))
        while ready and (slots is None or len(running) < slots):
            job = ready.pop(0)
            running[submit(job)] = job
        if not running:
            raise RuntimeError(f"CF jobs wait for runs that never start: {[job.name for job in waiting]}")
        for handle in wait_any(list(running)):
            job = running.pop(handle)
            on_finished(job, handle)
            done.add(job.name)


def run_in_workers(
    root: Path,
    jobs: Sequence[CFJob],
    workers: int,
    threads: int,
    on_done: Callable[[CFJob, JobResult], None],
    priority: dict[str, float] | None = None,
) -> None:
    """Train ``jobs`` in ``workers`` spawned processes (each after the job it waits for, the highest
    ``priority`` first as a worker frees up); ``on_done`` runs here as each one finishes."""
    context = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=die_with_parent, initargs=(os.getpid(),)
    ) as pool:
        running: dict[Future, CFJob] = {}
        try:
            schedule(
                jobs,
                submit=lambda job: pool.submit(worker_train, str(root), job, threads),
                wait_any=lambda futures: wait(futures, return_when=FIRST_COMPLETED)[0],
                on_finished=lambda job, future: on_done(job, future.result()),
                running=running,
                slots=workers,
                priority=priority,
            )
        except BaseException:
            stop_workers(pool)
            raise


def stop_workers(pool: ProcessPoolExecutor) -> None:
    """End the workers now (Ctrl-C, SIGTERM, a failed run): finished runs are already committed, and a
    run cut short resumes from the state it last saved (at most a minute old), so waiting would only delay."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # no public handle before 3.14
    for process in processes:
        process.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


def run_in_ray(
    root: Path,
    jobs: Sequence[CFJob],
    options: Any,
    threads: int,
    on_done: Callable[[CFJob, JobResult], None],
    num_cpus: int | None = None,
    priority: dict[str, float] | None = None,
) -> None:
    """Train ``jobs`` as Ray tasks (:func:`worker_train`, ``threads`` torch threads each; each after the job it
    waits for, submitted in descending ``priority`` as they become ready); ``on_done`` runs here as each one
    finishes, so every run is committed as soon as it is done, as in :func:`run_in_workers`.

    ``options`` is the config's ``ray`` section (reclm.pipeline.config.RayOptions): ``address`` (else
    ``RAY_ADDRESS``, else a local Ray of ``num_cpus`` CPUs started and stopped here; reclm.distributed) and
    the CPUs / GPUs each task asks for. A worker process loads the run directory's data once, for every task
    it runs. The workers read the feature files under ``root`` and write each run into its folder there by
    path, so on a cluster the run directory must be on storage every node mounts at the same path (and reclm,
    with the same versions, installed on every node); on one machine that holds by itself.
    An exception here (a failed run, ``on_done``, Ctrl-C) cancels the outstanding tasks, killing the workers
    of those already running (their runs resume from their saved state next time); Ray also ends the tasks of
    a driver that dies.
    """
    from reclm.distributed import ray_session

    if not jobs:
        return
    with ray_session(options.address, num_cpus) as ray:
        task = ray.remote(num_cpus=options.cpus_per_run, num_gpus=options.gpus_per_run)(worker_train)
        root_path = str(Path(root).resolve())
        running: dict[Any, CFJob] = {}
        try:
            schedule(
                jobs,
                submit=lambda job: task.remote(root_path, absolute_paths(job), threads),
                wait_any=lambda refs: ray.wait(refs, num_returns=1)[0],
                on_finished=lambda job, ref: on_done(job, task_result(ray, ref)),
                running=running,
                priority=priority,
            )
        except BaseException:
            cancel_ray_tasks(ray, list(running))
            raise


def task_result(ray: Any, ref: Any) -> JobResult:
    """A task's result; a run that failed raises its own exception, as in a local worker (Ray's wrapper, whose
    text carries the worker's traceback, is its ``__cause__``: one line for the stage's error)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from exc
        raise


def absolute_paths(job: CFJob) -> CFJob:
    """``job`` with absolute paths (a Ray worker need not share this process's working directory)."""
    files = {name: getattr(job, name) for name in ("out", "item_text", "user_profiles", "item_profiles", "text_run")}
    return dataclasses.replace(job, **{name: Path(f).resolve() for name, f in files.items() if f is not None})


def cancel_ray_tasks(ray: Any, refs: list[Any], grace: float = 10.0) -> None:
    """Cancel ``refs`` (killing the workers that run them) and wait up to ``grace`` seconds for them to end,
    so that none writes into a run's folder after this returns."""
    if not refs:
        return
    for ref in refs:
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=True)
    with contextlib.suppress(Exception):
        ray.wait(refs, num_returns=len(refs), timeout=grace)
