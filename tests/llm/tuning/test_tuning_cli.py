"""The stage commands: real runs where cheap, one-line errors (exit 2) on bad input."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from reclm.cli.main import app

runner = CliRunner()


def test_neighbours_command_uses_the_runs_cf_embeddings(tiny_run):
    run, data, split = tiny_run
    folder = run.cf / "bias-mf-none-s1"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.savez(
        folder / "embeddings.npz", users=rng.normal(size=(data.n_users, 4)), items=rng.normal(size=(data.n_items, 4))
    )
    result = runner.invoke(app, ["neighbours", str(run.root), "--k", "2", "--no-items"])
    assert result.exit_code == 0, result.output
    summary = json.loads((run.stage("neighbours") / "neighbours.json").read_text())
    assert summary["cf_embeddings"].endswith("bias-mf-none-s1/embeddings.npz") and summary["k"] == 2
    assert np.load(run.stage("neighbours") / "users.npz")["neighbours"].shape == (data.n_users, 2)


def test_bad_inputs_are_one_line_errors(tiny_run):
    run, _, _ = tiny_run
    cases = [
        (["rl", str(run.root), "--method", "a2c"], "expected one of ppo, dpo, none"),
        (["rl", str(run.root), "--method", "ppo"], "no sft/adapter or collab/adapter"),
        (["reward", str(run.root)], "only 0 users have a teacher profile"),
        (["collab", str(run.root)], "no sft/adapter"),
        (["neighbours", str(run.root), "--source", "shipped"], "ships no user_neighbours.jsonl"),
        (["audit", str(run.root / "nowhere")], "not a prepared run directory"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)
