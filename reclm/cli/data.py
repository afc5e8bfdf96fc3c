"""``reclm datasets`` and ``reclm prepare``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from reclm.cli.common import app, console, friendly_errors
from reclm.data.loaders import BUILTIN, load_dataset
from reclm.data.split import SplitSpec
from reclm.rundir import RunDir


@app.command("datasets")
@friendly_errors
def datasets_command(
    path: list[str] = typer.Argument(None, help="Dataset names or paths to describe (default: the built-in ones)."),
) -> None:
    """List built-in datasets, or describe the given ones (users, items, interactions, fields)."""
    table = Table(title="datasets")
    for column in ("dataset", "users", "items", "interactions", "density", "item text", "user features", "notes"):
        table.add_column(column)
    for spec in path or sorted(BUILTIN):
        data = load_dataset(spec)
        info = data.summary()
        notes = []
        if "snapshot" in info:
            notes.append(f"snapshots {info['snapshot']}")
        if "new_items" in info:
            notes.append(f"{info['new_items']} new items")
        if info.get("resources"):
            notes.append("has " + ", ".join(info["resources"]))
        table.add_row(
            spec,
            str(info["users"]),
            str(info["items"]),
            str(info["interactions"]),
            f"{info['density']:.4%}",
            ", ".join(info["item_fields"]),
            ", ".join(info["user_fields"]) or "-",
            "; ".join(notes) or data.description,
        )
    console.print(table)
    console.print("Also accepted: a paper-layout folder, a RecBole atomic folder, or a user,item[,timestamp] CSV.")


@app.command("prepare")
@friendly_errors
def prepare_command(
    dataset: str = typer.Option("ml-100k", help="ml-100k, or a path (paper layout, RecBole atomic folder, CSV)."),
    out: Path = typer.Option(..., help="Run directory to create."),
    split: str = typer.Option("auto", help="auto | random | temporal | snapshot"),
    ratios: str = typer.Option("0.8,0.1,0.1", help="train,valid,test ratios per user"),
    zero_shot: float = typer.Option(0.1, help="Share of items held out of training entirely (zero-shot)."),
    zero_shot_items: str = typer.Option("random", help="random | latest (the items that appear last in time)."),
    cold_valid: float = typer.Option(0.05, help="Share of items held out for cold validation (as `reclm run`)."),
    seed: int = typer.Option(2020),
    item_text: str = typer.Option(None, help="Item text file (CSV or JSON Lines keyed by 'item') for CSV data."),
) -> None:
    """Load a dataset, split it and save the split into a run directory."""
    spec = split_spec(split, ratios, zero_shot, zero_shot_items, cold_valid, seed)
    _, saved = RunDir(out).prepare(dataset, spec, item_text=item_text)
    console.print(f"prepared {dataset} in {out}: {saved.stats()}")


def split_spec(method: str, ratios: str, zero_shot: float, zero_shot_items: str, cold_valid: float, seed: int):
    """The SplitSpec of the split options shared by `prepare` and `train-cf`."""
    return SplitSpec(
        method=method, ratios=parse_ratios(ratios), zero_shot_fraction=zero_shot, zero_shot=zero_shot_items,
        cold_valid_fraction=cold_valid, seed=seed,
    )  # fmt: skip


def parse_ratios(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise ValueError(f"--ratios {text!r}: expected three numbers like 0.8,0.1,0.1") from exc
    if len(values) != 3:
        raise ValueError(f"--ratios {text!r}: expected three numbers like 0.8,0.1,0.1")
    return values  # type: ignore[return-value]
