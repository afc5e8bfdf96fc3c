"""What each tuning stage reads from a run directory, resolved into the arguments its function takes.

The stage functions in :mod:`reclm.llm` take their inputs (adapters, pairs, profiles, neighbours) as
arguments and never look inside a run; the pipeline's stage bodies, the CLI commands and the benchmarks call
these to find them. Which adapter a stage left, and which users SFT held out, is :class:`RunDir`'s answer.
Each function returns keyword arguments of its stage function.
"""

from __future__ import annotations

from typing import Any

from reclm.data.dataset import RecDataset
from reclm.data.split import Split
from reclm.rundir import RunDir


def sft_users(run: RunDir) -> set[str]:
    """Raw ids of the teacher users SFT may have trained on (every teacher user before SFT ran)."""
    from reclm.llm.reward import sft_user_ids

    return sft_user_ids(run.teacher / "users.jsonl", run.sft_heldout("user"))


def collab_inputs(run: RunDir, data: RecDataset) -> dict[str, Any]:
    """:func:`reclm.llm.collab.run_collab`'s inputs: the SFT adapter, similar users, teacher user profiles."""
    from reclm.llm.neighbours import load_neighbours

    init_adapter = run.collab_start_adapter()
    neighbours = load_neighbours(run, data, "user").as_dict()
    return {"init_adapter": init_adapter, "neighbours": neighbours, "teacher_users": run.teacher / "users.jsonl"}


def reward_inputs(run: RunDir, data: RecDataset, split: Split, source: str) -> dict[str, Any]:
    """:func:`reclm.llm.reward.run_reward`'s inputs: the ``source`` user profiles, the users SFT may have
    trained on, and what the neighbour negatives are drawn from (the CF user embeddings, else the lists)."""
    from reclm.llm.neighbours import user_neighbour_lists, user_vectors

    profiles = run.user_profiles(source)
    used = sft_users(run)
    vectors = user_vectors(run, split)
    lists = user_neighbour_lists(run, data) if vectors is None else None
    return {"profiles": profiles, "sft_users": used, "user_vectors": vectors, "neighbour_lists": lists}


def rl_inputs(run: RunDir, data: RecDataset, method: str) -> dict[str, Any]:
    """:func:`reclm.llm.rl.stage.run_rl`'s inputs: the adapter it starts from, the reward model (PPO needs
    one), and for DPO the reward stage's pairs, else the teacher profiles and similar users to build them."""
    from reclm.llm.rl.stage import check_method

    check_method(method)
    if method == "none":
        return {"init_adapter": None}
    init_adapter = run.rl_start_adapter()
    reward_adapter = run.stage_adapter("reward")
    if reward_adapter is None and method == "ppo":
        raise FileNotFoundError(f"{run.root}: PPO needs the reward model (reward/adapter): run `reclm reward` first")
    inputs: dict[str, Any] = {"init_adapter": init_adapter, "reward_adapter": reward_adapter}
    if method == "dpo":
        inputs.update(dpo_pairs(run, data))
    return inputs


def dpo_pairs(run: RunDir, data: RecDataset) -> dict[str, Any]:
    """The reward stage's ``pairs.jsonl``; without one, what DPO builds pairs from: the teacher profiles of
    users SFT did not train on, and the run's similar users (none: random other users)."""
    from reclm.llm.neighbours import user_neighbour_lists
    from reclm.llm.reward import PAIRS_FILE, chosen_profiles

    pairs = run.stage("reward") / PAIRS_FILE
    if pairs.is_file():
        return {"pairs": pairs}
    chosen = chosen_profiles(data, run.user_profiles("teacher"), exclude=sft_users(run))
    return {"pairs": None, "chosen": chosen, "neighbours": user_neighbour_lists(run, data) or {}}


def item_inputs(run: RunDir, data: RecDataset) -> dict[str, Any]:
    """The item side's inputs (:func:`reclm.llm.item_side.train_item_writer`, ``generate_item_profiles``): the
    teacher's item profiles and the item-text embeddings of the neighbours stage (None: computed there)."""
    from reclm.llm.neighbours import load_item_text

    return {"teacher_items": run.teacher / "items.jsonl", "text_vectors": load_item_text(run.stage("neighbours"), data)}
