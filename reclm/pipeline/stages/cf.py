"""Stages 11 and 12: the CF runs (backbones x feature modes x seeds, locally or on Ray) and the report."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from reclm.cachekeys import key_and_older, key_dump
from reclm.cf.features import uses_item_profiles, uses_user_profiles
from reclm.pipeline.config import PipelineConfig
from reclm.pipeline.engine import StageContext
from reclm.pipeline.stages.common import local_ray_cpus, user_generator
from reclm.pipeline.work import CF_WORK_UNIT, cf_epoch_seconds, cf_size_factor
from reclm.utils import write_json

SIDE_ABLATION = ("text+user-profiles", "text+item-profiles")


def cf_runs(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """Every CF run of the config: backbones x features x seeds, plus the ablation runs on
    ``cf.ablation_backbones`` (one side's profiles only; the earlier generators' profiles)."""
    final = user_generator(cfg) or "teacher"
    runs = []
    for backbone in cfg.cf.backbones:
        for features in cfg.cf.features:
            for seed in cfg.cf.seeds:
                variant = final if features.startswith("text+") else None
                runs.append(cf_run(backbone, features, seed, variant, final=True))
    if cfg.cf.side_ablation and any(f.startswith("text+") for f in cfg.cf.features):
        for backbone in cfg.cf.ablation_backbones:
            for features in SIDE_ABLATION:
                for seed in cfg.cf.seeds:
                    runs.append(cf_run(backbone, features, seed, final, final=True))
    if cfg.stages.ablation:
        for variant in cfg.stages.generators()[:-1]:
            for backbone in cfg.cf.ablation_backbones:
                for seed in cfg.cf.seeds:
                    runs.append(cf_run(backbone, "text+profiles", seed, variant, final=False))
    return runs


def cf_run(backbone: str, features: str, seed: int, variant: str | None, final: bool) -> dict[str, Any]:
    tag = f"@{variant}" if variant and not final else ""
    return {
        "name": f"{backbone}-{features}{tag}-s{seed}",
        "backbone": backbone,
        "features": features,
        "seed": seed,
        "variant": variant,
        "final": final,
    }


def run_train_cf(ctx: StageContext) -> dict:
    from reclm.pipeline import cf_jobs

    cfg = ctx.config
    runs = cf_runs(cfg)
    pending: list[cf_jobs.CFJob] = []
    units: dict[str, Any] = {}
    for position, run in enumerate(runs, 1):
        job, unit = cf_job(ctx, run)
        if unit.done:
            ctx.console.print(f"    train-cf {position}/{len(runs)} {run['name']}: cached", highlight=False)
            continue
        pending.append(job)
        units[job.name] = unit
    _, split = ctx.data()
    nodes, work, worker_peak = split.n_users + split.n_items, 0.0, 0.0
    positions = {run["name"]: position for position, run in enumerate(runs, 1)}

    def finished(job: cf_jobs.CFJob, result: cf_jobs.JobResult) -> None:
        nonlocal work, worker_peak
        units[job.name].commit()
        work += result.epochs_run * len(split.train) * cf_size_factor(job.params["backbone"], nodes)
        worker_peak = max(worker_peak, result.worker_peak_mb or 0.0)
        recall, ndcg = result.test.get("recall@20", float("nan")), result.test.get("ndcg@20", float("nan"))
        where = f"{positions[job.name]}/{len(runs)} {job.name}"
        ctx.console.print(f"    train-cf {where}: test recall@20 {recall:.4f} ndcg@20 {ndcg:.4f}", highlight=False)

    costs = {job.name: run_cost(job, len(split.train), nodes) for job in pending}
    priority = cf_jobs.chain_costs(pending, lambda job: costs[job.name])
    device = str(cfg.cf.params.get("device", "auto"))
    workers, threads = cf_jobs.job_plan(cfg.cf.jobs, device, len(pending), cfg.threads)
    on_ray = cfg.executor == "ray" and bool(pending)  # nothing to train: no Ray started
    if on_ray:
        train_cf_on_ray(ctx, pending, finished, costs, priority)
        ctx.note(f"each Ray worker process peaked at up to {worker_peak:.0f} MB (peak memory above is this process's)")
    elif workers > 1:
        ctx.note(f"{len(pending)} CF runs trained {workers} at a time, {threads} thread(s) each")
        with counted(finished, costs, f"cf runs, {workers} at a time") as finished_and_shown:
            cf_jobs.run_in_workers(ctx.root, pending, workers, threads, finished_and_shown, priority)
        ctx.note(f"each worker process peaked at up to {worker_peak:.0f} MB (peak memory above is this process's)")
    else:
        data, split = ctx.data()
        for job in cf_jobs.in_dependency_order(pending):  # a profile run after the text run it starts from
            finished(job, cf_jobs.train_job(job, data, split, None, show_progress=True))
    write_json(ctx.out / "runs.json", runs)
    return {
        "units": work,
        "unit": CF_WORK_UNIT,
        "runs": len(runs),
        "trained": len(pending),
        "jobs": None if on_ray else workers,  # on Ray: as many at a time as its resources allow
        "executor": "ray" if on_ray else "local",
        "worker_peak_memory_mb": round(worker_peak, 1) if workers > 1 or on_ray else None,
    }


def run_cost(job: Any, pairs: int, nodes: int) -> float:
    """A CF run's default cost at its epoch cap: what orders the runs (the slowest chains first)."""
    return cf_epoch_seconds(job.params["backbone"], pairs, nodes) * float(job.params.get("epochs", 1))


def train_cf_on_ray(
    ctx: StageContext, pending: list[Any], finished: Any, costs: dict[str, float], priority: dict[str, float]
) -> None:
    """``executor: ray``: the pending runs as Ray tasks (reclm.pipeline.cf_jobs.run_in_ray), each committed by
    ``finished`` as it ends. A local Ray gets the pipeline's thread budget as its CPUs."""
    import os

    from reclm.pipeline import cf_jobs

    options = ctx.config.ray
    cores = local_ray_cpus(ctx.config)
    address = options.address or os.environ.get("RAY_ADDRESS")
    where = address or f"a local Ray ({cores} CPUs)"
    threads = max(1, int(options.cpus_per_run))
    gpus = f", {options.gpus_per_run:g} GPU(s)" if options.gpus_per_run else ""
    each = f"{options.cpus_per_run:g} CPU(s){gpus} and {threads} thread(s) each"
    ctx.note(f"{len(pending)} CF runs as Ray tasks at {where}, {each}")
    with counted(finished, costs, "cf runs on ray") as finished_and_shown:
        cf_jobs.run_in_ray(ctx.root, pending, options, threads, finished_and_shown, num_cpus=cores, priority=priority)


@contextlib.contextmanager
def counted(finished: Any, costs: dict[str, float], label: str) -> Iterator[Any]:
    """``finished`` that also advances a progress bar (the CF executors' ``on_done``). The bar counts the
    estimated work (each run's ``costs`` share, in percent), not runs: the costliest runs go first, so a count
    of runs would overstate the time left; the runs done are shown beside it."""
    from rich.progress import BarColumn, TextColumn, TimeRemainingColumn

    from reclm.progress import progress

    total, runs = sum(costs.values()) or 1.0, len(costs)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[runs]}"))
    with progress(*columns, TimeRemainingColumn()) as bar:
        task = bar.add_task(f"{label}, estimated work %", total=100, runs=f"0/{runs} runs done")
        done, work = 0, 0.0

        def finished_and_shown(job: Any, result: Any) -> None:
            nonlocal done, work
            finished(job, result)
            done, work = done + 1, work + costs.get(job.name, 0.0)
            percent = 100 if done == runs else min(99, round(100 * work / total))
            bar.update(task, completed=percent, runs=f"{done}/{runs} runs done")

        yield finished_and_shown


def resolved_cf_params(params: dict[str, Any]) -> dict[str, Any]:
    """Every CFConfig field of a run, defaults included (so a changed default retrains it); not the
    thread count or device."""
    from reclm.cf import CFConfig

    return CFConfig(**params).cache_key()


def train_cf_config(cfg: PipelineConfig) -> dict[str, Any]:
    runs = cf_runs(cfg)
    resolved = [resolved_cf_params(cfg.cf.run_params(r["backbone"], r["features"], r["seed"])) for r in runs]
    return {"cf": key_dump(cfg.cf, mode="json", exclude={"jobs"}), "runs": runs, "resolved": resolved}


def cf_job(ctx: StageContext, run: dict[str, Any]) -> tuple[Any, Any]:
    """The job of one CF run and its cached unit (keyed by its parameters, split and feature files)."""
    from reclm.pipeline import cf_jobs
    from reclm.pipeline.hashing import path_hash

    embeddings = ctx.run.embeddings
    folder = embeddings if run["final"] else embeddings / "ablation" / str(run["variant"])
    params = ctx.config.cf.run_params(run["backbone"], run["features"], run["seed"])
    job = cf_jobs.CFJob(run["name"], params, Path(), extra={"pipeline_run": run})
    if run["features"] != "none":
        job.item_text = embeddings / "item_text.npz"
    if uses_user_profiles(run["features"]):
        job.user_profiles = folder / "users.npz"
    if uses_item_profiles(run["features"]):
        job.item_profiles = folder / "items.npz"
    files = [f for f in (job.item_text, job.user_profiles, job.item_profiles) if f is not None]
    shared = {"split": ctx.inputs["upstream"]["prepare"]}
    shared["files"] = {str(f.relative_to(ctx.root)): path_hash(f) for f in files}
    if params.get("from_text", "none") != "none" and run["features"].startswith("text+"):
        text = cf_run(run["backbone"], "text", run["seed"], None, final=True)
        if text["name"] in {r["name"] for r in cf_runs(ctx.config)}:
            _, text_unit = cf_job(ctx, text)
            job.text_run, job.after = text_unit.path, text["name"]
            shared["text_run"] = text_unit.key  # a retrained text run retrains the profile runs that use it
        else:  # a backbone of the ablation rows only: the grid has no text run of it
            params["from_text"] = "none"
    key, older = key_and_older(lambda: {"params": resolved_cf_params(params), **shared})
    unit = ctx.unit(run["name"], key, older)
    if not unit.done:
        job.out = unit.scratch()
    return job, unit


def run_report(ctx: StageContext) -> dict:
    from reclm.pipeline.report import write_report

    paths = write_report(ctx.root, ctx.out)
    return {"files": [p.name for p in paths]}
