"""``reclm sft`` under a real ``accelerate launch`` on 2 CPU processes (gloo) takes the same steps as one process:
same train and held-out losses, same adapter, one set of files, and a resumed data-parallel run continues
exactly where it stopped. Stages whose loops are not data-parallel refuse to start on several processes."""

from __future__ import annotations

import inspect
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reclm.cli.main import app
from reclm.distributed import refuse_data_parallel
from reclm.llm.records import ProfileRecord, write_records
from reclm.llm.sft import DataParallel

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "accelerate-cpu.yaml"

# The `reclm sft` CLI invoked twice in one process: 4 steps, then 6 (resumes from the step-4 checkpoint).
WORKER = """
import sys
from reclm.cli.main import app

run, *args = sys.argv[1:]
for steps in ("4", "6"):
    app(["sft", run, *args, "--max-steps", steps], standalone_mode=False)
"""


def sft_args(tiny_model: Path) -> list[str]:
    # no dropout: its masks are drawn per process, the only thing that may differ from one process
    return ["--model", str(tiny_model), "--batch-size", "6", "--grad-accum", "2", "--lr", "0.02", "--holdout", "0.25",
            "--eval-every", "3", "--save-every", "2", "--lora-dropout", "0", "--threads", "1", "--quiet"]  # fmt: skip


def teacher_run(folder: Path, conversations: list) -> Path:
    records = [ProfileRecord("user", str(k), c[1]["content"], c[2]["content"]) for k, c in enumerate(conversations)]
    write_records(folder / "teacher" / "users.jsonl", records)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def adapter_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "adapter" / "adapter_model.safetensors")


def test_accelerate_launch_on_two_processes_matches_one_process(tiny_model, toy_conversations, tmp_path):
    pytest.importorskip("accelerate")
    args = sft_args(tiny_model)
    single = teacher_run(tmp_path / "single", toy_conversations)
    for steps in ("4", "6"):
        result = CliRunner().invoke(app, ["sft", str(single), *args, "--max-steps", steps])
        assert result.exit_code == 0, result.output

    parallel = teacher_run(tmp_path / "parallel", toy_conversations)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "RECLM_THREADS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), "--num_processes", "2",
              "--main_process_port", str(free_port())]  # fmt: skip
    command = [*launch, str(worker), str(parallel), *args]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("adapter:") == 2  # the first process reports, once per invocation

    one = json.loads((single / "sft" / "metrics.json").read_text())
    two = json.loads((parallel / "sft" / "metrics.json").read_text())
    assert two["extra"]["processes"] == 2 and one["extra"]["processes"] == 1
    assert one["resumed_from"] == two["resumed_from"] == 4 and two["steps"] == 6
    assert [s for s, _ in two["train_curve"]] == list(range(1, 7))
    assert [loss for _, loss in two["train_curve"]] == pytest.approx(
        [loss for _, loss in one["train_curve"]], rel=1e-4, abs=1e-5
    )
    assert (
        [s for s, _ in two["eval_curve"]] == [s for s, _ in one["eval_curve"]] == [0, 3, 4, 6]
    )  # 4: the end of the first run
    assert [loss for _, loss in two["eval_curve"]] == pytest.approx(
        [loss for _, loss in one["eval_curve"]], rel=1e-4, abs=1e-5
    )
    assert (two["train_tokens"], two["label_tokens"]) == (one["train_tokens"], one["label_tokens"])
    for name in ("split.json", "heldout.json"):
        assert (parallel / "sft" / name).read_text() == (single / "sft" / name).read_text()
    assert not list((parallel / "sft").glob("*.tmp")) and not (parallel / "sft" / "checkpoint.old").exists()

    import torch

    a, b = adapter_weights(single / "sft"), adapter_weights(parallel / "sft")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=5e-5)
    assert max(float(w.abs().max()) for w in a.values()) > 1e-2  # the adapters did move


def test_one_process_is_a_no_op_data_parallel():
    dp = DataParallel()
    assert dp.main and dp.share([3, 1, 2]) == [3, 1, 2] and dp.sum_values([1.5, 2.0]) == [1.5, 2.0]
    assert DataParallel(rank=1, world=3).share(list(range(8))) == [1, 4, 7]
    assert dp.sum_grads([], 4.25) == 4.25


def test_loops_that_are_not_data_parallel_refuse_several_processes(monkeypatch):
    from reclm.llm.collab import run_collab
    from reclm.llm.item_side import generate_item_profiles
    from reclm.llm.reward import run_reward
    from reclm.llm.rl.stage import run_rl

    refuse_data_parallel("anything")  # one process: nothing to refuse
    monkeypatch.setenv("WORLD_SIZE", "2")
    for start in (run_reward, run_rl, run_collab, generate_item_profiles):
        required = [p for p in inspect.signature(start).parameters.values() if p.default is inspect.Parameter.empty]
        with pytest.raises(ValueError, match="does not run data-parallel"):
            start(*[None] * len(required))  # refused before any input is read


def test_reclm_run_refuses_several_processes_with_one_line(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from reclm.cli.main import app

    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(app, ["run", "--dataset", "ml-100k", "--dry-run", "--out", str(tmp_path / "run")])
    assert result.exit_code != 0
    assert "reclm run does not run data-parallel" in result.output
    assert not (tmp_path / "run").exists()
