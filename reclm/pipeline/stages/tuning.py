"""Stages 3 and 5-8, the RecLM tuning: distillation SFT, collaborative tuning, reward model, RL, item side."""

from __future__ import annotations

from reclm.pipeline import inputs
from reclm.pipeline.engine import StageContext, StageUnavailable
from reclm.pipeline.stages.common import logger, lora_of, prompt_budget, summary_of, train_of
from reclm.pipeline.stages.generation import writer_backend, writer_options


def run_sft(ctx: StageContext) -> dict:
    """Distillation: LoRA SFT of the base model on the teacher's user pairs (reclm.llm.sft); resumes
    from its own checkpoints when an interrupted attempt left them."""
    from reclm.llm import sft

    cfg = ctx.config
    result = sft.train_sft(
        ctx.run.teacher,
        ctx.out,
        base_model=cfg.llm.base_model,
        lora=cfg.llm.lora.model_dump(),
        kind="user",
        **cfg.llm.sft.model_dump(),
    )
    info = result.to_dict()
    info.pop("train_curve", None)
    ctx.console.print(
        f"    sft: {result.steps} steps, held-out loss {result.heldout_loss_before} -> {result.heldout_loss_after}",
        highlight=False,
    )
    return {**info, "tokens": {"train": result.train_tokens}, "units": result.steps, "unit": "step"}


def run_collab(ctx: StageContext) -> dict:
    """Collaborative instruction tuning: two-turn dialogues continuing the SFT adapter."""
    from reclm.llm import collab

    cfg, opts = ctx.config, ctx.config.llm.collab
    data, split = ctx.data()
    budget = collab.CollabBudget(
        opts.target_items, opts.neighbour_items, opts.max_words, opts.neighbours, opts.max_tokens
    )
    summary = collab.run_collab(
        data, split, cfg.llm.base_model, ctx.out, **inputs.collab_inputs(ctx.run, data),
        dialogues=opts.dialogues, budget=budget, prompt_budget=prompt_budget(cfg), lora=lora_of(cfg),
        train=train_of(opts), profile_source=opts.profiles, seed=opts.seed, evaluate=opts.evaluate,
        log=logger(ctx), backend=writer_backend(cfg), writer=writer_options(cfg),
    )  # fmt: skip
    train = summary.get("train", {})
    return {**summary, "tokens": {"train": train.get("train_tokens", 0)}, "units": opts.steps, "unit": "step"}


def run_reward(ctx: StageContext) -> dict:
    """Preference pairs (good profile vs the paper's negative kinds) and the reward model."""
    from reclm.llm import reward

    cfg, opts = ctx.config, ctx.config.llm.reward
    data, split = ctx.data()
    config = reward.RewardConfig(**train_of(opts), lora=lora_of(cfg))
    result = reward.run_reward(
        data, split, cfg.llm.base_model, ctx.out, **inputs.reward_inputs(ctx.run, data, split, opts.source),
        config=config, source=opts.source, max_pairs=opts.pairs, eval_share=opts.eval_share,
        budget=prompt_budget(cfg), log=logger(ctx),
    )  # fmt: skip
    return {**summary_of(result, unit="step", units=opts.steps), "tokens": 0}


def run_rl(ctx: StageContext) -> dict:
    """PPO against the reward model (KL-penalised) or DPO on the preference pairs."""
    from reclm.llm.rl import stage as rl

    cfg, opts = ctx.config, ctx.config.llm.rl
    data, split = ctx.data()
    options = {**train_of(opts), "kl_coef": opts.kl_coef, "beta": opts.beta}
    summary = rl.run_rl(
        data, split, cfg.llm.base_model, cfg.stages.rl, ctx.out, **inputs.rl_inputs(ctx.run, data, cfg.stages.rl),
        options=options, budget=prompt_budget(cfg), eval_users=opts.eval_users,
        max_new_tokens=cfg.generation.max_new_tokens, log=logger(ctx),
    )  # fmt: skip
    summary.pop("steps", None)
    return {**summary, "units": opts.steps, "unit": "step"}


def run_item_side(ctx: StageContext) -> dict:
    """The item-profile writer: SFT on item text + neighbour items with their profiles (the profiles
    stage then writes every item's profile with it)."""
    from reclm.llm import item_side

    cfg, opts = ctx.config, ctx.config.llm.item_side
    data, split = ctx.data()
    init = None
    if opts.init == "sft":
        init = ctx.run.stage_adapter("sft")
        if init is None:
            raise StageUnavailable("stage 'item_side': llm.item_side.init is 'sft' but the run has no sft/adapter")
    summary = item_side.train_item_writer(
        data, split, cfg.llm.base_model, ctx.out, **inputs.item_inputs(ctx.run, data),
        budget=prompt_budget(cfg), lora=lora_of(cfg), train=train_of(opts), init_adapter=init,
    )  # fmt: skip
    summary.pop("train_curve", None)
    return {**summary, "tokens": {"train": summary.get("train_tokens", 0)}, "units": opts.steps, "unit": "step"}
