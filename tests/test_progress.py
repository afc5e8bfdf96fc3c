"""Progress off a terminal: periodic plain lines instead of a bar that draws nothing until the end."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from rich.progress import Progress

from reclm.progress import LogProgress, clock_text, log_interval, progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_terminal_gets_a_rich_bar_and_a_log_gets_plain_lines() -> None:
    terminal = Console(file=io.StringIO(), force_terminal=True)
    assert isinstance(progress(console=terminal), Progress)
    log = Console(file=io.StringIO(), force_terminal=False)
    assert isinstance(progress(console=log), LogProgress)


def test_lines_at_most_every_interval_and_once_at_completion() -> None:
    clock, stream = FakeClock(), io.StringIO()
    with LogProgress(stream=stream, interval=60, clock=clock) as bar:
        task = bar.add_task("sft", total=600, info="")
        for step in range(1, 601):
            clock.now += 1.0  # one second per step
            bar.update(task, completed=step, info=f"loss {1 / step:.3f}")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10  # seconds 60, 120, ..., 540, then 600 = completion
    assert lines[0] == "sft: 60/600 (10%)  loss 0.017  elapsed 0:01:00, about 0:09:00 left"
    assert lines[-1] == "sft: 600/600 (100%)  loss 0.002  elapsed 0:10:00"


def test_resumed_task_estimates_from_this_process_steps() -> None:
    clock, stream = FakeClock(), io.StringIO()
    with LogProgress(stream=stream, interval=10, clock=clock) as bar:
        task = bar.add_task("sft", total=100, completed=50)
        clock.now = 10.0
        bar.update(task, completed=60)  # 10 steps in 10 s, 40 to go
    assert stream.getvalue().splitlines()[0] == "sft: 60/100 (60%)  elapsed 0:00:10, about 0:00:40 left"


def test_unfinished_task_reports_where_it_stopped() -> None:
    clock, stream = FakeClock(), io.StringIO()
    with LogProgress(stream=stream, interval=1000, clock=clock) as bar:
        task = bar.add_task("lightgcn/text", total=300, status="")
        for _ in range(42):  # early stopping: never reaches the total
            clock.now += 0.5
            bar.advance(task)
        bar.update(task, status="best ndcg@20 0.2500 @ 31")
    assert stream.getvalue().splitlines() == [
        "lightgcn/text: 42/300 (14%)  best ndcg@20 0.2500 @ 31  elapsed 0:00:21, about 0:02:09 left"
    ]


def test_disabled_prints_nothing() -> None:
    stream = io.StringIO()
    with LogProgress(disable=True, stream=stream, interval=0) as bar:
        task = bar.add_task("x", total=2)
        bar.advance(task)
        bar.advance(task)
    assert stream.getvalue() == ""


def test_interval_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECLM_PROGRESS_SECONDS", "5")
    assert log_interval() == 5.0
    monkeypatch.setenv("RECLM_PROGRESS_SECONDS", "soon")
    with pytest.raises(ValueError, match="RECLM_PROGRESS_SECONDS"):
        log_interval()
    assert clock_text(3725.4) == "1:02:05"


def test_step_progress_reports_a_training_loop_in_a_log(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from reclm.progress import step_progress

    monkeypatch.setenv("RECLM_PROGRESS_SECONDS", "0")
    with step_progress("reward", 3) as update:
        for step, loss in enumerate((0.6, 0.4, 0.2), 1):
            update(step, f"loss {loss:.1f}")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  elapsed")[0] for line in lines] == [
        "reward: 1/3 (33%)  loss 0.6",
        "reward: 2/3 (67%)  loss 0.4",
        "reward: 3/3 (100%)  loss 0.2",
    ]


def test_reset_restarts_time_and_speed_at_the_given_step() -> None:
    clock, stream = FakeClock(), io.StringIO()
    with LogProgress(stream=stream, interval=0, clock=clock) as bar:
        task = bar.add_task("reward", total=300)
        clock.now = 5.0
        bar.reset(task, completed=175)  # a loop resumed at its step-175 checkpoint
        clock.now = 25.0
        bar.update(task, completed=177)  # 2 steps in 20 s, 123 to go
    assert stream.getvalue().splitlines()[0] == "reward: 177/300 (59%)  elapsed 0:00:20, about 0:20:30 left"


def test_step_progress_of_a_resumed_loop_counts_only_its_own_steps(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import time

    from reclm.progress import step_progress

    monkeypatch.setenv("RECLM_PROGRESS_SECONDS", "0")
    with step_progress("reward", 300) as update:
        update(176, "loss 0.5")  # the first step after the checkpoint of step 175
        time.sleep(0.25)
        update(177, "loss 0.4")
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("reward: 177/300 (59%)  loss 0.4  elapsed 0:00:00, about ")
    left = last.split("about ")[1].removesuffix(" left")
    hours, minutes, seconds = (int(x) for x in left.split(":"))
    assert hours * 3600 + minutes * 60 + seconds >= 10  # 2 steps in >= 0.25 s, 123 to go: >= 15 s (not 0)
