"""``reclm run --dry-run`` estimates: time and tokens per stage, from the dataset's size and per-unit speeds.

Each stage's cost is ``overhead + units x seconds_per_unit``. Units are counted from the config and
the split it makes (users, items, train pairs, distinct user prompts: identical prompts are generated
once); prompt and SFT sequence lengths are measured on samples with the base model's tokenizer. A
speed measured by a finished stage on this machine in the same setup (:func:`speed_setup`) is kept in
``$RECLM_CACHE/pipeline/speeds.json`` and wins over the defaults, scaled by tokens per unit (up to 2x
either way). Other CPUs scale the defaults by :func:`speed_factor`; CF estimates are upper bounds (runs
stop early); teacher tokens are counted only for the paid ``openai`` teacher.

The default constants below were measured on the reference machine; how each was measured, and how
the CPU factor was fitted, is in docs/decisions.md ("Estimate constants").
"""

from __future__ import annotations

import functools
import os
import sqlite3
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reclm.data.errors import DataError
from reclm.pipeline.config import PipelineConfig
from reclm.pipeline.engine import Estimate
from reclm.pipeline.speed import SpeedBook
from reclm.pipeline.stages.cf import cf_runs
from reclm.pipeline.stages.common import prompt_budget
from reclm.pipeline.stages.data import make_teacher, users_need_neighbours
from reclm.pipeline.stages.generation import (
    decode_params,
    generates_on_ray,
    generation_backend,
    generation_batch_size,
    generation_quantization,
    user_writers,
)
from reclm.pipeline.work import CF_SECONDS_PER_EPOCH_PAIR, CF_WORK_UNIT, cf_epoch_seconds, cf_size_factor

PREPARE_PER_INTERACTION = 1.5e-5
TEACHER_OFFLINE_PER_PROFILE = 2e-3
TEACHER_FILE_PER_PROFILE = 2e-3
TEACHER_OPENAI_PER_REQUEST = 2.0
LORA_SECONDS_PER_TOKEN = 4.2e-3
MODEL_LOAD_SECONDS = 5.0
GENERATION_TOKENS_PER_SECOND = {"transformers": 75.0, "ctranslate2": 130.0, "openai": 400.0}
CUDA_LORA_SECONDS_PER_TOKEN = 2e-4
CUDA_GENERATION_TOKENS_PER_SECOND = {"transformers": 530.0}
CF_DEFAULT_EPOCHS = 300
ENCODE_TEXTS_PER_SECOND = 200.0
PROMPT_BASE_TOKENS = 60
PROMPT_TOKENS_PER_ITEM = 14
PROFILE_TOKENS = 48  # a typical profile's length
CHARS_PER_TOKEN = 3.5
TEMPLATE_TOKENS = 20
COMPARABLE_TOKENS = 2.0  # a measured speed is scaled to at most 2x (or 1/2) its tokens per unit
PROMPT_SAMPLE = 128  # distinct user prompts tokenized for the mean prompt length
REFERENCE_MATMUL_GFLOPS = 237.0  # the reference machine's matmul_gflops(), inferred (docs/decisions.md)
SPEED_EXPONENT = 0.72
SPEED_FACTOR_BOUNDS = (0.25, 8.0)
LLM_STAGES = ("sft", "collab", "reward", "rl", "item_side")
FREE_TEACHERS = ("file", "offline")  # run by the dry-run to measure the SFT pairs (openai would cost money)


@dataclass
class DataSize:
    users: int
    items: int
    interactions: int
    train: int
    measured: bool  # from the run's saved split (else from the split this config would make)
    user_prompts: int | None = None  # distinct user prompts, each generated once per writer
    prompt_tokens: float | None = None  # mean tokens of a distinct user prompt (a sample)
    teacher_pair_tokens: float | None = None  # mean tokens of a teacher's user prompt + profile (a sample)
    user_prompt_keys: list[str] | None = None  # generation-cache keys of the distinct user prompts


def data_size(cfg: PipelineConfig, root: Path, made: tuple[Any, Any] | None = None) -> DataSize:
    """Counts from the run's saved split when prepared, else from ``made`` (the dataset and split the config
    makes, when the caller has them already) or the split made here (not saved)."""
    data, split, saved = split_of(cfg, root, made)
    stats = split.stats()
    size = DataSize(data.n_users, data.n_items, stats["train"] + stats["valid"] + stats["test"], stats["train"], saved)
    if cfg.stages.generators():
        prompts = distinct_user_prompts(cfg, data, split)
        size.user_prompts, size.prompt_tokens = len(prompts), prompt_sample_tokens(cfg, prompts)
        size.user_prompt_keys = prompt_keys(prompts)
    if cfg.stages.sft and cfg.stages.teacher in FREE_TEACHERS:
        size.teacher_pair_tokens = teacher_pair_tokens(cfg, data, split)
    return size


def teacher_pair_tokens(cfg: PipelineConfig, data: Any, split: Any) -> float | None:
    """Mean tokens of the user pairs SFT trains on (prompt + teacher profile), from a sample of what the
    teacher writes: a free teacher is run into a temporary folder (MIND's shipped files: under a second)."""
    import tempfile

    from reclm.llm.records import read_records
    from reclm.rundir import RunDir

    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(tmp)
        try:
            make_teacher(cfg, progress=False).run(data, split, run, sides=["user"])
        except (DataError, OSError, ValueError):  # the real stage will say what is wrong
            return None
        records = read_records(run.teacher / "users.jsonl")
    if not records:
        return None
    picked = np.random.default_rng(0).choice(len(records), min(PROMPT_SAMPLE, len(records)), replace=False)
    pairs = [records[i].prompt + "\n" + records[i].profile for i in picked]
    return mean_tokens(pairs, token_counter(cfg.llm.base_model))


def split_of(cfg: PipelineConfig, root: Path, made: tuple[Any, Any] | None = None) -> tuple[Any, Any, bool]:
    """``(data, split, saved)``: the run's saved split, or the one ``cfg`` makes (``made``, else computed in
    memory)."""
    from reclm.data.loaders import load_dataset
    from reclm.data.split import make_split
    from reclm.rundir import RunDir

    if (root / "data" / "split.json").is_file():
        try:
            data, split = RunDir(root).load()
            return data, split, True
        except DataError:  # the dataset changed since: prepare will redo the split
            pass
    if made is not None:
        return made[0], made[1], False
    data = load_dataset(str(cfg.dataset), item_text=cfg.item_text)
    return data, make_split(data, cfg.split.spec()), False


def distinct_user_prompts(cfg: PipelineConfig, data: Any, split: Any) -> list[str]:
    """The user prompts the profiles stage will generate, each once."""
    from reclm.llm.prompts import user_prompts

    users = range(min(cfg.generation.users, data.n_users)) if cfg.generation.users else None
    return sorted(set(user_prompts(data, split, users, prompt_budget(cfg)).values()))


def prompt_sample_tokens(cfg: PipelineConfig, prompts: Sequence[str]) -> float:
    """Mean length in tokens of a seeded sample of ``PROMPT_SAMPLE`` prompts (the chat template not included)."""
    if not prompts:
        return float(prompt_tokens(cfg))
    picked = np.random.default_rng(0).choice(len(prompts), min(PROMPT_SAMPLE, len(prompts)), replace=False)
    return mean_tokens([prompts[i] for i in picked], token_counter(cfg.llm.base_model))


def prompt_keys(prompts: Sequence[str]) -> list[str]:
    from reclm.llm.generation.base import prompt_key

    return [prompt_key(p) for p in prompts]


def token_counter(model: str) -> Callable[[str], int] | None:
    """The base model's tokenizer as a counter, or None when it is not at hand without converting a
    packaged model (a dry run writes nothing) or the folder cannot be read."""
    from reclm.llm.model import model_dir_if_ready

    folder = model_dir_if_ready(model)
    if folder is None:
        return None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        return None
    return lambda text: len(tokenizer(text)["input_ids"])


def mean_tokens(texts: Sequence[str], counter: Callable[[str], int] | None) -> float:
    if counter is None:
        return float(np.mean([len(t) / CHARS_PER_TOKEN for t in texts]))
    return float(np.mean([counter(t) for t in texts]))


def prompt_tokens(cfg: PipelineConfig, size: DataSize | None = None) -> float:
    """Tokens of a user prompt: measured on the split's prompts when known, else the config formula."""
    if size is not None and size.prompt_tokens is not None:
        return size.prompt_tokens
    return PROMPT_BASE_TOKENS + PROMPT_TOKENS_PER_ITEM * cfg.prompt.max_items


def current_device() -> str:
    from reclm.llm.model import resolve_device

    return resolve_device(None)


def lora_seconds_per_token() -> float:
    return CUDA_LORA_SECONDS_PER_TOKEN if current_device().startswith("cuda") else LORA_SECONDS_PER_TOKEN


def generation_tokens_per_second(backend: str) -> float:
    if current_device().startswith("cuda") and backend in CUDA_GENERATION_TOKENS_PER_SECOND:
        return CUDA_GENERATION_TOKENS_PER_SECOND[backend]
    return GENERATION_TOKENS_PER_SECOND[backend]


@functools.cache
def matmul_gflops(size: int = 1024, repeats: int = 3, rounds: int = 3) -> float:
    """fp32 GFLOPS of ``size`` x ``size`` matrix products on torch's threads, the fastest of ``rounds``
    (once per process; other work on the machine lowers it, as it slows the run)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up: thread pool and caches
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 * repeats / best / 1e9


def speed_factor_for(gflops: float) -> float:
    """How many times the reference machine's time a CPU-bound stage takes where matmul runs at ``gflops``."""
    low, high = SPEED_FACTOR_BOUNDS
    return float(min(high, max(low, (REFERENCE_MATMUL_GFLOPS / gflops) ** SPEED_EXPONENT)))


def speed_factor() -> float:
    """The factor on the default (reference machine) speeds here (:func:`speed_basis`)."""
    return speed_basis()[0]


def speed_basis() -> tuple[float, str]:
    """``(factor, why)``: ``RECLM_SPEED_FACTOR`` when set, 1 on CUDA (its constants were measured on one),
    else :func:`speed_factor_for` this CPU's matmul speed."""
    raw = os.environ.get("RECLM_SPEED_FACTOR", "")
    if raw:
        try:
            factor = float(raw)
        except ValueError:
            factor = 0.0
        if factor <= 0:
            raise ValueError(f"RECLM_SPEED_FACTOR={raw!r}: expected a positive number (1: the reference speeds)")
        return factor, "RECLM_SPEED_FACTOR"
    if current_device().startswith("cuda"):
        return 1.0, "CUDA constants"
    here = matmul_gflops()
    return speed_factor_for(
        here
    ), f"fp32 matmul at {here:.0f} GFLOPS here, {REFERENCE_MATMUL_GFLOPS:.0f} on the reference CPU"


def speed_setup(stage: str, cfg: PipelineConfig) -> str:
    """What sets a stage's speed besides its size: a speed measured in one setup is reused only in the same."""
    if stage == "rl":  # a PPO step (rollouts, reward model, value head) costs several DPO steps
        return f"{cfg.llm.base_model} {cfg.stages.rl} {current_device()}"
    if stage in LLM_STAGES:
        return f"{cfg.llm.base_model} {current_device()}"
    if stage == "profiles":
        backend, batch = generation_backend(cfg), generation_batch_size(cfg)
        quantization = generation_quantization(cfg) or "-"
        return f"{cfg.llm.base_model} {backend} {quantization} batch {batch} {current_device()}"
    if stage == "encode":
        return f"{cfg.encoder.model} {current_device()}"
    if stage in ("neighbours", "train_cf"):
        return current_device()
    return ""


def runs_here(stage: str, cfg: PipelineConfig) -> bool:
    """Whether a stage's work runs in this process (and its children), so that its CPU time tells whether it
    was starved: not an endpoint's generation or teacher, not Ray workers."""
    if stage == "teacher":
        return cfg.stages.teacher != "openai"
    if stage == "profiles":
        return generation_backend(cfg) != "openai" and not generates_on_ray(cfg)
    if stage == "train_cf":
        return cfg.executor != "ray"
    return True


def calibrated(
    stage: str,
    unit: str,
    units: float,
    default_spu: float,
    speeds: SpeedBook | None,
    overhead: float = 0.0,
    setup: str = "",
    tokens_per_unit: float | None = None,
    local: bool = True,
) -> tuple[float, str]:
    """``(seconds, basis)``: the measured speed of this stage and setup when there is one (scaled by
    ``tokens_per_unit`` against the measured run's tokens per unit), else ``default_spu``.

    A measurement is used only when its tokens per unit are within ``COMPARABLE_TOKENS`` of the
    estimate's: a stage's time includes fixed costs (loading, held-out evaluation, optimizer steps)
    that do not grow with tokens, so a tiny run's speed scaled up to long sequences overestimates
    (ml-100k's SFT at 461 tokens per step, 10.4 s, would put MIND's 1,870 at 42 s; it took about 9 s).
    The default is scaled by :func:`speed_factor` when the work runs on this machine (``local``)."""

    def default() -> tuple[float, str]:  # measures this CPU only when a default is used
        return overhead + units * default_spu * (speed_factor() if local else 1.0), "default"

    entry = speeds.lookup(stage, unit, setup) if speeds else None
    if entry is None:
        return default()
    spu = float(entry["seconds_per_unit"])
    measured_tokens = float(entry.get("tokens_per_unit") or 0)
    if tokens_per_unit and measured_tokens:
        ratio = tokens_per_unit / measured_tokens
        if not 1 / COMPARABLE_TOKENS <= ratio <= COMPARABLE_TOKENS:
            return default()
        spu *= ratio
    return overhead + units * spu, "measured"


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
        tokens = int(n * (prompt_tokens(cfg, size) + cfg.teacher.openai.max_tokens))
    else:
        per = TEACHER_OFFLINE_PER_PROFILE if kind == "offline" else TEACHER_FILE_PER_PROFILE
        tokens = 0
    seconds, basis = calibrated("teacher", "profile", n, per, speeds, local=kind != "openai")
    return Estimate(seconds, tokens, n, "profile", basis)


def training(
    stage: str, cfg: PipelineConfig, size: DataSize, opts: Any, speeds: SpeedBook | None, turns: int = 1
) -> Estimate:
    """LoRA training: steps x batch x sequence tokens at LORA_SECONDS_PER_TOKEN. A sequence is ``turns``
    x (user prompt + template + profile), or for SFT the teacher's measured pairs when known."""
    pair = prompt_tokens(cfg, size) + PROFILE_TOKENS
    if stage == "sft" and size.teacher_pair_tokens is not None:
        pair = size.teacher_pair_tokens
    seq = min(opts.max_seq_len, turns * (pair + TEMPLATE_TOKENS))
    tokens = int(opts.steps * opts.batch_size * seq)
    spu = lora_seconds_per_token() * opts.batch_size * seq
    seconds, basis = calibrated(
        stage, "step", opts.steps, spu, speeds, MODEL_LOAD_SECONDS, speed_setup(stage, cfg), opts.batch_size * seq
    )
    return Estimate(seconds, tokens, opts.steps, "step", basis)


def sft(cfg: PipelineConfig, size: DataSize, speeds: SpeedBook | None = None) -> Estimate:
    return training("sft", cfg, size, cfg.llm.sft, speeds)


def collab(cfg: PipelineConfig, size: DataSize, speeds: SpeedBook | None = None) -> Estimate:
    """Training on the dialogues, plus (by default, ``profiles: distilled``) writing the SFT model's profiles
    of the dialogues' users first: MIND, 4,605 users in 27 min of the stage's 2 h on the 2-core CPU. A
    measured speed of this stage already includes that writing."""
    opts = cfg.llm.collab
    plan = training("collab", cfg, size, opts, speeds, turns=1 + opts.neighbours)
    if opts.profiles == "distilled" and plan.basis == "default":
        users = collab_profile_users(cfg, size)
        writing = generation(cfg, size, users, speeds, overhead=MODEL_LOAD_SECONDS)
        plan.seconds += writing.seconds
        plan.tokens += writing.tokens
    return plan


def collab_profile_users(cfg: PipelineConfig, size: DataSize) -> int:
    """Users whose profiles the collab dialogues show (an upper bound: the dialogue targets and their
    neighbours, as if no two shared one): MIND 5,336 against the 4,605 it needed."""
    from reclm.llm.collab import dialogue_count
    from reclm.llm.sft import TrainSettings

    opts = cfg.llm.collab
    targets = opts.dialogues or dialogue_count(opts.steps, opts.batch_size, TrainSettings.holdout)
    return min(size.users, targets * (1 + opts.neighbours))


def reward(cfg: PipelineConfig, size: DataSize, speeds: SpeedBook | None = None) -> Estimate:
    return training("reward", cfg, size, cfg.llm.reward, speeds, turns=2)


def rl(cfg: PipelineConfig, size: DataSize, speeds: SpeedBook | None = None) -> Estimate:
    base = training("rl", cfg, size, cfg.llm.rl, speeds, turns=2)
    if cfg.stages.rl == "ppo":  # rollouts: generate a profile per sample each step
        gen = cfg.llm.rl.steps * cfg.llm.rl.batch_size * cfg.generation.max_new_tokens
        base.seconds += gen / generation_tokens_per_second("transformers")
        base.tokens += gen
    return base


def item_side(cfg: PipelineConfig, size: DataSize, speeds: SpeedBook | None = None) -> Estimate:
    return training("item_side", cfg, size, cfg.llm.item_side, speeds)


def saved_step(root: Path, folder: str, input_hash: str | None) -> int | None:
    """The step an interrupted LoRA, reward or RL stage resumes at: its checkpoint in the kept work folder
    (None when there is none, or the folder was made for other inputs and will be cleared)."""
    from reclm.llm.loop import find_checkpoint, load_trainer_state

    work = root / ".work" / folder
    key = root / ".work" / f"{folder}.key"
    if input_hash is None or not key.is_file() or key.read_text() != input_hash:
        return None
    found = find_checkpoint(work)
    if found is None:
        return None
    try:  # weights_only: a planted file is refused (ValueError), not run, by a dry run
        return int(load_trainer_state(found / "trainer_state.pt")["state"]["step"])
    except (OSError, KeyError, TypeError, ValueError, RuntimeError):
        return None


def remaining(stage: str, cfg: PipelineConfig, size: DataSize, speeds: SpeedBook | None, step: int) -> Estimate:
    """What is left of a training stage resumed at ``step``: its steps after it (for collab, whose profile
    writing came before its first checkpoint, training only)."""
    opts = getattr(cfg.llm, stage)
    if stage == "collab":
        whole = training("collab", cfg, size, opts, speeds, turns=1 + opts.neighbours)
    else:
        whole = ESTIMATORS[stage](cfg, size, speeds)
    left = max(0, opts.steps - step)
    share = left / opts.steps
    return Estimate(whole.seconds * share, int(whole.tokens * share), left, "step", whole.basis)


def cf_epoch_pairs(cfg: PipelineConfig, size: DataSize, backbone: str) -> float:
    params = cfg.cf.params | cfg.cf.per_backbone.get(backbone, {})
    return params.get("epochs", CF_DEFAULT_EPOCHS) * size.train


def cf_estimate(
    stage: str, cfg: PipelineConfig, size: DataSize, epoch_pairs: dict[str, float], speeds: SpeedBook | None
) -> tuple[float, str]:
    """``(seconds, basis)`` of the train_cf stage's runs: ``epoch_pairs`` per backbone, scaled by the data's size."""
    nodes = size.users + size.items
    work = sum(pairs * cf_size_factor(b, nodes) for b, pairs in epoch_pairs.items())
    measured = speeds.seconds_per_unit(stage, CF_WORK_UNIT, speed_setup(stage, cfg)) if speeds else None
    if measured is not None:
        return work * measured, "measured"
    default = sum(cf_epoch_seconds(b, pairs, nodes) for b, pairs in epoch_pairs.items())
    return speed_factor() * default, "default"


def neighbours(cfg: PipelineConfig, size: DataSize, speeds: SpeedBook | None = None) -> Estimate:
    """Not scaled by size: this CF model has no features and all cores (MIND: 1.8 s an epoch, 3.2x
    ml-100k's per pair; 59 s in all against 30 s estimated)."""

    if not users_need_neighbours(cfg):  # item text neighbours only: no CF model is trained
        return Estimate(MODEL_LOAD_SECONDS, 0, 0, "epoch-interaction", "default")
    units = cfg.neighbours.epochs * size.train
    spu = CF_SECONDS_PER_EPOCH_PAIR[cfg.neighbours.backbone]
    seconds, basis = calibrated(
        "neighbours", "epoch-interaction", units, spu, speeds, setup=speed_setup("neighbours", cfg)
    )
    return Estimate(seconds, 0, units, "epoch-interaction", basis)


def profile_count(cfg: PipelineConfig, size: DataSize) -> int:
    """Profiles to generate: distinct user prompts once per writer (with the ablation, every writer in
    the chain), plus the items."""
    users = size.user_prompts if size.user_prompts is not None else min(cfg.generation.users or size.users, size.users)
    items = min(cfg.generation.items or size.items, size.items)

    return users * max(len(user_writers(cfg)), 1) + items


@dataclass
class Left:
    """A stage's estimate less the work its kept folder or the generation cache already holds."""

    estimate: Estimate
    step: int | None = None  # a training stage resumes at this step
    cached: int = 0  # user profiles the generation cache already holds


def left_to_run(
    stage: Any, cfg: PipelineConfig, root: Path, size: DataSize, speeds: SpeedBook | None, input_hash: str | None,
    rerun: Collection[str],
) -> Left:  # fmt: skip
    """How the dry run and ``reclm status`` price a stage that will run: from its checkpoint's step (a
    training stage), less the cached profiles (the profiles stage), else its whole estimate."""
    if stage.name in LLM_STAGES and (step := saved_step(root, stage.folder, input_hash)) is not None:
        return Left(remaining(stage.name, cfg, size, speeds, step), step=step)
    if stage.name == "profiles" and (cached := cached_user_profiles(cfg, root, size, rerun)):
        return Left(profiles(cfg, size, speeds, cached=cached), cached=cached)
    return Left(stage.estimate(cfg, size, speeds))


def profiles(cfg: PipelineConfig, size: DataSize, speeds: SpeedBook | None = None, cached: int = 0) -> Estimate:
    """Writing the profiles, less ``cached`` user profiles the generation cache already holds."""
    if not cfg.stages.generators():
        if not cfg.stages.item_side:
            return Estimate(1.0, 0, 0, "profile", "default")
        items = min(cfg.generation.items or size.items, size.items)  # the item writer profiles the items
        return generation(cfg, size, items, speeds, overhead=MODEL_LOAD_SECONDS)
    return generation(cfg, size, max(0, profile_count(cfg, size) - cached), speeds, overhead=MODEL_LOAD_SECONDS)


def cached_user_profiles(cfg: PipelineConfig, root: Path, size: DataSize, rerun: Collection[str] = ()) -> int:
    """User profiles the profiles stage will find in the generation cache, summed over its writers: for each
    writer whose adapter is in the run directory and whose stage is not in ``rerun``, the distinct prompts
    cached under that adapter's identity (an interrupted profiles stage; the collab stage's distilled
    profiles). Opens the cache read-only and converts no model: a dry run writes nothing."""
    from reclm.llm.generation import GenerationCache, cache_identity
    from reclm.llm.model import model_dir_if_ready
    from reclm.rundir import RunDir

    if not size.user_prompt_keys or model_dir_if_ready(cfg.llm.base_model) is None:
        return 0
    cache = GenerationCache.existing()
    if cache is None:
        return 0
    run, params, backend = RunDir(root), decode_params(cfg).key(), generation_backend(cfg)
    quantization = generation_quantization(cfg)
    found = 0
    try:
        for stage in user_writers(cfg):
            adapter = run.stage_adapter(stage)
            if adapter is None or stage in rerun:
                continue
            identity = cache_identity(backend, cfg.llm.base_model, adapter, quantization=quantization)
            if identity is not None:
                found += len(cache.get(identity, params, size.user_prompt_keys))
    except sqlite3.Error:  # not a generation cache (yet): nothing is cached
        return 0
    finally:
        cache.close()
    return found


def generation(cfg: PipelineConfig, size: DataSize, n: int, speeds: SpeedBook | None, overhead: float) -> Estimate:
    """Writing ``n`` profiles with the config's generation backend (the profiles stage's measured speed
    when there is one in this setup)."""
    new = min(cfg.generation.max_new_tokens, PROFILE_TOKENS)
    per_profile = prompt_tokens(cfg, size) + TEMPLATE_TOKENS + new

    backend = generation_backend(cfg)
    spu = new / generation_tokens_per_second(backend)
    setup = speed_setup("profiles", cfg)
    local = backend != "openai"
    seconds, basis = calibrated("profiles", "profile", n, spu, speeds, overhead, setup, per_profile, local)
    return Estimate(seconds, int(n * per_profile), n, "profile", basis)


def encode(cfg: PipelineConfig, size: DataSize, speeds: SpeedBook | None = None) -> Estimate:
    n = size.items + profile_count(cfg, size)
    seconds, basis = calibrated(
        "encode", "text", n, 1 / ENCODE_TEXTS_PER_SECOND, speeds, 2.0, speed_setup("encode", cfg)
    )
    return Estimate(seconds, 0, n, "text", basis)


def train_cf(cfg: PipelineConfig, size: DataSize, speeds: SpeedBook | None = None) -> Estimate:

    epoch_pairs: dict[str, float] = {}
    for run in cf_runs(cfg):
        backbone = run["backbone"]
        epoch_pairs[backbone] = epoch_pairs.get(backbone, 0.0) + cf_epoch_pairs(cfg, size, backbone)
    seconds, basis = cf_estimate("train_cf", cfg, size, epoch_pairs, speeds)
    return Estimate(seconds, 0, sum(epoch_pairs.values()), "epoch-interaction (upper bound)", basis)


def report(cfg: PipelineConfig, size: DataSize, speeds: SpeedBook | None = None) -> Estimate:
    return Estimate(5.0, 0, 1, "report", "default")


ESTIMATORS: dict[str, Callable[..., Estimate]] = {
    "sft": sft, "collab": collab, "reward": reward, "rl": rl, "item_side": item_side,
}  # fmt: skip
