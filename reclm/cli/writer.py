"""``reclm sft`` (LoRA distillation on teacher profiles) and ``reclm profile`` (profiles for users and items)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import typer

from reclm.cli.common import app, console, err_console, friendly_errors
from reclm.cli.defaults import RUN, comma, prompt_budget
from reclm.llm.sft import TrainSettings
from reclm.rundir import RunDir

SFT, LORA, GEN = RUN.llm.sft, RUN.llm.lora, RUN.generation
TRAIN = TrainSettings()  # the trainer's own defaults, for what the config leaves to it (as `reclm run` does)


def teacher_file(run: RunDir, source: str, kind: str) -> Path:
    """``RUN/<source>/{users,items}.jsonl``, or ``source`` itself when it is a records file."""
    given = Path(source)
    if given.suffix == ".jsonl":
        return given
    return run.stage(source) / f"{kind}s.jsonl"


@app.command("sft")
@friendly_errors
def sft_command(
    run: Path = typer.Argument(..., help="Run directory holding teacher profiles."),
    model: str = typer.Option(RUN.llm.base_model, help="Base model: smollm2-135m (packaged) or a Hugging Face folder."),
    source: str = typer.Option("teacher", help="Stage folder with {users,items}.jsonl, or a records .jsonl file."),
    kind: str = typer.Option("user", help="user (-> RUN/sft/) or item (-> RUN/item_sft/)."),
    epochs: float = typer.Option(TRAIN.epochs, help="Passes over the training pairs (when --max-steps is 0)."),
    max_steps: int = typer.Option(SFT.steps, help="Optimizer steps (0: use --epochs)."),
    lr: float = typer.Option(SFT.lr, help="Peak learning rate (warm-up, then cosine decay)."),
    batch_size: int = typer.Option(SFT.batch_size, help="Examples per micro-batch."),
    grad_accum: int = typer.Option(TRAIN.grad_accum, help="Micro-batches per optimizer step."),
    max_seq_len: int = typer.Option(SFT.max_seq_len, help="Longer pairs are skipped (and counted)."),
    lora_r: int = typer.Option(LORA.r, help="LoRA rank."),
    lora_alpha: int = typer.Option(LORA.alpha, help="LoRA alpha."),
    lora_dropout: float = typer.Option(LORA.dropout, help="LoRA dropout."),
    target_modules: str = typer.Option(comma(LORA.target_modules), help="Comma-separated modules (+up/down)."),
    holdout: float = typer.Option(SFT.holdout, help="Share of pairs held out for validation loss (seeded)."),
    seed: int = typer.Option(SFT.seed, help="Seed of the held-out split, batch order and LoRA init."),
    eval_every: int = typer.Option(TRAIN.eval_every, help="Held-out loss every N steps (and before and after)."),
    save_every: int = typer.Option(TRAIN.save_every, help="Checkpoint every N steps (a crashed run resumes there)."),
    gradient_checkpointing: bool = typer.Option(
        TRAIN.gradient_checkpointing, help="Trade compute for memory (long sequences, big models)."
    ),
    threads: int = typer.Option(RUN.threads, help="Torch threads (default: available cores)."),
    fresh: bool = typer.Option(False, help="Discard an earlier checkpoint instead of resuming from it."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """LoRA SFT of the profile writer on teacher pairs (loss on responses only): adapter + metrics.json."""
    from reclm.distributed import is_main_process
    from reclm.llm.sft import LoraSettings, TrainSettings, teacher_conversations, train_lora

    if kind not in ("user", "item"):
        raise ValueError(f"--kind {kind!r}: expected user or item")
    rundir = RunDir(run)
    path = teacher_file(rundir, source, kind)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {kind} teacher profiles (run `reclm teacher {run}` first)")
    out = rundir.stage("sft" if kind == "user" else "item_sft")
    if fresh:
        for name in ("checkpoint", "checkpoint.old", "checkpoint.tmp"):
            shutil.rmtree(out / name, ignore_errors=True)
    conversations, keys = teacher_conversations(path)
    lora = LoraSettings(lora_r, lora_alpha, lora_dropout, tuple(m.strip() for m in target_modules.split(",") if m))
    train = TrainSettings(
        steps=max_steps or None,
        epochs=epochs,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        max_seq_len=max_seq_len,
        holdout=holdout,
        seed=seed,
        eval_every=eval_every,
        save_every=save_every,
        gradient_checkpointing=gradient_checkpointing,
        threads=threads,
    )
    main = is_main_process()  # under accelerate launch / torchrun the first process alone writes and reports
    if main:
        console.print(f"sft: {len(conversations)} {kind} pairs from {path}, base {model}")
    result = train_lora(conversations, out, model, lora, train, progress=not quiet)
    if not main:
        return
    held = json.loads((out / "split.json").read_text())["heldout"]
    heldout: dict[str, list[str]] = {"user": [], "item": []}
    for i in held:
        heldout[keys[i][0]].append(keys[i][1])
    (out / "heldout.json").write_text(json.dumps(heldout))
    if result.resumed_from is not None:
        console.print(f"  resumed from checkpoint step {result.resumed_from}")
    console.print(
        f"  {result.steps} steps in {result.seconds:.0f} s ({result.extra['tokens_per_s']:.0f} tok/s); "
        f"train {result.n_train}, held out {result.n_heldout}, skipped (too long) {result.skipped_too_long}"
    )
    before, after = result.heldout_loss_before, result.heldout_loss_after
    console.print(f"  held-out loss {before:.4f} -> {after:.4f}" if before is not None else f"  held-out {after}")
    console.print(f"  adapter: {result.adapter}")


def existing_adapter(path: Path | None) -> Path | None:
    if path is None:
        return None
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path}: not a LoRA adapter folder (no adapter_config.json)")
    return path


@app.command("profile")
@friendly_errors
def profile_command(
    run: Path = typer.Argument(..., help="Prepared run directory (ideally with sft/adapter)."),
    users: bool = typer.Option(True, "--users/--no-users", help="Write RUN/profiles/users.jsonl."),
    items: bool = typer.Option(True, "--items/--no-items", help="Write RUN/profiles/items.jsonl."),
    backend: str = typer.Option(GEN.backend, help="ctranslate2 (ct2: fast CPU) | transformers (reference) | openai."),
    model: str = typer.Option(RUN.llm.base_model, help="Base model (packaged name or HF folder); openai: served name."),
    adapter: Path = typer.Option(None, help="LoRA adapter (default: the run's last tuned one: rl, collab, then sft)."),
    item_adapter: Path = typer.Option(
        None, help="Adapter for item profiles (default: RUN/item_sft/adapter or --adapter)."
    ),
    no_adapter: bool = typer.Option(False, help="Generate with the base model alone."),
    max_new_tokens: int = typer.Option(
        GEN.max_new_tokens, help="Token limit per profile (decoding also stops at end of line)."
    ),
    temperature: float = typer.Option(GEN.temperature, help="0: greedy; else sampling with --seed."),
    top_p: float = typer.Option(GEN.top_p, help="Nucleus sampling (temperature > 0)."),
    seed: int = typer.Option(GEN.seed, help="Sampling seed."),
    repetition_penalty: float = typer.Option(
        GEN.repetition_penalty, help="> 1 stops lists repeating entries (1.05 measured; 1 = off)."
    ),
    limit: int = typer.Option(GEN.users, help="Only the first N users and the first N items (a documented subset)."),
    batch_size: int = typer.Option(GEN.batch_size, help="Prompts per batch (ct2 / transformers)."),
    max_history: int = typer.Option(RUN.prompt.max_items, help="Most recent train items in a user prompt."),
    max_words: int = typer.Option(RUN.prompt.max_words, help="Words kept of each item field."),
    prompt_style: str = typer.Option(RUN.prompt.style, help="Prompt layout: compact | paper."),
    quantization: str = typer.Option(
        GEN.quantization, help="ct2: int8 | float32... (CPU default: int8; float32 where it is off)"
    ),
    threads: int = typer.Option(RUN.threads, help="CPU threads (default: available cores)."),
    base_url: str = typer.Option(
        GEN.base_url,
        help="openai: endpoint base URL; several servers with the same model, comma-separated (spread by load).",
    ),
    api_key_env: str = typer.Option(GEN.api_key_env, help="openai: environment variable with the key."),
    concurrency: int = typer.Option(GEN.concurrency, help="openai: requests in flight (on each server)."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Generate user and item profiles (train history only) into RUN/profiles/, cached and resumable."""
    from reclm.llm.generation import DecodeParams, GenerationCache, Job, generate_records, generate_texts
    from reclm.llm.prompts import user_prompts

    rundir = RunDir(run)
    data, split = rundir.load()
    params = DecodeParams(max_new_tokens, temperature, top_p, 0, seed, repetition_penalty=repetition_penalty)
    budget = prompt_budget(max_items=max_history, max_words=max_words, style=prompt_style)
    user_adapter = None if no_adapter else existing_adapter(adapter) or latest_user_adapter(rundir)
    if user_adapter is None and not no_adapter and backend != "openai":
        err_console.print(f"note: no adapter given and none in {rundir.root} (rl, collab, sft): the base model writes")
    elif user_adapter is not None and adapter is None:
        err_console.print(f"user profiles by {user_adapter}")
    options = generator_options(backend, threads, quantization, base_url, api_key_env, concurrency)
    cache = GenerationCache()
    summary: dict[str, dict] = {}
    out = rundir.profiles
    out.mkdir(parents=True, exist_ok=True)
    generators: dict[str, object] = {}

    def generator_for(adapter_path: Path | None):
        from reclm.llm.generation import make_generator

        key = str(adapter_path)
        if key not in generators:
            generators[key] = make_generator(backend, model_arg(backend, model), adapter_path, batch_size, **options)
        return generators[key]

    if users:
        wanted = range(min(limit, data.n_users)) if limit else None
        prompts = user_prompts(data, split, wanted, budget)
        jobs = [Job("user", data.user_ids[u], p) for u, p in prompts.items()]
        stats = generate_records(
            generator_for(user_adapter), jobs, params, out / "users.jsonl", cache, progress=not quiet, desc="users"
        )
        summary["users"] = stats.to_dict()
        report("users", stats)
    if items:
        from reclm.llm.item_side import generate_item_profiles
        from reclm.pipeline.inputs import item_inputs

        chosen = None if no_adapter else existing_adapter(item_adapter) or rundir.stage_adapter("item_sft")
        generator = generator_for(chosen or user_adapter)
        item_stats = []

        def write(prompts: list[str]) -> list[str]:
            texts, stats = generate_texts(generator, prompts, params, cache, progress=not quiet, desc="items")
            item_stats.append(stats)
            return [t or "" for t in texts]

        wanted_items = list(range(min(limit, data.n_items))) if limit else None
        written = generate_item_profiles(
            data, split, write, out, **item_inputs(rundir, data), budget=budget, items=wanted_items
        )
        merged = merge_stats(item_stats)
        summary["items"] = {**written, **merged}
        report("items", merged)
    (out / "generation.json").write_text(json.dumps({"params": params.key(), **summary}, indent=2))
    cache.close()


def latest_user_adapter(run: RunDir) -> Path | None:
    """The user-profile writer of the method's last stage that ran: RL, else collaborative tuning, else SFT
    (the server's choice too)."""
    from reclm.serve.runinfo import find_adapter

    return find_adapter(run, "user")


def model_arg(backend: str, model: str) -> str | None:
    return model if backend != "openai" or model != RUN.llm.base_model else None


def generator_options(backend: str, threads, quantization, base_url, api_key_env, concurrency) -> dict:
    if backend == "openai":
        return {"base_url": split_urls(base_url), "api_key_env": api_key_env, "concurrency": concurrency}
    options: dict = {"threads": threads}
    if backend in ("ct2", "ctranslate2") and quantization:
        options["quantization"] = quantization
    return options


def split_urls(value: str | list[str]) -> str | list[str]:
    """``--base-url a,b``: a list of servers; one URL stays a string."""
    if not isinstance(value, str):
        return value
    urls = [url.strip() for url in value.split(",") if url.strip()]
    return urls if len(urls) > 1 else value.strip()


def merge_stats(parts: list) -> dict:
    keys = ("jobs", "distinct", "cached", "generated", "failed", "prompt_tokens", "new_tokens")
    total = {k: sum(getattr(p, k) for p in parts) for k in keys}
    seconds = sum(p.seconds for p in parts)
    total["seconds"] = round(seconds, 2)
    total["profiles_per_s"] = round(total["generated"] / seconds, 3) if seconds else 0.0
    total["new_tokens_per_s"] = round(total["new_tokens"] / seconds, 1) if seconds else 0.0
    total["generator"] = parts[0].generator if parts else ""
    return total


def report(side: str, stats) -> None:
    info = stats if isinstance(stats, dict) else stats.to_dict()
    console.print(
        f"{side}: {info['jobs']} prompts, {info['distinct']} distinct, {info['cached']} cached, "
        f"{info['generated']} generated in {info['seconds']:.1f} s "
        f"({info['profiles_per_s']:.2f} profiles/s, {info['new_tokens_per_s']:.0f} new tokens/s)"
        + (f", {info['failed']} failed" if info.get("failed") else "")
    )
