"""The train-cf stage's two executors on one machine: ``executor: local`` (one single-threaded run per core in
spawned worker processes, reclm.pipeline.cf_jobs.run_in_workers) against ``executor: ray`` (the same runs as
tasks on a local Ray of as many CPUs, run_in_ray). Same runs, same fixed epoch count (no early stopping), timed
in this process; prints both wall times (Ray's start apart), the ratio ray / local, and checks that every run's
test metrics agree.

    python benchmarks/cf_ray.py --run runs/ml-100k                      # a finished `reclm run`
    python benchmarks/cf_ray.py --run runs/ml-100k --backbones lightgcn,ncf --features text --epochs 10

Needs the run's ``embeddings/item_text.npz`` (stage encode) and Ray (``pip install 'reclm[ray]'``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from reclm.distributed import ray_session
from reclm.pipeline import cf_jobs
from reclm.pipeline.config import RayOptions
from reclm.rundir import RunDir
from reclm.utils import available_cores

Done = Callable[[cf_jobs.CFJob, cf_jobs.JobResult], None]


def make_jobs(run: Path, backbones: list[str], features: list[str], epochs: int, scratch: Path) -> list[cf_jobs.CFJob]:
    text = run / "embeddings" / "item_text.npz"
    jobs = []
    for backbone in backbones:
        for mode in features:
            name = f"{backbone}-{mode}"
            params = {"epochs": epochs, "patience": epochs, "backbone": backbone, "features": mode, "seed": 2020}
            jobs.append(cf_jobs.CFJob(name, params, scratch / name, text if mode != "none" else None))
    return jobs


def time_local(jobs: list[cf_jobs.CFJob], run: Path, workers: int, threads: int, on_done: Done) -> float:
    """The local executor as the stage runs it: worker processes, or in this process when one at a time."""
    start = time.perf_counter()
    if workers > 1:
        cf_jobs.run_in_workers(run, jobs, workers, threads, on_done)
    else:
        data, split = RunDir(run).load()
        for job in jobs:
            on_done(job, cf_jobs.train_job(job, data, split, threads, show_progress=False))
    return time.perf_counter() - start


def time_ray(jobs: list[cf_jobs.CFJob], run: Path, cores: int, threads: int, on_done: Done) -> tuple[float, float]:
    """(Ray's start, the whole) in seconds: a local Ray of ``cores`` CPUs, one per run."""
    start = time.perf_counter()
    with ray_session(None, cores):
        started = time.perf_counter() - start
        cf_jobs.run_in_ray(run, jobs, RayOptions(cpus_per_run=1), threads, on_done)
    return started, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished `reclm run` directory")
    parser.add_argument("--backbones", default="bias-mf,lightgcn")
    parser.add_argument("--features", default="text,none", help="feature modes without profiles: text, none")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--ray-first", action="store_true", help="time the ray executor first (order effects)")
    args = parser.parse_args(argv)
    if not (args.run / "embeddings" / "item_text.npz").is_file():
        print(f"error: {args.run}: no embeddings/item_text.npz (run `reclm run` first)", file=sys.stderr)
        return 2
    cores = available_cores()
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    features = [f.strip() for f in args.features.split(",") if f.strip()]
    count = len(backbones) * len(features)
    workers, threads = cf_jobs.job_plan(None, "cpu", count, cores)
    results: dict[str, dict[str, dict[str, float]]] = {"local": {}, "ray": {}}

    def keep(executor: str) -> Done:
        return lambda job, result: results[executor].__setitem__(job.name, result.test)

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        local_jobs = make_jobs(args.run, backbones, features, args.epochs, scratch / "local")
        ray_jobs = make_jobs(args.run, backbones, features, args.epochs, scratch / "ray")
        if args.ray_first:
            started, on_ray = time_ray(ray_jobs, args.run, cores, threads, keep("ray"))
        local = time_local(local_jobs, args.run, workers, threads, keep("local"))
        if not args.ray_first:
            started, on_ray = time_ray(ray_jobs, args.run, cores, threads, keep("ray"))

    order = "ray first" if args.ray_first else "local first"
    print(
        f"{count} runs ({', '.join(backbones)} x {', '.join(features)}) x {args.epochs} epochs, {cores} cores, {order}"
    )
    print(f"local: {workers} worker processes, {threads} thread(s) each: {local:7.1f} s (process start included)")
    print(f"ray: a local Ray of {cores} CPUs, 1 CPU per run:    {on_ray:7.1f} s (Ray's start {started:.1f} s)")
    print(f"ratio ray / local: {on_ray / local:.2f} ({(on_ray - started) / local:.2f} without Ray's start)")
    worst = max(
        abs(value - results["local"][name][metric])
        for name, metrics in results["ray"].items()
        for metric, value in metrics.items()
    )
    same = set(results["local"]) == set(results["ray"]) and worst <= 1e-6
    print(f"test metrics equal (max |difference| {worst:.1e}): {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
