"""``reclm teacher``, ``reclm encode`` and ``reclm quality``: teacher profiles, profile embeddings and
the profile quality report, each reading and writing one run directory."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from reclm.cli.common import app, console, err_console, friendly_errors
from reclm.cli.defaults import RUN, prompt_budget
from reclm.data.split import SplitSpec
from reclm.rundir import RunDir

TEACHER_KINDS = ("file", "openai", "offline")
OPENAI = RUN.teacher.openai


def load_or_prepare(run: RunDir, dataset: str | None):
    """The run's saved data and split; a run without ``data/`` is prepared from ``--dataset`` first
    (default split)."""
    if (run.data / "dataset.json").is_file():
        if dataset is not None:
            saved = run.dataset_spec()["dataset"]
            if str(dataset) != str(saved):
                raise ValueError(f"--dataset {dataset!r}, but {run.root} was prepared from {saved!r}")
        return run.load()
    if dataset is None:
        raise ValueError(f"{run.root} has no data/ yet: give --dataset to prepare it (e.g. --dataset ml-100k)")
    console.print(f"preparing {dataset} in {run.root} (default split)")
    return run.prepare(dataset, SplitSpec())


def parse_sides(text: str) -> list[str]:
    sides = {"both": ["user", "item"], "users": ["user"], "items": ["item"]}
    if text not in sides:
        raise ValueError(f"--only {text!r}: expected both, users or items")
    return sides[text]


@app.command("teacher")
@friendly_errors
def teacher_command(
    run: Path = typer.Argument(..., help="Run directory (prepared, or prepared now from --dataset)."),
    kind: str = typer.Option(
        RUN.stages.teacher, help="file (shipped profiles) | openai (any compatible endpoint) | offline."
    ),
    dataset: str = typer.Option(None, help="Dataset to prepare the run from when it has no data/ yet."),
    only: str = typer.Option("both", help="both | users | items"),
    max_users: int = typer.Option(RUN.teacher.users, help="Sample this many users (seeded) (default: all available)."),
    max_items: int = typer.Option(RUN.teacher.items, help="Sample this many items (seeded) (default: all available)."),
    seed: int = typer.Option(RUN.teacher.seed, help="Seed of the user/item sample."),
    max_history: int = typer.Option(RUN.prompt.max_items, help="Most recent train items shown in a user prompt."),
    max_words: int = typer.Option(RUN.prompt.max_words, help="Words kept of each item field (abstracts...)."),
    prompt_style: str = typer.Option(RUN.prompt.style, help="Prompt layout: compact | paper (as `reclm run`)."),
    fresh: bool = typer.Option(False, help="Delete earlier teacher files first (else resume / refuse to mix)."),
    user_file: Path = typer.Option(
        RUN.teacher.user_file, help="file: user profiles JSONL {user, profile, prompt?} (default: shipped)."
    ),
    item_file: Path = typer.Option(
        RUN.teacher.item_file, help="file: item profiles JSONL {item, profile, prompt?} (default: shipped)."
    ),
    prompt_from: str = typer.Option(
        RUN.teacher.prompt_from, help="file: build prompts from the split | source | auto."
    ),
    base_url: str = typer.Option(OPENAI.base_url, help="openai: endpoint base URL."),
    model: str = typer.Option(OPENAI.model, help="openai: model name."),
    api_key_env: str = typer.Option(OPENAI.api_key_env, help="openai: environment variable holding the API key."),
    concurrency: int = typer.Option(OPENAI.concurrency, help="openai: requests in flight."),
    max_retries: int = typer.Option(OPENAI.max_retries, help="openai: retries per request (429, 5xx, timeouts)."),
    timeout: float = typer.Option(OPENAI.timeout, help="openai: seconds per request."),
    temperature: float = typer.Option(OPENAI.temperature, help="openai: sampling temperature."),
    max_tokens: int = typer.Option(OPENAI.max_tokens, help="openai: completion token limit."),
    price_in: float = typer.Option(OPENAI.price_in, help="openai: $ per 1k prompt tokens (ledger; gpt-3.5-turbo)."),
    price_out: float = typer.Option(OPENAI.price_out, help="openai: $ per 1k completion tokens."),
    max_cost: float = typer.Option(
        RUN.teacher.max_cost,
        min=0,
        help="openai: spending cap in $ (the ledger's total): stop before a request could pass it.",
    ),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Write teacher profiles (RUN/teacher/{users,items}.jsonl) from shipped files, an endpoint or rules."""
    from reclm.llm.teachers import EndpointConfig, make_teacher

    if kind not in TEACHER_KINDS:
        raise ValueError(f"--kind {kind!r}: expected one of {', '.join(TEACHER_KINDS)}")
    sides = parse_sides(only)
    rundir = RunDir(run)
    data, split = load_or_prepare(rundir, dataset)
    common = {
        "budget": prompt_budget(max_items=max_history, max_words=max_words, style=prompt_style),
        "max_users": max_users,
        "max_items": max_items,
        "seed": seed,
        "fresh": fresh,
        "progress": not quiet,
    }
    if kind == "file":
        teacher = make_teacher("file", user_file=user_file, item_file=item_file, prompt_from=prompt_from, **common)
    elif kind == "openai":
        import os

        if api_key_env and not os.environ.get(api_key_env):
            err_console.print(f"note: ${api_key_env} is not set; requests go without an API key")
        endpoint = EndpointConfig(
            base_url=base_url,
            model=model,
            api_key_env=api_key_env,
            concurrency=concurrency,
            max_retries=max_retries,
            timeout=timeout,
            temperature=temperature,
            max_tokens=max_tokens,
            price_in=price_in,
            price_out=price_out,
            max_cost=max_cost,
        )
        teacher = make_teacher("openai", endpoint=endpoint, **common)
    else:
        teacher = make_teacher("offline", **common)
    report = teacher.run(data, split, rundir, sides=sides)
    console.print(
        f"teacher {kind}: wrote {report.written['user']} users, {report.written['item']} items "
        f"into {rundir.teacher} ({report.seconds:.1f} s)"
    )
    if any(report.resumed.values()):
        console.print(f"  already there (resumed): {report.resumed['user']} users, {report.resumed['item']} items")
    for reason, count in report.skipped.items():
        console.print(f"  skipped {count}: {reason}")
    for note in report.notes:
        console.print(f"  note: {note}")
    if "ledger" in report.extra:
        console.print(f"  ledger: {json.dumps(report.extra['ledger'])}")


@app.command("encode")
@friendly_errors
def encode_command(
    run: Path = typer.Argument(..., help="Run directory."),
    source: str = typer.Option("profiles", help="profiles (generated) | teacher (the teacher's profiles)."),
    encoder: str = typer.Option(RUN.encoder.model, help="Text encoder: packaged name or local folder."),
    batch_size: int = typer.Option(RUN.encoder.batch_size, help="Encoder batch size."),
) -> None:
    """Embed profiles into RUN/embeddings/{users,items}.npz (read by train-cf --features text+profiles)."""
    from reclm.llm.encode import encode_run
    from reclm.text.encoder import TextEncoder

    metas = encode_run(RunDir(run), source, TextEncoder(encoder, batch_size=batch_size))
    for kind, meta in metas.items():
        console.print(f"{kind}s: {meta['count']} profiles from {meta['source']} -> {meta['dim']}-d ({meta['encoder']})")


@app.command("quality")
@friendly_errors
def quality_command(
    run: Path = typer.Argument(..., help="Run directory."),
    source: str = typer.Option("profiles", help="profiles | teacher: the profiles to judge."),
    reference: str = typer.Option("teacher", help="Folder in RUN with reference profiles ('' for none)."),
    heldout: Path = typer.Option(None, help="Held-out ids, JSON or records JSONL (default: RUN/sft/heldout.json)."),
    encoder: str = typer.Option(RUN.encoder.model, help="Text encoder for the similarity."),
) -> None:
    """Profile quality report (format, empty, duplicates, length, similarity to the teacher) -> quality.json."""
    from reclm.llm.quality import run_quality
    from reclm.text.encoder import TextEncoder

    rundir = RunDir(run)
    needs_encoder = bool(reference) and reference != source and (rundir.root / reference).is_dir()
    report = run_quality(
        rundir,
        source,
        reference or None,
        heldout,
        TextEncoder(encoder) if needs_encoder else None,
    )
    for kind in ("users", "items"):
        if kind not in report:
            continue
        stats = report[kind]
        line = (
            f"{kind}: {stats['count']} profiles, format {stats.get('format_rate', 0):.1%}, "
            f"empty {stats.get('empty_rate', 0):.1%}, duplicates {stats.get('duplicate_rate', 0):.1%}, "
            f"{stats.get('mean_words', 0):.1f} words"
        )
        sim = stats.get("similarity")
        if sim and sim.get("compared"):
            shuffled = sim.get("shuffled", float("nan"))
            line += f", cosine to {reference} {sim['mean_cosine']:.3f} (shuffled {shuffled:.3f})"
            line += f" over {sim['compared']} ids"
        console.print(line)
    console.print(f"wrote {rundir.root / source / 'quality.json'}")
