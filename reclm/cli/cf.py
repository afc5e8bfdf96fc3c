"""``reclm train-cf``: train and evaluate one CF backbone in one feature mode."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from click.core import ParameterSource
from rich.table import Table

from reclm.cf.config import BACKBONES, FEATURE_MODES, FUSION_NAMES, CFConfig
from reclm.cli.common import app, console, friendly_errors
from reclm.cli.data import split_spec
from reclm.cli.defaults import RUN, comma
from reclm.data.loaders import load_dataset
from reclm.data.split import make_split
from reclm.rundir import RunDir

CF = CFConfig.build(RUN.cf.params, source="cf.params")  # `reclm run`'s CF settings: cf.params on CFConfig's defaults
SPLIT = RUN.split


def choice(name: str, value: str | None, allowed: tuple[str, ...]) -> str | None:
    if value is not None and value not in allowed:
        raise ValueError(f"--{name} {value!r}: expected one of {', '.join(allowed)}")
    return value


def parse_topks(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ValueError(f"--topks {text!r}: expected integers like 10,20,40") from exc


@app.command("train-cf")
@friendly_errors
def train_cf_command(
    ctx: typer.Context,
    dataset: str = typer.Option(
        None,
        help="ml-100k, or a path (paper layout, RecBole atomic folder, CSV). "
        "(default: ml-100k, or the --run's dataset)",
    ),
    run: Path = typer.Option(None, help="Prepared run directory: use its saved split (and its profiles)."),
    backbone: str = typer.Option(CF.backbone, help=" | ".join(BACKBONES)),
    features: str = typer.Option(CF.features, help=" | ".join(FEATURE_MODES)),
    fusion: str = typer.Option(CF.fusion, help=f"{' | '.join(FUSION_NAMES)}: how profiles join."),
    profile_dropout: float = typer.Option(
        CF.profile_dropout, help="Share of training profiles replaced by the learned 'no profile' vector."
    ),
    profiles: Path = typer.Option(None, help="Run directory holding embeddings/{users,items}.npz (text+*profiles)."),
    text_run: Path = typer.Option(
        None, help="Folder of a finished `text` run on the same split: its model is epoch 0 of the selection."
    ),
    from_text: str = typer.Option(
        None, help="candidate | warm | none: how --text-run is used (default candidate with --text-run)."
    ),
    seed: int = typer.Option(RUN.cf.seeds[0], help="Model seed (init, sampling)."),
    config: Path = typer.Option(None, help="YAML file of CF settings (over these defaults; flags given override it)."),
    split: str = typer.Option(SPLIT.method, help="auto | random | temporal | snapshot (ignored with --run)"),
    ratios: str = typer.Option(comma(SPLIT.ratios), help="train,valid,test ratios per user"),
    zero_shot: float = typer.Option(SPLIT.zero_shot_fraction, help="Share of items held out of training (zero-shot)."),
    zero_shot_items: str = typer.Option(SPLIT.zero_shot, help="random | latest (the items that appear last in time)."),
    cold_valid: float = typer.Option(SPLIT.cold_valid_fraction, help="Share of items held out for cold validation."),
    split_seed: int = typer.Option(SPLIT.seed, help="Seed of the split (kept apart from --seed)."),
    item_text: str = typer.Option(None, help="Item text file (CSV or JSON Lines keyed by 'item') for CSV data."),
    epochs: int = typer.Option(CF.epochs, help="Maximum epochs."),
    dim: int = typer.Option(CF.dim, help="Embedding size."),
    lr: float = typer.Option(CF.lr, help="Adam learning rate."),
    batch_size: int = typer.Option(CF.batch_size, help="BPR batch size."),
    layers: int = typer.Option(CF.layers, help="Graph layers."),
    reg_weight: float = typer.Option(CF.reg_weight, help="L2 weight on layer-0 representations."),
    patience: int = typer.Option(CF.patience, help="Validations without improvement before stopping."),
    eval_every: int = typer.Option(CF.eval_every, help="Validate every N epochs."),
    valid_metric: str = typer.Option(CF.valid_metric, help="Selection metric."),
    topks: str = typer.Option(comma(CF.topks), help="Cut-offs, e.g. 10,20,40."),
    device: str = typer.Option(CF.device, help="auto | cpu | cuda"),
    threads: int = typer.Option(CF.threads, help="Torch CPU threads (default: all available cores or RECLM_THREADS)."),
    out: Path = typer.Option(None, help="Output folder (default: RUN/cf/<backbone>-<features>-s<seed> with --run)."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Train a CF backbone (BPR, early stopping on validation) and report valid / test / zero-shot metrics.
    Defaults are `reclm run`'s (its cf.params on the CF trainer's own defaults)."""
    from reclm.cf.features import load_side_features
    from reclm.cf.trainer import load_text_run, train_cf

    overrides = {
        "backbone": choice("backbone", backbone, BACKBONES),
        "features": choice("features", features, FEATURE_MODES),
        "fusion": choice("fusion", fusion, FUSION_NAMES),
        "profile_dropout": profile_dropout,
        "seed": seed,
        "epochs": epochs,
        "dim": dim,
        "lr": lr,
        "batch_size": batch_size,
        "layers": layers,
        "reg_weight": reg_weight,
        "patience": patience,
        "eval_every": eval_every,
        "valid_metric": valid_metric,
        "topks": parse_topks(topks),
        "device": choice("device", device, ("auto", "cpu", "cuda")),
        "threads": threads,
    }
    given = {k for k in overrides if ctx.get_parameter_source(k) is not ParameterSource.DEFAULT}
    use = choice("from-text", from_text, ("none", "candidate", "warm")) or ("candidate" if text_run else None)
    if use is not None:
        overrides["from_text"] = use
        given.add("from_text")
    cfg = cf_settings(overrides, given, config)
    states = load_text_run(text_run, "--text-run") if text_run is not None else (None, None)
    info: dict = {}
    if run is not None:
        rundir = RunDir(run)
        if dataset is not None:
            raise ValueError("give either --run (its dataset and split are used) or --dataset, not both")
        data, the_split = rundir.load()
        info["split_source"] = str(rundir.data)
        out = out or rundir.cf / cfg.run_name()
        profiles = profiles or (run if cfg.features.startswith("text+") else None)
    else:
        if out is None:
            raise ValueError("--out DIR is required (or give --run RUN_DIR)")
        data = load_dataset(dataset or "ml-100k", item_text=item_text)
        spec = split_spec(split, ratios, zero_shot, zero_shot_items, cold_valid, split_seed)
        the_split = make_split(data, spec)
        the_split.save(Path(out) / "split")
        info["split_source"] = str(Path(out) / "split")
    info["dataset"] = data.name
    side = load_side_features(data, cfg.features, profiles)
    if side.coverage:
        console.print("feature coverage: " + ", ".join(f"{k} {v:.1%}" for k, v in side.coverage.items()))
    console.print(
        f"[bold]{cfg.backbone}[/] / features [bold]{cfg.features}[/] on {data.name}: "
        f"{the_split.n_users} users, {the_split.n_items} items, {the_split.stats()['train']} train pairs"
    )
    result = train_cf(
        the_split, cfg, side, out, show_progress=not quiet, user_ids=data.user_ids, extra_info=info,
        text_state=states[0], text_cold_state=states[1],
    )  # fmt: skip
    console.print(results_table(result.metrics_json(), cfg.topks, json.loads((Path(out) / "metrics.json").read_text())))
    console.print(
        f"best epoch {result.best_epoch} of {result.epochs_run}; {result.epoch_seconds:.3f} s/epoch train, "
        f"{result.eval_seconds:.3f} s/validation; written to {out}"
    )


def cf_settings(flags: dict, given: set[str], config: Path | None) -> CFConfig:
    """The flags, or with ``config``: its settings over the flags' defaults, and the flags ``given`` over both."""
    if config is None:
        return CFConfig.build(source="flags", **flags)
    loaded = CFConfig.from_yaml(config)
    from_file = loaded.model_dump(include=loaded.model_fields_set)
    return CFConfig.build({**flags, **from_file}, source=str(config), **{k: flags[k] for k in given})


def results_table(metrics: dict, topks: list[int], full: dict) -> Table:
    """Metrics as rows, tasks as columns (fits an 80-column terminal)."""
    tasks = tuple(t for t in ("valid", "test", "zero_shot", "cold_valid", "zero_shot_cold_selected") if metrics.get(t))
    table = Table(title="selected on validation (cold-valid, zero-shot-cold-selected: on cold validation)")
    table.add_column("metric")
    for task in tasks:
        table.add_column(task.replace("_", "-").replace("zero-shot-cold-selected", "zero-shot@cold"), justify="right")
    users = full.get("users_evaluated", {})
    table.add_row("users", *(str(users.get(task, 0)) for task in tasks))
    for k in topks:
        for name, key in ((f"Recall@{k}", f"recall@{k}"), (f"NDCG@{k}", f"ndcg@{k}")):
            table.add_row(name, *(f"{metrics[t][key]:.4f}" if metrics[t] else "-" for t in tasks))
    return table
