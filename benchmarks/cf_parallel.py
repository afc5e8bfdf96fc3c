"""The train-cf stage's two ways on CPU: runs one after another in one process with all the cores
(``cf.jobs: 1``), against one single-threaded run per core in worker processes (the default). Same
runs, same fixed epoch count (no early stopping), timed in this process; prints both and the ratio.

    python benchmarks/cf_parallel.py --run runs/ml-100k             # a finished `reclm run`
    python benchmarks/cf_parallel.py --run runs/ml-100k --epochs 5 --backbones lightgcn,ncf

Needs the run's ``embeddings/item_text.npz`` (stage encode); runs use ``--features text``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from reclm.pipeline import cf_jobs
from reclm.rundir import RunDir
from reclm.utils import available_cores, torch_threads


def make_jobs(run: Path, backbones: list[str], seeds: int, epochs: int, scratch: Path) -> list[cf_jobs.CFJob]:
    params = {"epochs": epochs, "patience": epochs, "features": "text"}
    text = run / "embeddings" / "item_text.npz"
    return [
        cf_jobs.CFJob(f"{b}-s{seed}", {**params, "backbone": b, "seed": seed}, scratch / f"{b}-s{seed}", text)
        for b in backbones
        for seed in range(2020, 2020 + seeds)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished `reclm run` directory")
    parser.add_argument("--backbones", default="bias-mf,ncf,lightgcn,sgl,simgcl")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=2, help="runs per backbone (the default run has 2 per backbone)")
    args = parser.parse_args(argv)
    if not (args.run / "embeddings" / "item_text.npz").is_file():
        print(f"error: {args.run}: no embeddings/item_text.npz (run `reclm run` first)", file=sys.stderr)
        return 2
    cores = available_cores()
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    data, split = RunDir(args.run).load()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        torch_threads(cores)
        start = time.perf_counter()
        for job in make_jobs(args.run, backbones, args.seeds, args.epochs, scratch / "serial"):
            cf_jobs.train_job(job, data, split, cores, show_progress=False)
        serial = time.perf_counter() - start
        workers, threads = cf_jobs.job_plan(None, "cpu", len(backbones) * args.seeds, cores)
        start = time.perf_counter()
        jobs = make_jobs(args.run, backbones, args.seeds, args.epochs, scratch / "parallel")
        cf_jobs.run_in_workers(args.run, jobs, workers, threads, lambda job, result: None)
        parallel = time.perf_counter() - start
    print(f"{len(backbones) * args.seeds} runs x {args.epochs} epochs, {cores} cores")
    print(f"one after another, {cores} threads:        {serial:7.1f} s")
    print(f"{workers} worker processes, {threads} thread(s) each: {parallel:7.1f} s (process start included)")
    print(f"ratio workers / one after another: {parallel / serial:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
