"""The stage table of ``reclm run``: each stage's body, cache key, inputs and estimate, in run order.

Stage bodies and their keys live in :mod:`reclm.pipeline.stages`, estimates in
:mod:`reclm.pipeline.estimate`; this module joins them, so neither imports the other's caller.
"""

from __future__ import annotations

from reclm.cachekeys import key_dump, key_with_defaults
from reclm.pipeline import estimate as est
from reclm.pipeline.config import STAGE_ORDER, PipelineConfig
from reclm.pipeline.engine import Stage
from reclm.pipeline.stages.cf import run_report, run_train_cf, train_cf_config
from reclm.pipeline.stages.common import dataset_files, generators_on, resource_files, teacher_files
from reclm.pipeline.stages.data import run_neighbours, run_prepare, run_teacher, teacher_key, users_need_neighbours
from reclm.pipeline.stages.generation import (
    generation_backend,
    generation_batch_size,
    precision_key,
    writer_backend,
    writer_options,
)
from reclm.pipeline.stages.profiles import run_encode, run_profiles
from reclm.pipeline.stages.tuning import run_collab, run_item_side, run_reward, run_rl, run_sft

# where and how an openai backend is reached, not what it writes: at its defaults in the profiles and RL keys
GENERATION_TRANSPORT = ("base_url", "api_key_env", "concurrency", "cooldown")


def generation_settings(cfg: PipelineConfig) -> dict:
    """The generation section for a cache key, with the transport set to its defaults: which servers
    answer (more replicas, a moved server) changes no profile and no tuned adapter."""
    return key_with_defaults(cfg.generation, GENERATION_TRANSPORT, mode="json")


def sampling_settings(cfg: PipelineConfig) -> dict:
    """``generation_settings`` less what only the profiles stage decodes with (PPO samples without a
    repetition penalty, so setting one keeps a tuned writer)."""
    return {k: v for k, v in generation_settings(cfg).items() if k != "repetition_penalty"}


def generation_key(cfg: PipelineConfig) -> dict:
    """The profiles stage's generation and prompt settings, transport-free (``generation_settings``); the
    served model and the adapter's fingerprint, part of the generation cache's key, do count."""
    return {"generation": generation_settings(cfg), **cfg.section("prompt")}


def build_stages() -> list[Stage]:
    return [
        Stage(
            "prepare",
            "data",
            run_prepare,
            config=lambda c: {"dataset": str(c.dataset), "item_text": c.item_text, **c.section("split")},
            files=dataset_files,
            estimate=est.prepare,
            description="load the dataset, split it (train/valid/test, zero-shot items)",
        ),
        Stage(
            "teacher",
            "teacher",
            run_teacher,
            needs=("prepare",),
            config=teacher_key,
            files=teacher_files,
            estimate=est.teacher,
            description="teacher profiles for a sample of users and items",
        ),
        Stage(
            "sft",
            "sft",
            run_sft,
            needs=("prepare", "teacher"),
            config=lambda c: {
                "base": c.llm.base_model,
                "lora": key_dump(c.llm.lora),
                "sft": key_dump(c.llm.sft),
            },
            enabled=lambda c: c.stages.sft,
            estimate=est.sft,
            description="distillation: LoRA SFT of the small LM on the teacher pairs",
        ),
        Stage(
            "neighbours",
            "neighbours",
            run_neighbours,
            needs=("prepare",),
            config=lambda c: {
                **c.section("neighbours"),
                "users": users_need_neighbours(c),
                "encoder": c.encoder.model,  # item-text neighbours
            },
            files=resource_files,
            enabled=generators_on,
            estimate=est.neighbours,
            version=2,  # 2: items get text neighbours (one rule for trained and new items) + item_text.npz
            description="similar users from a CF model trained on train pairs; text-nearest items",
        ),
        Stage(
            "collab",
            "collab",
            run_collab,
            needs=("prepare", "teacher", "sft", "neighbours"),
            config=lambda c: {
                "base": c.llm.base_model,
                "lora": key_dump(c.llm.lora),
                "collab": key_dump(c.llm.collab),
                "prompt": c.section("prompt"),  # the distilled profiles' prompts
                "writer": {"backend": writer_backend(c), **writer_options(c)},
            },
            enabled=lambda c: c.stages.collab,
            estimate=est.collab,
            description="collaborative instruction tuning (two-turn dialogues)",
        ),
        Stage(
            "reward",
            "reward",
            run_reward,
            needs=("prepare", "teacher", "sft", "neighbours"),
            config=lambda c: {
                "base": c.llm.base_model,
                "lora": key_dump(c.llm.lora),
                "reward": key_dump(c.llm.reward),
            },
            files=resource_files,
            enabled=lambda c: c.stages.reward,
            estimate=est.reward,
            description="preference pairs and the reward model",
        ),
        Stage(
            "rl",
            "rl",
            run_rl,
            needs=("prepare", "teacher", "sft", "neighbours", "collab", "reward"),
            config=lambda c: {
                "kind": c.stages.rl,
                "rl": key_dump(c.llm.rl),
                "generation": sampling_settings(c),  # what PPO samples with
            },
            files=resource_files,
            enabled=lambda c: c.stages.rl != "none",
            estimate=est.rl,
            description="PPO (KL-penalised) or DPO on the profile writer",
        ),
        Stage(
            "item_side",
            "item_sft",
            run_item_side,
            needs=("prepare", "teacher", "sft", "neighbours"),
            config=lambda c: {
                "base": c.llm.base_model,
                "lora": key_dump(c.llm.lora),
                "item": key_dump(c.llm.item_side),
                "prompt": c.section("prompt"),  # the training prompts' budget
            },
            enabled=lambda c: c.stages.item_side,
            estimate=est.item_side,
            version=2,  # 2: one recipe for every item (text neighbours with teacher profiles, no own users)
            description="item-profile writer tuned on item text and neighbour items",
        ),
        Stage(
            "profiles",
            "profiles",
            run_profiles,
            needs=("prepare", "teacher", "sft", "neighbours", "collab", "rl", "item_side"),
            config=lambda c: {
                **generation_key(c),
                "resolved": {
                    "backend": generation_backend(c),
                    "batch_size": generation_batch_size(c),
                    **precision_key(c),
                },
                "base": c.llm.base_model,
                "chain": c.stages.generators(),
                "ablation": c.stages.ablation,
                "keep_teacher": c.llm.item_side.keep_teacher if c.stages.item_side else False,
                "encoder": c.encoder.model,  # of the quality report
            },
            estimate=est.profiles,
            version=2,  # 2: items in one pass by the one item recipe; teacher-only variant + item side writes items
            description="generate user and item profiles (final generator, and earlier ones for the ablation)",
        ),
        Stage(
            "encode",
            "embeddings",
            run_encode,
            needs=("prepare", "profiles"),
            config=lambda c: c.section("encoder"),
            estimate=est.encode,
            description="embed item text and profiles",
        ),
        Stage(
            "train_cf",
            "cf",
            run_train_cf,
            needs=("prepare", "encode"),
            config=train_cf_config,
            estimate=est.train_cf,
            description="train every backbone with and without profiles (full-shot and zero-shot test)",
        ),
        Stage(
            "report",
            "report",
            run_report,
            needs=STAGE_ORDER[:-1],
            config=lambda c: c.section("report"),
            estimate=est.report,
            description="paper-style tables, significance, costs, plots: report.md and report.html",
        ),
    ]


STAGES = build_stages()
STAGE_NAMES = [s.name for s in STAGES]

__all__ = ["STAGES", "STAGE_NAMES", "build_stages"]
