"""``reclm neighbours | collab | reward | rl | item-side | audit``: the RecLM-specific tuning stages,
each reading and writing one prepared run directory."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from reclm.cli.common import app, console, friendly_errors
from reclm.cli.defaults import RUN, prompt_budget, writer_options
from reclm.rundir import RunDir

LLM, PROMPT, GEN = RUN.llm, RUN.prompt, RUN.generation
COLLAB, REWARD, RL, ITEM = LLM.collab, LLM.reward, LLM.rl, LLM.item_side


def load_run(run: Path):
    rundir = RunDir(run)
    data, split = rundir.load()
    return rundir, data, split


def say(text: str) -> None:
    console.print(text, highlight=False, soft_wrap=True)


def show(payload: dict) -> None:
    console.print_json(json.dumps(payload, default=str))


def lora_options(r: int, alpha: int) -> dict:
    return {"r": r, "alpha": alpha}


@app.command("neighbours")
@friendly_errors
def neighbours_command(
    run: Path = typer.Argument(..., help="Prepared run directory."),
    k: int = typer.Option(RUN.neighbours.k, help="Neighbours per user / item."),
    source: str = typer.Option(
        RUN.neighbours.source, help="cf (a train-only CF model's embeddings) | shipped (the dataset's lists)."
    ),
    backbone: str = typer.Option(
        RUN.neighbours.backbone, help="cf: backbone trained when RUN/cf has no feature-free run."
    ),
    epochs: int = typer.Option(RUN.neighbours.epochs, help="cf: epochs of that backbone."),
    embeddings: Path = typer.Option(None, help="cf: an embeddings.npz to use instead (train-only model)."),
    items: bool = typer.Option(True, help="Also item neighbours (text similarity, the same for every item)."),
) -> None:
    """Similar users (RUN/neighbours/users.npz) and related items (items.npz), from train interactions only."""
    from reclm.llm.neighbours import build_neighbours

    rundir, data, split = load_run(run)
    summary = build_neighbours(rundir, data, split, k, source, backbone, epochs, embeddings, items)
    show(summary)


@app.command("collab")
@friendly_errors
def collab_command(
    run: Path = typer.Argument(..., help="Prepared run with sft/adapter and neighbours/."),
    base_model: str = typer.Option(LLM.base_model, help="Base model (packaged name or HF folder)."),
    dialogues: int = typer.Option(COLLAB.dialogues, help="Target users / dialogues (default: steps x batch size)."),
    neighbours: int = typer.Option(COLLAB.neighbours, help="Similar users shown per dialogue."),
    target_items: int = typer.Option(COLLAB.target_items, help="Most recent target history items shown."),
    neighbour_items: int = typer.Option(COLLAB.neighbour_items, help="Most recent items shown per similar user."),
    max_tokens: int = typer.Option(COLLAB.max_tokens, help="Token budget of a whole dialogue."),
    max_words: int = typer.Option(COLLAB.max_words, help="Words kept of each item field."),
    profiles: str = typer.Option(COLLAB.profiles, help="Turn-1 responses: distilled (SFT model) | teacher."),
    steps: int = typer.Option(COLLAB.steps, help="Optimizer steps."),
    batch_size: int = typer.Option(COLLAB.batch_size, help="Dialogues per step."),
    lr: float = typer.Option(COLLAB.lr, help="Learning rate."),
    max_seq_len: int = typer.Option(COLLAB.max_seq_len, help="Longer dialogues are skipped."),
    lora_r: int = typer.Option(LLM.lora.r, help="LoRA rank (used when no adapter is continued; alpha: 2 x rank)."),
    seed: int = typer.Option(COLLAB.seed, help="Seed of targets, masks, negatives and training."),
    evaluate: bool = typer.Option(COLLAB.evaluate, help="Held-out Yes/No accuracy before and after."),
    backend: str = typer.Option(
        GEN.backend, help="Generation backend of the distilled profiles: ctranslate2 (ct2) | transformers."
    ),
) -> None:
    """Collaborative instruction tuning: two-turn dialogues, continuing the SFT adapter (RUN/collab/adapter)."""
    from reclm.llm.collab import CollabBudget, run_collab
    from reclm.pipeline.inputs import collab_inputs

    rundir, data, split = load_run(run)
    budget = CollabBudget(target_items, neighbour_items, max_words, neighbours, max_tokens)
    summary = run_collab(
        data, split, base_model, rundir.stage("collab"), **collab_inputs(rundir, data), dialogues=dialogues,
        budget=budget, prompt_budget=prompt_budget(), lora=lora_options(lora_r, 2 * lora_r), writer=writer_options(),
        train={"steps": steps, "batch_size": batch_size, "lr": lr, "max_seq_len": max_seq_len, "seed": seed},
        profile_source=profiles, seed=seed, evaluate=evaluate, backend=backend, log=say,
    )  # fmt: skip
    show({k: v for k, v in summary.items() if k != "train"})


@app.command("reward")
@friendly_errors
def reward_command(
    run: Path = typer.Argument(..., help="Prepared run with teacher/ (and sft/ to know which users it used)."),
    base_model: str = typer.Option(LLM.base_model, help="Base model of the reward model."),
    source: str = typer.Option(REWARD.source, help="Chosen profiles: teacher | distilled (RUN/profiles/users.jsonl)."),
    pairs: int = typer.Option(REWARD.pairs, help="Preference pairs (users) to build (default: all eligible)."),
    eval_share: float = typer.Option(REWARD.eval_share, help="Share of users held out for the accuracy report."),
    steps: int = typer.Option(REWARD.steps, help="Optimizer steps."),
    batch_size: int = typer.Option(REWARD.batch_size, help="Pairs per step."),
    lr: float = typer.Option(REWARD.lr, help="LoRA learning rate (the score head gets 10x)."),
    max_seq_len: int = typer.Option(
        REWARD.max_seq_len, help="Tokens per (prompt, profile); the prompt's start is cut."
    ),
    max_history: int = typer.Option(PROMPT.max_items, help="Most recent train items in the prompt."),
    max_words: int = typer.Option(PROMPT.max_words, help="Words kept of each item field."),
    prompt_style: str = typer.Option(PROMPT.style, help="Prompt layout: compact | paper."),
    lora_layers: int = typer.Option(None, help="LoRA only in the top N layers (cheaper steps) (default: all)."),
    seed: int = typer.Option(REWARD.seed, help="Seed of pairs, split and training."),
) -> None:
    """Preference pairs (RUN/reward/pairs.jsonl) and the reward model (RUN/reward/adapter), with held-out
    pairwise accuracy per negative kind."""
    from reclm.llm.reward import RewardConfig, run_reward
    from reclm.pipeline.inputs import reward_inputs

    rundir, data, split = load_run(run)
    config = RewardConfig(
        steps=steps, batch_size=batch_size, lr=lr, max_seq_len=max_seq_len, seed=seed, lora_layers=lora_layers
    )
    result = run_reward(
        data, split, base_model, rundir.stage("reward"), **reward_inputs(rundir, data, split, source),
        config=config, source=source, max_pairs=pairs, eval_share=eval_share,
        budget=prompt_budget(max_items=max_history, max_words=max_words, style=prompt_style), log=say,
    )  # fmt: skip
    show({"pairs": result.pairs, "before": result.before, "after": result.after, "seconds": result.seconds})


@app.command("rl")
@friendly_errors
def rl_command(
    run: Path = typer.Argument(..., help="Prepared run with sft/ (or collab/) adapter; PPO also needs reward/."),
    method: str = typer.Option(RUN.stages.rl, help="ppo | dpo | none."),
    base_model: str = typer.Option(LLM.base_model, help="Base model."),
    steps: int = typer.Option(RL.steps, help="RL steps."),
    batch_size: int = typer.Option(RL.batch_size, help="Rollouts (PPO) or pairs (DPO) per step."),
    lr: float = typer.Option(RL.lr, help="Learning rate."),
    kl_coef: float = typer.Option(RL.kl_coef, help="PPO: KL penalty against the reference."),
    beta: float = typer.Option(RL.beta, help="DPO: temperature."),
    max_new_tokens: int = typer.Option(GEN.max_new_tokens, help="Profile length limit."),
    max_history: int = typer.Option(PROMPT.max_items, help="Most recent train items in the prompt."),
    max_words: int = typer.Option(PROMPT.max_words, help="Words kept of each item field."),
    prompt_style: str = typer.Option(PROMPT.style, help="Prompt layout: compact | paper."),
    eval_users: int = typer.Option(RL.eval_users, help="Held-out users whose greedy profiles judge the policy."),
    seed: int = typer.Option(RL.seed, help="Seed."),
) -> None:
    """PPO (reward model + KL penalty) or DPO (preference pairs) on the profile writer (RUN/rl/adapter)."""
    from reclm.llm.rl.stage import run_rl
    from reclm.pipeline.inputs import rl_inputs

    rundir, data, split = load_run(run)
    options = {"steps": steps, "batch_size": batch_size, "lr": lr, "kl_coef": kl_coef, "beta": beta, "seed": seed}
    budget = prompt_budget(max_items=max_history, max_words=max_words, style=prompt_style)
    summary = run_rl(
        data, split, base_model, method, rundir.stage("rl"), **rl_inputs(rundir, data, method), options=options,
        budget=budget, eval_users=eval_users, max_new_tokens=max_new_tokens, log=say,
    )  # fmt: skip
    show({k: v for k, v in summary.items() if k != "steps"})


@app.command("item-side")
@friendly_errors
def item_side_command(
    run: Path = typer.Argument(..., help="Prepared run with teacher/items.jsonl."),
    base_model: str = typer.Option(LLM.base_model, help="Base model."),
    steps: int = typer.Option(ITEM.steps, help="SFT steps of the item writer (0: skip training, reuse the adapter)."),
    batch_size: int = typer.Option(ITEM.batch_size, help="Examples per step."),
    lr: float = typer.Option(ITEM.lr, help="Learning rate."),
    max_seq_len: int = typer.Option(ITEM.max_seq_len, help="Longer examples are skipped."),
    init: str = typer.Option(ITEM.init, help="Start from: sft (the user writer's adapter) | fresh."),
    generate: bool = typer.Option(True, help="Then write profiles of every item (RUN/item_sft/items.jsonl)."),
    limit: int = typer.Option(GEN.items, help="Generate for the first N items only (a documented subset)."),
    keep_teacher: bool = typer.Option(ITEM.keep_teacher, help="Items with a teacher profile keep it."),
    max_words: int = typer.Option(PROMPT.max_words, help="Words kept of each item field."),
    prompt_style: str = typer.Option(PROMPT.style, help="Prompt layout: compact | paper."),
    max_neighbours: int = typer.Option(PROMPT.max_neighbours, help="Neighbour items shown per item prompt."),
    backend: str = typer.Option(GEN.backend, help="Generation backend: ctranslate2 (ct2) | transformers."),
) -> None:
    """Item-profile writer: SFT on item text + neighbour items with their profiles, then every item's profile."""
    from reclm.distributed import is_main_process, refuse_data_parallel
    from reclm.llm.collab import profile_writer
    from reclm.llm.item_side import generate_item_profiles, train_item_writer
    from reclm.pipeline.inputs import item_inputs

    if generate:  # before training, not after it: under accelerate launch only the training is shared
        refuse_data_parallel("item-side generation (pass --no-generate, then generate in one process)")
    rundir, data, split = load_run(run)
    budget = prompt_budget(max_words=max_words, max_neighbours=max_neighbours, style=prompt_style)
    folder = rundir.stage("item_sft")
    recipe = item_inputs(rundir, data)
    if steps > 0:
        init_adapter = None
        if init == "sft":
            init_adapter = rundir.stage_adapter("sft")
            if init_adapter is None:
                missing = rundir.stage("sft") / "adapter"
                raise FileNotFoundError(f"{missing}: no SFT adapter (run `reclm sft` or pass --init fresh)")
        train = {"steps": steps, "batch_size": batch_size, "lr": lr, "max_seq_len": max_seq_len, "seed": ITEM.seed}
        summary = train_item_writer(
            data, split, base_model, folder, **recipe, budget=budget, train=train, init_adapter=init_adapter
        )
        if is_main_process():
            say(f"item writer: {summary['examples']} examples, held-out loss {summary['heldout_loss_before']} -> "
                f"{summary['heldout_loss_after']}")  # fmt: skip
    if generate:
        adapter = rundir.stage_adapter("item_sft")
        if adapter is None:
            raise FileNotFoundError(f"{folder / 'adapter'}: no item writer yet (run with --steps > 0)")
        items = list(range(min(limit, data.n_items))) if limit else None
        writer = profile_writer(base_model, adapter, backend, **writer_options())
        try:
            summary = generate_item_profiles(
                data, split, writer, folder, **recipe, budget=budget, items=items, keep_teacher=keep_teacher
            )
        finally:
            writer.close()
        show(summary)


@app.command("audit")
@friendly_errors
def audit_command(run: Path = typer.Argument(..., help="Run directory to audit.")) -> None:
    """Prove that no validation or test pair appears in any prompt of any stage (exit 1 when one does)."""
    from reclm.llm.audit import audit_run

    rundir, data, split = load_run(run)
    report = audit_run(rundir, data, split)
    show(report.to_dict())
    if not report.ok:
        raise typer.Exit(1)
