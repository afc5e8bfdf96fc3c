"""``reclm run --dry-run`` estimates: time and tokens per stage, from the dataset's size and per-unit speeds.

Each stage's cost is ``overhead + units x seconds_per_unit``. The units are counted from the config
and the dataset (users, items, train pairs); the speeds are the defaults below, measured on the
project's reference machine (2-core AMD EPYC, AVX-512, torch 2.13 CPU, both cores free), unless a
finished stage on *this* machine (same core count) measured its own speed: those are kept in
``$RECLM_CACHE/pipeline/speeds.json`` and take precedence (the plan says which basis it used).

Default constants (reference machine; ``GENERATION_TOKENS_PER_SECOND`` and ``LORA_SECONDS_PER_TOKEN``
from ../shared/MODELS.md, the others measured with the pipeline's own stages on ml-100k):

- PREPARE_PER_INTERACTION: seconds per interaction to load and split (ml-100k: about 1.5 s).
- TEACHER_OFFLINE_PER_PROFILE, TEACHER_FILE_PER_PROFILE: seconds per teacher profile (prompt building).
- TEACHER_OPENAI_PER_REQUEST: seconds per request, divided by the concurrency (gpt-3.5, ~100 tokens out).
- LORA_SECONDS_PER_TOKEN: LoRA training (SmolLM2-135M, r=8 on q/k/v/o) per training token; a step of
  ``batch_size`` sequences of about ``prompt + profile`` tokens (MODELS.md: seq 384 took 3.05 s).
- GENERATION_TOKENS_PER_SECOND: new tokens per second per backend at batch 16 (MODELS.md: transformers
  59.7 tok/s total; CTranslate2 int8 1.6 prompts/s x 40 tokens).
- CF_SECONDS_PER_EPOCH_PAIR: seconds per train pair per epoch per backbone, including the full-ranking
  validation of that epoch (ml-100k, 2 threads).
- ENCODE_TEXTS_PER_SECOND: all-MiniLM-L6-v2 sentences per second (MODELS.md: 216 on 2 threads).
- PROMPT_BASE_TOKENS + PROMPT_TOKENS_PER_ITEM x ``prompt.max_items``: prompt length in tokens.

The CF runs stop early (``patience``), so their estimate is an upper bound: ``cf.params.epochs``
epochs each. Teacher tokens are counted only for the ``openai`` teacher (the others are free).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reclm.pipeline.cache import Estimate, SpeedBook
from reclm.pipeline.config import PipelineConfig

PREPARE_PER_INTERACTION = 1.5e-5
TEACHER_OFFLINE_PER_PROFILE = 2e-3
TEACHER_FILE_PER_PROFILE = 2e-3
TEACHER_OPENAI_PER_REQUEST = 2.0
LORA_SECONDS_PER_TOKEN = 8e-3
MODEL_LOAD_SECONDS = 5.0
GENERATION_TOKENS_PER_SECOND = {"transformers": 60.0, "ctranslate2": 64.0, "openai": 400.0}
CF_SECONDS_PER_EPOCH_PAIR = {"bias-mf": 4e-6, "ncf": 1.2e-5, "lightgcn": 1.2e-5, "sgl": 3e-5, "simgcl": 2.5e-5}
CF_DEFAULT_EPOCHS = 300
ENCODE_TEXTS_PER_SECOND = 200.0
PROMPT_BASE_TOKENS = 60
PROMPT_TOKENS_PER_ITEM = 14
PROFILE_TOKENS = 48  # a typical profile's length


@dataclass
class DataSize:
    users: int
    items: int
    interactions: int
    train: int
    measured: bool  # from the prepared split (else from the dataset before splitting)


def data_size(cfg: PipelineConfig, root: Path) -> DataSize:
    """Counts from the run's saved split when prepared, else from the dataset itself."""
    info_path = root / "data" / "split.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        stats = info.get("stats", {})
        total = stats.get("train", 0) + stats.get("valid", 0) + stats.get("test", 0)
        return DataSize(info["n_users"], info["n_items"], total, stats.get("train", 0), True)
    from reclm.data.loaders import load_dataset

    data = load_dataset(str(cfg.dataset), item_text=cfg.item_text)
    train = int(data.n_interactions * cfg.split.ratios[0])
    return DataSize(data.n_users, data.n_items, data.n_interactions, train, False)


def prompt_tokens(cfg: PipelineConfig) -> int:
    return PROMPT_BASE_TOKENS + PROMPT_TOKENS_PER_ITEM * cfg.prompt.max_items


def calibrated(stage: str, unit: str, units: float, default_spu: float, speeds: SpeedBook | None, overhead=0.0):
    measured = speeds.seconds_per_unit(stage, unit) if speeds else None
    spu = measured if measured is not None else default_spu
    return overhead + units * spu, "measured" if measured is not None else "default"


def prepare(cfg: PipelineConfig, size: DataSize, speeds: SpeedBook | None = None) -> Estimate:
    seconds, basis = calibrated("prepare", "interaction", size.interactions, PREPARE_PER_INTERACTION, speeds)
    return Estimate(seconds, 0, size.interactions, "interaction", basis)


def teacher_counts(cfg: PipelineConfig, size: DataSize) -> int:
    users = min(cfg.teacher.users or size.users, size.users)
    items = min(cfg.teacher.items or size.items, size.items)
    if cfg.stages.teacher == "file":  # at most what the files hold
        users = min(users, count_lines(cfg.teacher.user_file, cfg.dataset, "teacher_user_profiles.jsonl"))
        items = min(items, count_lines(cfg.teacher.item_file, cfg.dataset, "teacher_item_profiles.jsonl"))
    return users + items


def count_lines(path: str | None, dataset: str, shipped: str) -> int:
    file = Path(path).expanduser() if path else Path(str(dataset)).expanduser() / shipped
    if not file.is_file():
        return 0
    with file.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def teacher(cfg: PipelineConfig, size: DataSize, speeds: SpeedBook | None = None) -> Estimate:
    n = teacher_counts(cfg, size)
    kind = cfg.stages.teacher
    if kind == "openai":
        per = TEACHER_OPENAI_PER_REQUEST / cfg.teacher.openai.concurrency
        tokens = n * (prompt_tokens(cfg) + cfg.teacher.openai.max_tokens)
    else:
        per = TEACHER_OFFLINE_PER_PROFILE if kind == "offline" else TEACHER_FILE_PER_PROFILE
        tokens = 0
    seconds, basis = calibrated("teacher", "profile", n, per, speeds)
    return Estimate(seconds, tokens, n, "profile", basis)


def training(stage: str, cfg: PipelineConfig, opts: Any, speeds: SpeedBook | None, turns: int = 1) -> Estimate:
    """LoRA training: steps x batch x sequence tokens at LORA_SECONDS_PER_TOKEN."""
    seq = min(opts.max_seq_len, turns * (prompt_tokens(cfg) + PROFILE_TOKENS))
    tokens = opts.steps * opts.batch_size * seq
    spu = LORA_SECONDS_PER_TOKEN * opts.batch_size * seq
    seconds, basis = calibrated(stage, "step", opts.steps, spu, speeds, overhead=MODEL_LOAD_SECONDS)
    return Estimate(seconds, tokens, opts.steps, "step", basis)


def sft(cfg: PipelineConfig, size: DataSize, speeds: SpeedBook | None = None) -> Estimate:
    return training("sft", cfg, cfg.llm.sft, speeds)


def collab(cfg: PipelineConfig, size: DataSize, speeds: SpeedBook | None = None) -> Estimate:
    return training("collab", cfg, cfg.llm.collab, speeds, turns=1 + cfg.llm.collab.neighbours)


def reward(cfg: PipelineConfig, size: DataSize, speeds: SpeedBook | None = None) -> Estimate:
    return training("reward", cfg, cfg.llm.reward, speeds, turns=2)


def rl(cfg: PipelineConfig, size: DataSize, speeds: SpeedBook | None = None) -> Estimate:
    base = training("rl", cfg, cfg.llm.rl, speeds, turns=2)
    if cfg.stages.rl == "ppo":  # rollouts: generate a profile per sample each step
        gen = cfg.llm.rl.steps * cfg.llm.rl.batch_size * cfg.generation.max_new_tokens
        base.seconds += gen / GENERATION_TOKENS_PER_SECOND["transformers"]
        base.tokens += gen
    return base


def item_side(cfg: PipelineConfig, size: DataSize, speeds: SpeedBook | None = None) -> Estimate:
    return training("item_side", cfg, cfg.llm.item_side, speeds)


def cf_epoch_pairs(cfg: PipelineConfig, size: DataSize, backbone: str) -> float:
    params = cfg.cf.params | cfg.cf.per_backbone.get(backbone, {})
    return params.get("epochs", CF_DEFAULT_EPOCHS) * size.train


def neighbours(cfg: PipelineConfig, size: DataSize, speeds: SpeedBook | None = None) -> Estimate:
    units = cfg.neighbours.epochs * size.train
    spu = CF_SECONDS_PER_EPOCH_PAIR[cfg.neighbours.backbone]
    seconds, basis = calibrated("neighbours", "epoch-interaction", units, spu, speeds)
    return Estimate(seconds, 0, units, "epoch-interaction", basis)


def profile_count(cfg: PipelineConfig, size: DataSize) -> int:
    users = min(cfg.generation.users or size.users, size.users)
    items = min(cfg.generation.items or size.items, size.items)
    variants = len(cfg.stages.generators()) if cfg.stages.ablation else 1
    return users * max(variants, 1) + items


def profiles(cfg: PipelineConfig, size: DataSize, speeds: SpeedBook | None = None) -> Estimate:
    if not cfg.stages.generators():
        return Estimate(1.0, 0, 0, "profile", "default")
    n = profile_count(cfg, size)
    new_tokens = n * cfg.generation.max_new_tokens
    tokens = n * prompt_tokens(cfg) + new_tokens
    spu = cfg.generation.max_new_tokens / GENERATION_TOKENS_PER_SECOND[cfg.generation.backend]
    seconds, basis = calibrated("profiles", "profile", n, spu, speeds, overhead=MODEL_LOAD_SECONDS)
    return Estimate(seconds, tokens, n, "profile", basis)


def encode(cfg: PipelineConfig, size: DataSize, speeds: SpeedBook | None = None) -> Estimate:
    n = size.items + profile_count(cfg, size)
    seconds, basis = calibrated("encode", "text", n, 1 / ENCODE_TEXTS_PER_SECOND, speeds, overhead=2.0)
    return Estimate(seconds, 0, n, "text", basis)


def train_cf(cfg: PipelineConfig, size: DataSize, speeds: SpeedBook | None = None) -> Estimate:
    from reclm.pipeline.stages import cf_runs

    runs = cf_runs(cfg)
    units = sum(cf_epoch_pairs(cfg, size, r["backbone"]) for r in runs)
    default = sum(cf_epoch_pairs(cfg, size, r["backbone"]) * CF_SECONDS_PER_EPOCH_PAIR[r["backbone"]] for r in runs)
    measured = speeds.seconds_per_unit("train_cf", "epoch-interaction") if speeds else None
    if measured is not None:
        return Estimate(units * measured, 0, units, "epoch-interaction (upper bound)", "measured")
    return Estimate(default, 0, units, "epoch-interaction (upper bound)", "default")


def report(cfg: PipelineConfig, size: DataSize, speeds: SpeedBook | None = None) -> Estimate:
    return Estimate(5.0, 0, 1, "report", "default")
