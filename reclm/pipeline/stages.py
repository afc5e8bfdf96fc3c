"""The twelve stages of ``reclm run``, in order, each with what it reads and where it writes.

| # | stage      | folder      | needs                                   |
|---|------------|-------------|-----------------------------------------|
| 1 | prepare    | data/       | dataset files                           |
| 2 | teacher    | teacher/    | prepare (+ teacher files)               |
| 3 | sft        | sft/        | prepare, teacher                        |
| 4 | neighbours | neighbours/ | prepare (similar users; item text)      |
| 5 | collab     | collab/     | prepare, teacher, sft, neighbours       |
| 6 | reward     | reward/     | prepare, teacher, sft, neighbours       |
| 7 | rl         | rl/         | prepare, sft, collab, reward, neighbours|
| 8 | item_side  | item_sft/   | prepare, teacher, sft, neighbours       |
| 9 | profiles   | profiles/   | prepare, teacher, sft, collab, rl, item_side |
|10 | encode     | embeddings/ | prepare, profiles                       |
|11 | train_cf   | cf/         | prepare, encode                         |
|12 | report     | report/     | every stage above                       |

Stage bodies call the areas' public functions
(``reclm.llm``, ``reclm.cf``, ``reclm.text``); this module only wires them to the run directory.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from reclm.cf.features import uses_item_profiles, uses_user_profiles
from reclm.pipeline import inputs
from reclm.pipeline.config import PipelineConfig
from reclm.pipeline.engine import StageContext, StageError, StageUnavailable
from reclm.pipeline.work import CF_WORK_UNIT, cf_size_factor
from reclm.rundir import RunDir
from reclm.utils import available_cores, write_json

# ---------------------------------------------------------------- helpers


def dataset_files(cfg: PipelineConfig) -> list[Path]:
    """The files a dataset is read from (their content is part of the prepare stage's key)."""
    spec = str(cfg.dataset)
    files: list[Path] = []
    if spec == "ml-100k":
        from reclm.data.loaders import ml100k_folder

        files = sorted(p for p in ml100k_folder().iterdir() if p.is_file())
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            files = [path]
    if cfg.item_text:
        files.append(Path(cfg.item_text).expanduser())
    return files


def resource_files(cfg: PipelineConfig) -> list[Path]:
    """The dataset's side files (shipped teacher profiles, neighbour lists) that stages may read:
    not part of the dataset's fingerprint, so the stages that read them hash them themselves."""
    from reclm.data.loaders import PAPER_RESOURCES

    folder = Path(str(cfg.dataset)).expanduser()
    if not folder.is_dir():
        return []
    return [folder / name for name in PAPER_RESOURCES if (folder / name).is_file()]


def teacher_files(cfg: PipelineConfig) -> list[Path]:
    files = resource_files(cfg)
    if cfg.stages.teacher == "file":
        files += [Path(p).expanduser() for p in (cfg.teacher.user_file, cfg.teacher.item_file) if p]
    return files


def prompt_budget(cfg: PipelineConfig):
    """The one prompt budget of a run: teacher, SFT, generation and the tuning stages share it."""
    from reclm.llm import prompts

    p = cfg.prompt
    return prompts.PromptBudget(
        max_items=p.max_items,
        max_words=p.max_words,
        max_profiles=p.max_profiles,
        max_neighbours=p.max_neighbours,
        style=p.style,
    )


def logger(ctx: StageContext):
    """The tuning stages' ``log`` callback: indented lines under the stage."""
    return lambda text: ctx.console.print(f"    {text}", highlight=False, soft_wrap=True)


def lora_of(cfg: PipelineConfig) -> dict:
    return cfg.llm.lora.model_dump()


def train_of(opts: Any) -> dict:
    return {k: getattr(opts, k) for k in ("steps", "batch_size", "lr", "max_seq_len", "seed")}


def user_generator(cfg: PipelineConfig) -> str | None:
    """The stage whose adapter writes the final user profiles (None: teacher profiles are used)."""
    chain = cfg.stages.generators()
    return chain[-1] if chain else None


# ---------------------------------------------------------------- 1 prepare


def run_prepare(ctx: StageContext) -> dict:
    cfg = ctx.config
    run = RunDir(ctx.root, redirect={"data": ctx.out})
    data, split = run.prepare(str(cfg.dataset), cfg.split.spec(), item_text=cfg.item_text)
    ctx.shared["data"] = (data, split)
    return {"units": data.n_interactions, "unit": "interaction", **split.stats(), "dataset": data.summary()}


# ---------------------------------------------------------------- 2 teacher


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
    from reclm.pipeline.config import OpenAITeacher

    section = cfg.section("teacher", "prompt")
    section["teacher"].pop("max_cost")
    defaults = OpenAITeacher().model_dump(mode="json")
    section["teacher"]["openai"].update({k: defaults[k] for k in TEACHER_TRANSPORT})
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


# ---------------------------------------------------------------- 3 sft and the RecLM tuning stages


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


def writer_options(cfg: PipelineConfig) -> dict[str, Any]:
    """ProfileWriter options of collaborative tuning's distilled profiles (also in its cache key)."""
    return {
        "batch_size": generation_batch_size(cfg),
        "max_new_tokens": cfg.generation.max_new_tokens,
        **precision_key(cfg),
    }


def on_cuda() -> bool:
    from reclm.llm.model import resolve_device

    return resolve_device(None).startswith("cuda")


def generation_backend(cfg: PipelineConfig) -> str:
    """``generation.backend`` with ``auto`` resolved on this machine: transformers on CUDA, else ctranslate2.
    Stage keys hold the resolved value (the outputs differ between backends)."""
    backend = cfg.generation.backend
    if backend != "auto":
        return backend
    return "transformers" if on_cuda() else "ctranslate2"


def generation_batch_size(cfg: PipelineConfig) -> int:
    """``generation.batch_size``, or for ``null`` 256 on CUDA and 16 on CPU."""
    size = cfg.generation.batch_size
    if size is not None:
        return size
    return 256 if on_cuda() else 16


def generation_quantization(cfg: PipelineConfig) -> str | None:
    """The CTranslate2 precision the profiles are written at (``auto`` resolved: it depends on the CPU)."""
    if generation_backend(cfg) != "ctranslate2":
        return None
    from reclm.llm.generation.ct2 import ct2_device, default_quantization

    return cfg.generation.quantization or default_quantization(ct2_device(None))


def precision_key(cfg: PipelineConfig) -> dict[str, str]:
    """``{"quantization": q}`` for stage keys when CTranslate2 writes at ``q`` other than int8, else empty:
    int8 was the only CPU precision before it came to depend on the CPU, so runs made at int8 keep their keys."""
    quantization = generation_quantization(cfg)
    return {} if quantization in (None, "int8") else {"quantization": quantization}


def writer_backend(cfg: PipelineConfig) -> str:
    """The local backend that writes the distilled profiles collaborative tuning needs: the generation
    backend, except ``openai`` (a served model has no SFT adapter to apply), then transformers."""
    backend = generation_backend(cfg)
    return "transformers" if backend == "openai" else backend


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


def summary_of(result: Any, unit: str, units: float) -> dict:
    """A stage result (dataclass, dict or None) as a manifest summary with tokens and units."""
    if result is None:
        info: dict = {}
    elif isinstance(result, dict):
        info = dict(result)
    elif hasattr(result, "to_dict"):
        info = result.to_dict()
    elif hasattr(result, "__dataclass_fields__"):
        from dataclasses import asdict

        info = asdict(result)
    else:
        info = {"result": str(result)}
    info.setdefault("tokens", info.get("train_tokens", 0) or 0)
    info.setdefault("units", units)
    info.setdefault("unit", unit)
    return info


# ---------------------------------------------------------------- 4 neighbours


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


# ---------------------------------------------------------------- 9 profiles


def run_profiles(ctx: StageContext) -> dict:
    """Profiles for every user and item: generated by the last generator that is on (and, with
    ``stages.ablation``, by each earlier one into ``profiles/ablation/<stage>/``); with no generator
    (``sft: false``) the teacher's own user profiles are used as they are, and its item profiles too unless
    the item side is on (then the item writer profiles every item)."""
    with profiles_executor(ctx.config):
        summary = copy_teacher_profiles(ctx) if user_generator(ctx.config) is None else generate_profiles(ctx)
    summary["quality"] = write_quality(ctx, ctx.out)
    return summary


def profiles_executor(cfg: PipelineConfig) -> Any:
    """``executor: ray`` with something to generate: one Ray session for the whole stage (a local Ray is
    started once for users and items, and stopped with its workers when the stage ends or fails); else none.
    Not part of the stage's key: Ray workers write the same profiles (reclm.llm.generation.ray_runner)."""
    if cfg.executor != "ray" or (user_generator(cfg) is None and not cfg.stages.item_side):
        return contextlib.nullcontext()
    from reclm.distributed import ray_session

    return ray_session(cfg.ray.address, local_ray_cpus(cfg))


def copy_teacher_profiles(ctx: StageContext) -> dict:
    """The teacher-only variant: the teacher's user profiles are the user profiles (users without one get a zero
    vector). Items: with ``stages.item_side`` the item writer writes every item (those with a teacher profile
    keep it with ``llm.item_side.keep_teacher``), so every item gets a profile; else the teacher's are copied."""
    names = ("users.jsonl",) if ctx.config.stages.item_side else ("users.jsonl", "items.jsonl")
    copied = {}
    for name in names:
        source = ctx.run.teacher / name
        if source.is_file():
            shutil.copyfile(source, ctx.out / name)
            copied[name] = sum(1 for line in source.open() if line.strip())
    if not copied and not ctx.config.stages.item_side:
        raise StageUnavailable("stage 'profiles': sft is off and the teacher wrote no profiles to use")
    ctx.note("sft is off: the teacher's user profiles are used as the profiles (no user generation)")
    summary = {"source": "teacher", "units": sum(copied.values()), "unit": "copied profile", "copied": copied}
    if ctx.config.stages.item_side:
        summary.update(teacher_variant_items(ctx))
    return summary


def teacher_variant_items(ctx: StageContext) -> dict:
    """Every item's profile from the item writer (``item_sft/adapter``) in the teacher-only variant."""
    from reclm.llm import generation

    adapter = ctx.run.stage_adapter("item_sft")
    if adapter is None:
        raise StageUnavailable("stage 'profiles': stages.item_side is on but the run has no item_sft/adapter")
    params, cache = decode_params(ctx.config), generation.GenerationCache()
    try:
        generator = profile_generator(generation, ctx.config, adapter)
        stats = write_item_profiles(ctx, generation, generator, params, cache)
    finally:
        cache.close()
    info = {"params": params.key(), "adapters": adapters_json({}, adapter), "items": stats}
    write_json(ctx.out / "generation.json", info)
    tokens = {"prompt": int(stats.get("prompt_tokens", 0)), "completion": int(stats.get("new_tokens", 0))}
    generated = int(stats.get("generated", 0))
    return {"tokens": tokens, "units": generated, "unit": "profile", "generation": {"items": stats}}


def write_item_profiles(ctx: StageContext, generation: Any, generator: Any, params: Any, cache: Any) -> dict:
    """``profiles/items.jsonl``: every item's profile by the one item recipe in one generation pass
    (reclm.llm.item_side.generate_item_profiles); returns its summary with the generation statistics."""
    from reclm.llm import item_side

    cfg = ctx.config
    data, split = ctx.data()
    parts: list[dict] = []

    def write(prompts: list[str]) -> list[str]:
        texts, result = generation.generate_texts(generator, prompts, params, cache, desc="items")
        parts.append(result.to_dict())
        return [t or "" for t in texts]

    items = list(range(min(cfg.generation.items, data.n_items))) if cfg.generation.items else None
    written = item_side.generate_item_profiles(
        data, split, write, ctx.out, **inputs.item_inputs(ctx.run, data), budget=prompt_budget(cfg),
        items=items, keep_teacher=cfg.llm.item_side.keep_teacher if cfg.stages.item_side else False,
    )  # fmt: skip
    stats = {**written, **merge_generation(parts)}
    ctx.console.print(f"    items: {format_generation(stats)}", highlight=False)
    return stats


def generate_profiles(ctx: StageContext) -> dict:
    """Users with the last generator's adapter; items with the item writer (item_side) or else that
    same adapter; with ``stages.ablation`` the users again with each earlier adapter."""
    from reclm.llm import generation
    from reclm.llm import prompts as prompts_mod

    cfg, gen = ctx.config, ctx.config.generation
    data, split = ctx.data()
    chain = cfg.stages.generators()
    adapters = {stage: ctx.run.stage_adapter(stage) for stage in chain}
    missing = [stage for stage, path in adapters.items() if path is None]
    if missing:
        raise StageUnavailable(f"stage 'profiles': no adapter from {', '.join(missing)} (expected <stage>/adapter)")
    params = decode_params(cfg)
    budget = prompt_budget(cfg)
    cache = generation.GenerationCache()
    generators: dict[str, Any] = {}
    stats: dict[str, Any] = {}

    def generator_for(adapter: Path | None):
        key = str(adapter)
        if key not in generators:
            for old in generators.values():
                old.close()  # one model in memory at a time (a Ray pool's workers end with it)
            generators.clear()
            generators[key] = profile_generator(generation, cfg, adapter)
        return generators[key]

    users = range(min(gen.users, data.n_users)) if gen.users else None
    user_prompts = prompts_mod.user_prompts(data, split, users, budget)
    jobs = [generation.Job("user", data.user_ids[u], p) for u, p in user_prompts.items()]
    final = chain[-1]
    variants = [(stage, ctx.out if stage == final else ctx.out / "ablation" / stage) for stage in user_writers(cfg)]
    for number, (stage, folder) in enumerate(variants, 1):
        folder.mkdir(parents=True, exist_ok=True)
        generator = generator_for(adapters[stage])
        label = "users" if folder == ctx.out else f"users ({stage})"
        desc = f"{label}, pass {number} of {len(variants)}" if len(variants) > 1 else label  # progress bar
        result = generation.generate_records(generator, jobs, params, folder / "users.jsonl", cache, desc=desc)
        stats[label] = result.to_dict()
        ctx.console.print(f"    {label}: {format_generation(result.to_dict())}", highlight=False)

    item_adapter = ctx.run.stage_adapter("item_sft") or adapters[final]
    stats["items"] = write_item_profiles(ctx, generation, generator_for(item_adapter), params, cache)
    for _, folder in variants[1:]:  # ablation variants share the final item profiles
        shutil.copyfile(ctx.out / "items.jsonl", folder / "items.jsonl")
        write_quality(ctx, folder)
    cache.close()
    for generator in generators.values():
        generator.close()
    tokens = {
        "prompt": sum(int(v.get("prompt_tokens", 0)) for v in stats.values()),
        "completion": sum(int(v.get("new_tokens", 0)) for v in stats.values()),
    }
    generated = sum(int(v.get("generated", 0)) for v in stats.values())
    write_json(
        ctx.out / "generation.json",
        {"params": params.key(), "adapters": adapters_json(adapters, item_adapter), **stats},
    )
    return {"tokens": tokens, "units": generated, "unit": "profile", "generation": stats}


def user_writers(cfg: PipelineConfig) -> list[str]:
    """The stages whose adapters write the user profiles, in the order the profiles stage runs them: the
    last generator, then (with ``stages.ablation``) each earlier one."""
    chain = cfg.stages.generators()
    return [chain[-1], *chain[:-1]] if chain and cfg.stages.ablation else chain[-1:]


def decode_params(cfg: PipelineConfig) -> Any:
    """The profiles stage's decoding parameters (part of every generation-cache key)."""
    from reclm.llm.generation import DecodeParams

    gen = cfg.generation
    return DecodeParams(gen.max_new_tokens, gen.temperature, gen.top_p, 0, gen.seed)


def profile_generator(generation: Any, cfg: PipelineConfig, adapter: Path | None) -> Any:
    """The profiles' generator: :func:`make_generator`'s, or with ``executor: ray`` a pool of Ray workers that
    each build that same generator themselves (reclm.llm.generation.ray_runner), ``ray.cpus_per_run`` CPUs
    (its threads) and ``ray.gpus_per_run`` GPUs each, as many as the cluster holds: same cache identity,
    same texts, the cache written by this process only."""
    if cfg.executor != "ray":
        return make_generator(generation, cfg, adapter)
    from types import SimpleNamespace

    from reclm.llm.generation.ray_runner import GeneratorSpec, RayGenerator

    spec = make_generator(SimpleNamespace(make_generator=GeneratorSpec.of), cfg, adapter)  # its arguments
    spec.options.pop("threads", None)  # a worker's threads: its Ray CPUs
    ray = cfg.ray
    return RayGenerator(
        spec, address=ray.address, cpus_per_worker=ray.cpus_per_run, gpus_per_worker=ray.gpus_per_run,
        num_cpus=local_ray_cpus(cfg),
    )  # fmt: skip


def make_generator(generation: Any, cfg: PipelineConfig, adapter: Path | None) -> Any:
    gen, backend = cfg.generation, generation_backend(cfg)
    if backend == "openai":
        options: dict[str, Any] = {
            "base_url": gen.base_url,
            "api_key_env": gen.api_key_env,
            "concurrency": gen.concurrency,
        }
        return generation.make_generator("openai", gen.served_model, adapter, generation_batch_size(cfg), **options)
    options = {"threads": cfg.threads}
    if backend == "ctranslate2" and gen.quantization:
        options["quantization"] = gen.quantization
    return generation.make_generator(backend, cfg.llm.base_model, adapter, generation_batch_size(cfg), **options)


def adapters_json(adapters: dict[str, Path | None], item_adapter: Path | None) -> dict[str, str | None]:
    return {
        **{k: str(v) if v else None for k, v in adapters.items()},
        "items": str(item_adapter) if item_adapter else None,
    }


def merge_generation(parts: list[dict]) -> dict:
    keys = ("jobs", "distinct", "cached", "generated", "failed", "prompt_tokens", "new_tokens")
    total: dict[str, Any] = {k: sum(int(p.get(k, 0)) for p in parts) for k in keys}
    total["seconds"] = round(sum(float(p.get("seconds", 0)) for p in parts), 2)
    total["profiles_per_s"] = round(total["generated"] / total["seconds"], 3) if total["seconds"] else 0.0
    total["new_tokens_per_s"] = round(total["new_tokens"] / total["seconds"], 1) if total["seconds"] else 0.0
    return total


def format_generation(info: dict) -> str:
    return (
        f"{info.get('jobs', 0)} prompts, {info.get('distinct', 0)} distinct, {info.get('cached', 0)} cached, "
        f"{info.get('generated', 0)} generated in {float(info.get('seconds', 0)):.1f} s "
        f"({float(info.get('profiles_per_s', 0)):.2f} profiles/s)"
    )


def write_quality(ctx: StageContext, folder: Path) -> dict | None:
    """profiles/quality.json: format, empty and duplicate rates, similarity to held-out teacher profiles."""
    from reclm.llm import quality
    from reclm.text.encoder import TextEncoder

    heldout_file = ctx.run.stage("sft") / "heldout.json"
    heldout = quality.read_heldout(heldout_file) if heldout_file.is_file() else None
    reference = ctx.run.teacher if ctx.run.teacher.is_dir() else None
    encoder = TextEncoder(ctx.config.encoder.model, batch_size=ctx.config.encoder.batch_size) if reference else None
    report = quality.quality_report(folder, reference, heldout, encoder)
    # the final places relative to the run (not the work folder, nor this machine's paths): a rerun or a
    # moved run writes the same bytes, so the stages after it stay cached
    report["source"] = str(Path("profiles") / folder.relative_to(ctx.out))
    if reference is not None:
        report["reference"] = "teacher"
    report["heldout_file"] = "sft/heldout.json" if heldout is not None else None
    write_json(folder / "quality.json", report)
    return {k: v for k, v in report.items() if k in ("users", "items")}


# ---------------------------------------------------------------- 10 encode


def run_encode(ctx: StageContext) -> dict:
    """Item text embeddings (every feature mode but ``none`` needs them) and profile embeddings
    (reclm.llm.encode) for the final profiles and every ablation variant."""
    from reclm.llm import encode
    from reclm.text.encoder import TextEncoder

    cfg = ctx.config
    data, _ = ctx.data()
    encoder = TextEncoder(cfg.encoder.model, batch_size=cfg.encoder.batch_size)
    vectors = encoder.encode(data.item_texts(), desc="item text")
    save_embeddings(ctx.out / "item_text.npz", data.item_ids, vectors, encoder, "dataset item text")
    count = data.n_items
    metas = {}
    for source, target in profile_sets(ctx.run.profiles, ctx.out):
        for kind, name in (("user", "users.jsonl"), ("item", "items.jsonl")):
            if (source / name).is_file():
                label = str((source / name).relative_to(ctx.root))
                meta = encode.encode_file(source / name, kind, encoder, target, label)
                metas[label] = meta
                count += meta["count"]
    return {"units": count, "unit": "text", "encoder": encoder.name, "dim": int(vectors.shape[1]), "files": metas}


def profile_sets(profiles: Path, embeddings: Path) -> list[tuple[Path, Path]]:
    """(profiles folder, embeddings folder) for the final profiles and every ablation variant."""
    sets = [(profiles, embeddings)]
    ablation = profiles / "ablation"
    if ablation.is_dir():
        sets += [(v, embeddings / "ablation" / v.name) for v in sorted(ablation.iterdir()) if v.is_dir()]
    return sets


def save_embeddings(path: Path, ids: list[str], vectors: np.ndarray, encoder: Any, source: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, ids=np.asarray(ids, dtype=str), vectors=vectors.astype(np.float32))
    meta = {"encoder": encoder.name, "dim": int(vectors.shape[1]), "count": len(ids), "source": source}
    write_json(path.with_suffix(".json"), meta)


# ---------------------------------------------------------------- 11 train-cf


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

    device = str(cfg.cf.params.get("device", "auto"))
    workers, threads = cf_jobs.job_plan(cfg.cf.jobs, device, len(pending), cfg.threads)
    on_ray = cfg.executor == "ray" and bool(pending)  # nothing to train: no Ray started
    if on_ray:
        train_cf_on_ray(ctx, pending, finished)
        ctx.note(f"each Ray worker process peaked at up to {worker_peak:.0f} MB (peak memory above is this process's)")
    elif workers > 1:
        ctx.note(f"{len(pending)} CF runs trained {workers} at a time, {threads} thread(s) each")
        with counted(finished, len(pending), f"cf runs, {workers} at a time") as finished_and_shown:
            cf_jobs.run_in_workers(ctx.root, pending, workers, threads, finished_and_shown)
        ctx.note(f"each worker process peaked at up to {worker_peak:.0f} MB (peak memory above is this process's)")
    else:
        data, split = ctx.data()
        for job in pending:
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


def train_cf_on_ray(ctx: StageContext, pending: list[Any], finished: Any) -> None:
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
    with counted(finished, len(pending), "cf runs on ray") as finished_and_shown:
        cf_jobs.run_in_ray(ctx.root, pending, options, threads, finished_and_shown, num_cpus=cores)


@contextlib.contextmanager
def counted(finished: Any, total: int, label: str) -> Iterator[Any]:
    """``finished`` that also advances a progress bar of ``total`` runs (the CF executors' ``on_done``)."""
    from reclm.llm.teachers.base import progress_bar

    with progress_bar(total, label) as advance:

        def finished_and_shown(job: Any, result: Any) -> None:
            finished(job, result)
            advance()

        yield finished_and_shown


def local_ray_cpus(cfg: PipelineConfig) -> int:
    """CPUs of a local Ray started for a stage (without ``ray.address`` / ``RAY_ADDRESS``): the pipeline's
    thread budget."""
    return cfg.threads or available_cores()


def resolved_cf_params(params: dict[str, Any]) -> dict[str, Any]:
    """Every CFConfig field of a run, defaults included (so a changed default retrains it); not the
    thread count or device."""
    from reclm.cf import CFConfig

    return CFConfig(**params).model_dump(mode="json", exclude={"threads", "device"})


def train_cf_config(cfg: PipelineConfig) -> dict[str, Any]:
    runs = cf_runs(cfg)
    resolved = [resolved_cf_params(cfg.cf.run_params(r["backbone"], r["features"], r["seed"])) for r in runs]
    return {"cf": cfg.cf.model_dump(mode="json", exclude={"jobs"}), "runs": runs, "resolved": resolved}


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
    key = {"params": resolved_cf_params(params), "split": ctx.inputs["upstream"]["prepare"], "files": {}}
    key["files"] = {str(f.relative_to(ctx.root)): path_hash(f) for f in files}
    unit = ctx.unit(run["name"], key)
    if not unit.done:
        job.out = unit.scratch()
    return job, unit


# ---------------------------------------------------------------- 12 report


def run_report(ctx: StageContext) -> dict:
    from reclm.pipeline.report import write_report

    paths = write_report(ctx.root, ctx.out)
    return {"files": [p.name for p in paths]}


# ---------------------------------------------------------------- the stage list


def offline_item_target(cfg: PipelineConfig) -> dict[str, str]:
    """Key entry for the offline teacher, whose item targets come from the item's own fields only (docs/cold-start.md)
    (no entry for the other teachers, whose output did not change: an openai teacher is not re-billed)."""
    return {"item_target": "own fields"} if cfg.stages.teacher == "offline" else {}


def generators_on(cfg: PipelineConfig) -> bool:
    return bool(cfg.stages.collab or cfg.stages.reward or cfg.stages.rl != "none" or cfg.stages.item_side)
