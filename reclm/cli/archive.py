"""``reclm export`` and ``reclm import``: move a run's finished stages to another machine."""

from __future__ import annotations

from pathlib import Path

import typer

from reclm.cli.common import app, console, friendly_errors


def size_text(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 1024:.1f} KiB"


@app.command("export")
@friendly_errors
def export_command(
    run: Path = typer.Argument(..., help="Run directory to export (read only)."),
    archive: Path = typer.Argument(..., help="Archive to write: .tar, or .tar.gz / .tgz (gzip)."),
) -> None:
    """Pack a run's finished stages (outputs, manifests, config, split; no dataset copy) into one archive."""
    from reclm.pipeline.archive import export_run

    summary = export_run(run, archive)
    console.print(
        f"exported {len(summary.stages)} finished stages ({', '.join(summary.stages)}): {summary.files} files, "
        f"{size_text(summary.bytes)} of outputs -> {summary.archive} ({size_text(summary.archive.stat().st_size)})",
        highlight=False,
        soft_wrap=True,
    )
    for name, why in summary.skipped.items():
        console.print(f"left out {name}: {why} (`reclm run` redoes it after import)", highlight=False)


@app.command("import")
@friendly_errors
def import_command(
    archive: Path = typer.Argument(..., help="Archive written by `reclm export`."),
    run: Path = typer.Argument(..., help="New or empty run directory to unpack into."),
) -> None:
    """Unpack an exported run into a new folder, every checksum verified; `reclm run` then resumes it."""
    from reclm.pipeline.archive import import_run

    summary = import_run(archive, run)
    console.print(
        f"imported {len(summary.stages)} finished stages ({', '.join(summary.stages)}), {summary.files} files "
        f"verified -> {summary.run}",
        highlight=False,
        soft_wrap=True,
    )
    if summary.dataset:
        console.print(f"dataset {summary.dataset!r}: found, fingerprint matches", highlight=False)
    if summary.rebased:
        console.print(f"input files found on this machine for: {', '.join(summary.rebased)}", highlight=False)
    console.print(
        f"resume with: reclm run CONFIG --out {summary.run} (the run's own config: {summary.run / 'config.yaml'})",
        highlight=False,
        soft_wrap=True,
    )
