"""``reclm status RUN``: where a run stands (states, time spent, progress, time left), read only."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from reclm.cli.common import app, console, friendly_errors
from reclm.pipeline.formatting import format_seconds
from reclm.pipeline.status import RunStatus, StageStatus, run_status, to_json

COLUMNS = ("#", "stage", "state", "time", "progress", "left", "note")


HELP = (
    "Where a run stands: each stage's state, time spent over its attempts, progress of a stage in progress "
    "(CF runs done, checkpoint step, records written) and the estimate of what is left.\n\n"
    "Read only: takes no lock and writes nothing, so it is safe while `reclm run` works on RUN (it says whether "
    "one holds the run's lock now). The estimate plans the run from RUN/config.yaml as `reclm run --dry-run` "
    "does: when a stage is left to run it loads the dataset and its split (seconds on ml-100k, longer on MIND); "
    "--no-estimate skips that."
)


@app.command("status", help=HELP)
@friendly_errors
def status_command(
    run_dir: Path = typer.Argument(..., help="A run directory made by `reclm run`."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object (states, seconds, progress, estimates)."),
    no_estimate: bool = typer.Option(
        False, "--no-estimate", help="Read the manifests and work folders only: no plan, no dataset loaded."
    ),
) -> None:
    """Where a run stands (help: ``HELP``)."""
    status = run_status(run_dir, estimate=not no_estimate)
    if as_json:
        typer.echo(to_json(status))
    elif console.is_terminal:
        print_table(status)
    else:
        print_lines(status)


def header(status: RunStatus) -> str:
    if status.locked:
        return f"{status.root}: a `reclm run` is working on it now (it holds the run's lock)"
    return f"{status.root}: no `reclm run` holds it now"


def footer(status: RunStatus) -> str:
    if status.left is None:
        return status.note
    if not status.left and not any(s.plan == "run" for s in status.stages):
        return "left: nothing (every stage is complete or off for RUN/config.yaml)"
    return f"left: about {format_seconds(status.left)}" + (f" ({status.note})" if status.note else "")


def cells(stage: StageStatus) -> dict[str, str]:
    time = format_seconds(stage.seconds) if stage.seconds else "-"
    if stage.attempts > 1:
        time += f" ({stage.attempts} attempts)"
    left = ""
    if stage.plan == "run":
        left = "?" if stage.left is None else f"{format_seconds(stage.left)} ({stage.basis})"
    notes = list(stage.notes)
    if stage.error:
        notes.append(stage.error)
    if stage.plan == "run" and (stage.state == "complete" or stage.reason.startswith(("changed", "forced"))):
        notes.insert(0, f"reruns: {stage.reason}")  # its output no longer fits the config
    return {
        "state": stage.state,
        "time": time,
        "progress": progress_text(stage),
        "left": left,
        "note": "; ".join(notes),
    }


def progress_text(stage: StageStatus) -> str:
    progress = stage.progress
    if progress is None:
        return ""
    parts = []
    if progress.units_done or progress.units_started or progress.units_total:
        total = f"/{progress.units_total}" if progress.units_total else ""
        what = "CF runs" if stage.name == "train_cf" else "units"
        parts.append(f"{len(progress.units_done)}{total} {what} done")
    if progress.units_started:
        started = [
            name if epochs is None else f"{name} at epoch {epochs}" for name, epochs in progress.units_started.items()
        ]
        parts.append("started: " + ", ".join(started))
    if progress.step is not None:
        parts.append(f"checkpoint at step {progress.step}/{progress.steps}")
    parts.extend(f"{name}: {count:,} lines" for name, count in progress.records.items())
    if not progress.resumable:
        parts.append("work folder of other inputs")
    return "; ".join(parts)


def print_table(status: RunStatus) -> None:
    console.print(header(status), highlight=False)
    table = Table(title_justify="left")
    for column in COLUMNS:
        table.add_column(column, justify="right" if column in ("#", "time") else "left")
    for index, stage in enumerate(status.stages, 1):
        row = cells(stage)
        table.add_row(str(index), stage.name, *(row[c] for c in COLUMNS[2:]))
    console.print(table)
    if footer(status):
        console.print(footer(status), highlight=False)


def print_lines(status: RunStatus) -> None:
    """One plain line per stage (a log, a pipe): ``[ n/12] stage  state  time  progress  left  note``."""
    lines = [header(status)]
    for index, stage in enumerate(status.stages, 1):
        row = cells(stage)
        line = f"[{index:>2}/{len(status.stages)}] {stage.name:<12} {row['state']:<12} {row['time']:>9}"
        for key in ("progress", "left", "note"):
            if row[key]:
                line += f"  {'left ' if key == 'left' else ''}{row[key]}"
        lines.append(line)
    if footer(status):
        lines.append(footer(status))
    typer.echo("\n".join(lines))
