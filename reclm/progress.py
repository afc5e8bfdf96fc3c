"""Progress display: rich bars on a terminal, a plain line now and then in a log.

While a bar runs, rich draws nothing when stdout is not a terminal (``nohup``, a batch job, CI): a
two-hour SFT stage would stay silent until it ended. Off a terminal, :func:`progress` returns a
:class:`LogProgress` with the same calls, which prints one line per task at most every
``RECLM_PROGRESS_SECONDS`` seconds (default 60) and one when the task completes.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TextIO

from rich.console import Console
from rich.progress import Progress

DEFAULT_INTERVAL_SECONDS = 60.0


def progress(
    *columns: Any,
    disable: bool = False,
    transient: bool = False,
    console: Console | None = None,
    stream: TextIO | None = None,
    interval: float | None = None,
) -> Progress | LogProgress:
    """A rich ``Progress`` with ``columns`` on a terminal, else a :class:`LogProgress` writing to ``stream``."""
    console = console or Console()
    if console.is_terminal or console.is_jupyter:
        return Progress(*columns, disable=disable, transient=transient, console=console)
    return LogProgress(disable=disable, stream=stream, interval=interval)


@contextmanager
def step_progress(description: str, total: int, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """Progress of a training loop of ``total`` steps; yields ``update(step, info="")`` (steps done, a
    short status such as the last loss). A loop resumed from a checkpoint reports its first step as the
    saved one plus one: the bar starts there, so that its speed and time left count this process's steps
    only (not the saved ones, done in no time as far as this process knows)."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    columns = (TextColumn(description), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"))
    bar = progress(*columns, TimeRemainingColumn(), disable=not enabled)
    with bar:
        task = bar.add_task(description, total=total, info="")
        started = False

        def update(step: int, info: str = "") -> None:
            nonlocal started
            if not started and step > 1:
                bar.reset(task, total=total, completed=step - 1, info=info)
            started = True
            bar.update(task, completed=step, info=info)

        yield update


def log_interval() -> float:
    """Seconds between two lines of one task (``RECLM_PROGRESS_SECONDS``)."""
    raw = os.environ.get("RECLM_PROGRESS_SECONDS", "")
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_INTERVAL_SECONDS
    except ValueError:
        raise ValueError(f"RECLM_PROGRESS_SECONDS={raw!r}: expected a number of seconds") from None


@dataclass
class LogTask:
    description: str
    total: float | None
    completed: float
    fields: dict[str, Any]
    started: float
    printed_at: float
    start_completed: float  # where this process began (a resumed task's speed counts from here)
    finished: bool = False


class LogProgress:
    """The subset of ``rich.progress.Progress`` that reclm uses, as periodic plain lines."""

    def __init__(
        self,
        disable: bool = False,
        stream: TextIO | None = None,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.disable = disable
        self.stream = stream
        self.interval = log_interval() if interval is None else interval
        self.clock = clock
        self.tasks: dict[int, LogTask] = {}

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        for task_id, task in self.tasks.items():
            if not task.finished and task.completed > task.start_completed:
                self.emit(task_id)

    def add_task(self, description: str, total: float | None = 100.0, completed: float = 0, **fields: Any) -> int:
        now = self.clock()
        task_id = len(self.tasks)
        self.tasks[task_id] = LogTask(description, total, completed, dict(fields), now, now, completed)
        return task_id

    def update(
        self,
        task_id: int,
        *,
        total: float | None = None,
        completed: float | None = None,
        advance: float | None = None,
        description: str | None = None,
        **fields: Any,
    ) -> None:
        task = self.tasks[task_id]
        if total is not None:
            task.total = total
        if completed is not None:
            task.completed = completed
        if advance is not None:
            task.completed += advance
        if description is not None:
            task.description = description
        task.fields.update(fields)
        done = task.total is not None and task.completed >= task.total
        if done and not task.finished:
            task.finished = True
            self.emit(task_id)
        elif not done and self.clock() - task.printed_at >= self.interval:
            self.emit(task_id)

    def reset(self, task_id: int, *, total: float | None = None, completed: float = 0, **fields: Any) -> None:
        """Start the task again at ``completed`` (time and speed count from now), as ``Progress.reset``."""
        task = self.tasks[task_id]
        now = self.clock()
        task.total = task.total if total is None else total
        task.completed = task.start_completed = completed
        task.started = task.printed_at = now
        task.finished = False
        task.fields.update(fields)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def emit(self, task_id: int) -> None:
        task = self.tasks[task_id]
        task.printed_at = self.clock()
        if self.disable:
            return
        print(self.line(task), file=self.stream or sys.stdout, flush=True)

    def line(self, task: LogTask) -> str:
        """``description: 120/600 (20%)  loss 1.234  elapsed 0:05:02, about 0:20:08 left``."""
        elapsed = self.clock() - task.started
        count = f"{task.completed:g}" if task.total is None else f"{task.completed:g}/{task.total:g}"
        if task.total:
            count += f" ({100 * task.completed / task.total:.0f}%)"
        parts = [f"{task.description}: {count}"]
        parts += [str(v) for v in task.fields.values() if str(v).strip()]
        timing = f"elapsed {clock_text(elapsed)}"
        done_here = task.completed - task.start_completed
        if task.total and done_here > 0 and task.completed < task.total:
            left = elapsed / done_here * (task.total - task.completed)
            timing += f", about {clock_text(left)} left"
        parts.append(timing)
        return "  ".join(parts)


def clock_text(seconds: float) -> str:
    """``H:MM:SS``."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
