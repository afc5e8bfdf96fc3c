"""Stages 1, 2 and 4: prepare (dataset and split), teacher (its profiles), neighbours (similar users, related items)."""

from __future__ import annotations

from typing import Any

from reclm.pipeline.config import PipelineConfig
from reclm.pipeline.engine import StageContext, StageError
from reclm.pipeline.stages.common import offline_item_target, prompt_budget
from reclm.rundir import RunDir


def run_prepare(ctx: StageContext) -> dict:
    cfg = ctx.config
    run = RunDir(ctx.root, redirect={"data": ctx.out})
    data, split = run.prepare(str(cfg.dataset), cfg.split.spec(), item_text=cfg.item_text)
    ctx.shared["data"] = (data, split)
    return {"units": data.n_interactions, "unit": "interaction", **split.stats(), "dataset": data.summary()}


def make_teacher(cfg: PipelineConfig, progress: bool = True) -> Any:
    from reclm.llm import teachers

    options: dict[str, Any] = {
        "budget": prompt_budget(cfg),
        "max_users": cfg.teacher.users,
        "max_items": cfg.teacher.items,
        "seed": cfg.teacher.seed,
        "progress": progress,
    }
    kind = cfg.stages.teacher
    if kind == "file":
        files = {"user_file": cfg.teacher.user_file, "item_file": cfg.teacher.item_file}
        options.update(files, prompt_from=cfg.teacher.prompt_from)
    elif kind == "openai":
        endpoint = {**cfg.teacher.openai.model_dump(), "max_cost": cfg.teacher.max_cost}
        options["endpoint"] = teachers.EndpointConfig(**endpoint)
    return teachers.make_teacher(kind, **options)


# how the openai teacher asks and pays, not what it answers: kept out of the stage key (changing them keeps the work)
TEACHER_TRANSPORT = ("api_key_env", "concurrency", "max_retries", "timeout", "price_in", "price_out")


def teacher_key(cfg: PipelineConfig) -> dict:
    """The teacher stage's key: what changes its profiles. The transport and price fields are set to their
    defaults rather than dropped, and the spending cap is left out, so that runs made before keep their keys."""
    from reclm.cachekeys import key_with_defaults

    section = cfg.section("teacher", "prompt")
    section["teacher"].pop("max_cost")
    section["teacher"]["openai"] = key_with_defaults(cfg.teacher.openai, TEACHER_TRANSPORT, mode="json")
    return {"kind": cfg.stages.teacher, **section, **offline_item_target(cfg)}


def run_teacher(ctx: StageContext) -> dict:
    from reclm.llm import teachers

    data, split = ctx.data()
    teacher = make_teacher(ctx.config)
    if ctx.previous is not None and ctx.config.stages.teacher == "openai":
        teacher.adopt(ctx.previous, ctx.out)  # earlier answers and the ledger outlive a key change
    try:
        report = teacher.run(data, split, RunDir(ctx.root, redirect={"teacher": ctx.out}))
    except teachers.SpendingCapReached as exc:
        raise StageError(f"stage 'teacher': {exc}") from None
    info = report.to_dict()
    ledger = info.get("extra", {}).get("ledger") or {}
    tokens = {"prompt": ledger.get("prompt_tokens", 0), "completion": ledger.get("completion_tokens", 0)}
    written = sum(info["written"].values()) + sum(info["resumed"].values())
    for note in report.notes:
        ctx.note(note)
    ctx.console.print(
        f"    teacher {ctx.config.stages.teacher}: {info['written']['user'] + info['resumed']['user']} users, "
        f"{info['written']['item'] + info['resumed']['item']} items",
        highlight=False,
    )
    return {"units": written, "unit": "profile", "tokens": tokens, "teacher": info}


def run_neighbours(ctx: StageContext) -> dict:
    """Similar users from train pairs only (reclm.llm.neighbours: cosine top-k of the embeddings of a CF model
    trained here, or the dataset's shipped lists), when a user-side stage reads them; every item's text
    neighbours and the item-text embeddings the item side picks its neighbours with."""
    from reclm.llm import neighbours as module
    from reclm.text.encoder import TextEncoder

    cfg = ctx.config.neighbours
    data, split = ctx.data()
    # RUN/cf is pointed at a folder that does not exist, so that the CF model is always the one
    # trained here from this stage's declared inputs (never a leftover of an earlier run).
    run = RunDir(ctx.root, redirect={"neighbours": ctx.out, "cf": ctx.out / "no-cf"})
    users = users_need_neighbours(ctx.config)
    encoder = TextEncoder(ctx.config.encoder.model, batch_size=ctx.config.encoder.batch_size)
    summary = module.build_neighbours(
        run, data, split, k=cfg.k, source=cfg.source, backbone=cfg.backbone, epochs=cfg.epochs, encoder=encoder,
        users=users,
    )  # fmt: skip
    trained = users and cfg.source == "cf"
    units = cfg.epochs * len(split.train) if trained else len(split.train) if users else 0  # 0: no speed to record
    return {"units": units, "unit": "epoch-interaction", **summary}


def users_need_neighbours(cfg: PipelineConfig) -> bool:
    """Collaborative tuning, the reward model and RL read similar users; the item side needs item text only."""
    return bool(cfg.stages.collab or cfg.stages.reward or cfg.stages.rl != "none")
