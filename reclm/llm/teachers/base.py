"""What every teacher shares: the output files, the report, sampling, neighbour lists, progress bars.

A teacher turns our prompts (built from the run's split, train pairs only) into target profiles and
writes ``RUN/teacher/users.jsonl`` and ``items.jsonl`` (:mod:`reclm.llm.records`). ``teacher/teacher.json``
names the teacher that owns the folder, so a resumed run never mixes two teachers' profiles.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from reclm.data.dataset import RecDataset
from reclm.data.split import Split
from reclm.data.tables import read_jsonl
from reclm.llm.prompts import PromptBudget
from reclm.rundir import RunDir
from reclm.utils import write_json

SIDES = ("user", "item")
OUTPUT_FILES = {"user": "users.jsonl", "item": "items.jsonl"}


@dataclass
class TeacherReport:
    """What a teacher run did. ``written`` counts records added by this run, ``resumed`` those found
    from an earlier run, ``skipped`` ids left out with the reason."""

    kind: str
    written: dict[str, int] = field(default_factory=lambda: {"user": 0, "item": 0})
    resumed: dict[str, int] = field(default_factory=lambda: {"user": 0, "item": 0})
    skipped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    seconds: float = 0.0

    def skip(self, reason: str, count: int) -> None:
        if count:
            self.skipped[reason] = self.skipped.get(reason, 0) + int(count)

    def to_dict(self) -> dict:
        """report.json's content: no wall-clock time (the manifest has it), so a rerun that writes the same
        profiles writes the same bytes and the stages after it stay cached."""
        return {k: v for k, v in asdict(self).items() if k != "seconds"}


def sample_ids(candidates: Sequence[int] | np.ndarray, n: int | None, seed: int) -> list[int]:
    """A seeded sample of ``n`` ids (sorted), or all of them. The sample is a prefix of one seeded
    permutation, so a larger ``n`` with the same seed extends the earlier sample (resume-friendly)."""
    ids = sorted(int(c) for c in candidates)
    if n is None or n >= len(ids):
        return ids
    if n < 0:
        raise ValueError(f"sample size {n}: expected a non-negative number")
    order = np.random.default_rng(seed).permutation(len(ids))
    return sorted(ids[k] for k in order[:n])


def restrict(candidates: Sequence[int], wanted: Sequence[int] | None) -> list[int]:
    """``candidates`` kept in order, limited to ``wanted`` when given."""
    if wanted is None:
        return list(candidates)
    keep = {int(w) for w in wanted}
    return [c for c in candidates if c in keep]


def load_item_neighbours(data: RecDataset) -> dict[int, list[int]]:
    """``{item index: [neighbour item indices]}`` from the dataset's ``item_neighbours`` resource (the
    paper's related items), or ``{}``. Neighbours unknown to the dataset are dropped."""
    path = data.resources.get("item_neighbours")
    if path is None:
        return {}
    index = data.item_index()
    out: dict[int, list[int]] = {}
    for record in read_jsonl(Path(path), ["item", "neighbours"]):
        item = index.get(str(record["item"]))
        if item is not None:
            out[item] = [index[str(n)] for n in record["neighbours"] if str(n) in index]
    return out


@contextmanager
def progress_bar(total: int, description: str, enabled: bool = True) -> Iterator:
    """A rich progress bar; yields ``advance(n=1)``."""
    if not enabled or total <= 0:
        yield lambda n=1: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from reclm.progress import progress as make_progress

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with make_progress(*columns) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)


class Teacher:
    """Base class. Subclasses implement :meth:`write` (append the records they add, fill the report).

    ``max_users`` / ``max_items`` sample that many ids (seeded by ``seed``) among those the teacher can
    profile; ``budget`` sets prompt lengths; ``fresh`` clears earlier teacher files first.
    """

    kind = "base"

    def __init__(
        self,
        budget: PromptBudget | None = None,
        max_users: int | None = None,
        max_items: int | None = None,
        seed: int = 0,
        fresh: bool = False,
        progress: bool = True,
    ):
        self.budget = budget or PromptBudget()
        self.max_users = max_users
        self.max_items = max_items
        self.seed = seed
        self.fresh = fresh
        self.progress = progress

    # ------------------------------------------------------------ options recorded with the output
    def options(self) -> dict:
        return {
            "budget": asdict(self.budget),
            "max_users": self.max_users,
            "max_items": self.max_items,
            "seed": self.seed,
        }

    def run(
        self,
        data: RecDataset,
        split: Split,
        run_dir: str | Path | RunDir,
        users: Sequence[int] | None = None,
        items: Sequence[int] | None = None,
        sides: Sequence[str] = SIDES,
    ) -> TeacherReport:
        """Write teacher profiles for ``sides`` into ``run_dir/teacher``; ``users`` / ``items`` (indices)
        limit which ids are considered. Returns the report (also saved as ``teacher/report.json``)."""
        bad = [s for s in sides if s not in SIDES]
        if bad:
            raise ValueError(f"sides {bad}: expected 'user' and/or 'item'")
        run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        folder = run.teacher
        self.claim(folder)
        report = TeacherReport(kind=self.kind)
        start = time.perf_counter()
        self.write(data, split, folder, users, items, list(sides), report)
        report.seconds = round(time.perf_counter() - start, 3)
        write_json(folder / "report.json", report.to_dict())
        return report

    def claim(self, folder: Path) -> None:
        """Make ``folder`` this teacher's: refuse another teacher's files unless ``fresh``."""
        marker = folder / "teacher.json"
        if self.fresh:
            for name in (*OUTPUT_FILES.values(), "ledger.json", "report.json", "teacher.json"):
                (folder / name).unlink(missing_ok=True)
        if marker.is_file():
            owner = json.loads(marker.read_text()).get("kind")
            if owner != self.kind:
                raise ValueError(
                    f"{folder} holds profiles from the {owner!r} teacher; pass --fresh to replace them "
                    f"with the {self.kind!r} teacher's"
                )
        elif any((folder / name).is_file() for name in OUTPUT_FILES.values()):
            raise ValueError(f"{folder} holds profiles from an unknown teacher; pass --fresh to replace them")
        write_json(marker, {"kind": self.kind, "options": self.options()})

    def write(
        self,
        data: RecDataset,
        split: Split,
        folder: Path,
        users: Sequence[int] | None,
        items: Sequence[int] | None,
        sides: list[str],
        report: TeacherReport,
    ) -> None:
        raise NotImplementedError
