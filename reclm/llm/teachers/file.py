"""The ``file`` teacher: profiles already on disk, such as the paper's GPT-3.5 profiles shipped with
MIND and Netflix (``data.resources["teacher_user_profiles"]`` / ``["teacher_item_profiles"]``, or any
JSONL of ``{user|item, profile[, prompt]}``).

Each record's ``prompt`` is OUR prompt, rebuilt from the run's split (train pairs only) with
:mod:`reclm.llm.prompts`, so SFT trains on the format used at generation time; the shipped prompt is
kept as ``source_prompt``.

Leakage, stated plainly: the shipped profiles were written by the paper from its own train data. On
MIND that is the whole train snapshot, which includes the pairs our split moves into validation (a
small leak into validation; none into test, which is the later snapshot). Netflix's profiles come
from an earlier snapshot that is not released. The report measures, from the item titles named in
the shipped user prompts, how many of those items are in the user's train, validation or test pairs
of our split (``extra.source_items``). Items our split holds out as zero-shot are never written,
and their shipped profiles are never shown in a prompt (they would come from test interactions).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from reclm.data.dataset import RecDataset
from reclm.data.errors import DataError
from reclm.data.split import Split
from reclm.data.tables import read_jsonl
from reclm.llm.prompts import format_profile, item_prompts, parse_profile, user_prompts
from reclm.llm.records import ProfileRecord, write_records
from reclm.llm.teachers.base import (
    OUTPUT_FILES,
    Teacher,
    TeacherReport,
    load_item_neighbours,
    progress_bar,
    restrict,
    sample_ids,
)

TITLE_PATTERN = re.compile(r"""(?:'year':\s*(\d+),\s*)?'title':\s*('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""")
PROFILE_IN_PROMPT = re.compile(r"User identity:(.*?);\s*User interests:(.*?)(?=\]|\[|$)", re.S)
MIN_SPLIT_OVERLAP = 0.5  # below this share of shipped items in our train pairs, prompts come from the source


def read_shipped(path: Path, key: str, index: dict[str, int]) -> tuple[dict[int, dict], int]:
    """``{index: record}`` of a shipped profile file (``key`` is ``user`` or ``item``) and how many of
    its ids the dataset does not know."""
    out: dict[int, dict] = {}
    unknown = 0
    for record in read_jsonl(path, [key, "profile"]):
        if not isinstance(record["profile"], str):
            kind = type(record["profile"]).__name__
            raise DataError(f"'profile' is {kind}; expected a string", path, record["_line"])
        i = index.get(str(record[key]))
        if i is None:
            unknown += 1
        else:
            out[i] = record
    return out, unknown


def source_titles(prompt: str) -> list[tuple[str, str | None]]:
    """``(title, year or None)`` of the items named in a shipped user prompt, in order."""
    titles = []
    for year, literal in TITLE_PATTERN.findall(prompt):
        try:
            titles.append((" ".join(str(ast.literal_eval(literal)).split()), year or None))
        except (ValueError, SyntaxError):
            continue
    return titles


class TitleIndex:
    """Item indices by title (and year, to tell remakes apart)."""

    def __init__(self, data: RecDataset):
        self.by_title: dict[str, list[int]] = {}
        titles = data.item_fields.get("title", [""] * data.n_items)
        self.years = data.item_fields.get("year", [""] * data.n_items)
        for i, title in enumerate(titles):
            self.by_title.setdefault(" ".join(str(title).split()), []).append(i)

    def candidates(self, title: str, year: str | None = None) -> list[int]:
        ids = self.by_title.get(title, [])
        if year is not None and len(ids) > 1:
            same = [i for i in ids if str(self.years[i]) == year]
            return same or ids
        return ids

    def items(self, prompt: str) -> list[int]:
        """The items a shipped prompt names (first candidate of each title; unknown titles dropped)."""
        out = []
        for title, year in source_titles(prompt):
            ids = self.candidates(title, year)
            if ids and ids[0] not in out:
                out.append(ids[0])
        return out


def source_user_profiles(prompt: str) -> list[str]:
    """The user profiles listed in a shipped item prompt, normalised to our format."""
    start = prompt.find("interacted with this item")
    body = prompt[start:] if start >= 0 else prompt
    body = body.split("Please provide")[0]
    out = []
    for identity, interests in PROFILE_IN_PROMPT.findall(body):
        parsed = parse_profile(f"User identity: {identity}; User interests: {interests}")
        if parsed:
            out.append(format_profile(*parsed))
    return out


def source_item_overlap(data: RecDataset, split: Split, shipped: dict[int, dict]) -> dict[str, int]:
    """Where the items named in shipped user prompts sit in our split, per named item: in the user's
    ``train``, ``valid`` or ``test`` pairs, ``elsewhere`` (a known title, not among the user's pairs)
    or ``unmatched`` (no item with that title)."""
    if "title" not in data.item_fields or not shipped:
        return {}
    index = TitleIndex(data)
    users = np.fromiter(shipped, dtype=np.int64)
    parts = {}
    for name, pairs in (("train", split.train), ("valid", split.valid), ("test", split.test)):
        rows = pairs[np.isin(pairs[:, 0], users)]
        parts[name] = set(zip(rows[:, 0].tolist(), rows[:, 1].tolist()))
    counts = {"train": 0, "valid": 0, "test": 0, "elsewhere": 0, "unmatched": 0}
    for u, record in shipped.items():
        for title, year in source_titles(str(record.get("prompt", ""))):
            ids = index.candidates(title, year)
            if not ids:
                counts["unmatched"] += 1
                continue
            where = next((n for n in ("train", "valid", "test") if any((u, i) in parts[n] for i in ids)), "elsewhere")
            counts[where] += 1
    return counts


def train_share(overlap: dict[str, int]) -> float | None:
    total = sum(overlap.values())
    return overlap["train"] / total if total else None


class FileTeacher(Teacher):
    """Profiles from files: by default the dataset's shipped teacher files.

    ``prompt_from`` says what our prompts are built from:
    ``split``: the run's split (the user's train history; an item's train users' shipped profiles and
    its neighbours), the same inputs generation has;
    ``source``: the content of the shipped prompt, re-rendered in our format (the items it names,
    matched by title; the user profiles it lists), for when the shipped ids do not describe the same
    people in this dataset (Netflix: the shipped histories come from an unreleased snapshot);
    ``auto``: ``split`` when at least half the items named in the shipped user prompts are in those
    users' train pairs, else ``source`` (the choice and the measured overlap go in the report).
    """

    kind = "file"

    def __init__(
        self,
        user_file: str | Path | None = None,
        item_file: str | Path | None = None,
        prompt_from: str = "auto",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if prompt_from not in ("auto", "split", "source"):
            raise ValueError(f"prompt_from {prompt_from!r}: expected auto, split or source")
        self.user_file = Path(user_file) if user_file else None
        self.item_file = Path(item_file) if item_file else None
        self.prompt_from = prompt_from

    def options(self) -> dict:
        return {
            **super().options(),
            "user_file": str(self.user_file or ""),
            "item_file": str(self.item_file or ""),
            "prompt_from": self.prompt_from,
        }

    def source(self, data: RecDataset, side: str) -> Path:
        given = self.user_file if side == "user" else self.item_file
        resource = f"teacher_{side}_profiles"
        path = given or data.resources.get(resource)
        if path is None:
            raise DataError(
                f"dataset {data.name!r} ships no {resource}.jsonl: give a profile file, or use the "
                "openai or offline teacher"
            )
        return Path(path)

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
        shipped_users, unknown = read_shipped(self.source(data, "user"), "user", data.user_index())
        report.skip("user ids not in the dataset", unknown)
        overlap = source_item_overlap(data, split, shipped_users)
        share = train_share(overlap) if overlap else None
        mode = self.prompt_from
        if mode == "auto":
            mode = "source" if share is not None and share < MIN_SPLIT_OVERLAP else "split"
        report.extra["source_items"] = overlap
        report.extra["prompt_from"] = mode
        if share is not None and share < MIN_SPLIT_OVERLAP:
            report.notes.append(
                f"only {share:.1%} of the items named in the shipped user prompts are in those users' train "
                "pairs here: the shipped user ids do not describe the same histories in this dataset"
                + ("; prompts were rebuilt from the shipped prompts' content" if mode == "source" else "")
            )
        if data.name.lower().startswith("mind"):
            report.notes.append(
                "MIND teacher profiles were written from the release's whole train snapshot, which includes "
                "this split's validation pairs (a small leak into validation, none into test)"
            )
        if "user" in sides:
            self.write_users(data, split, folder, shipped_users, users, mode, report)
        if "item" in sides:
            self.write_items(data, split, folder, shipped_users, items, mode, report)

    def write_users(
        self,
        data: RecDataset,
        split: Split,
        folder: Path,
        shipped: dict[int, dict],
        users: Sequence[int] | None,
        mode: str,
        report: TeacherReport,
    ) -> None:
        chosen = sample_ids(restrict(sorted(shipped), users), self.max_users, self.seed)
        if mode == "split":
            prompts = user_prompts(data, split, chosen, self.budget)
            report.skip("users with an empty train history", len(chosen) - len(prompts))
        else:
            titles = TitleIndex(data)
            named = {u: titles.items(str(shipped[u].get("prompt", ""))) for u in chosen}
            prompts = {u: self.budget.user_prompt(data, named[u], u) for u in chosen if named[u]}
            report.skip("users whose shipped prompt names no known item", len(chosen) - len(prompts))
        records = []
        with progress_bar(len(prompts), "teacher users (file)", self.progress) as advance:
            for u, prompt in prompts.items():
                source = shipped[u]
                extra = {"source_prompt": source.get("prompt", ""), "teacher": self.kind}
                records.append(ProfileRecord("user", data.user_ids[u], prompt, str(source["profile"]).strip(), extra))
                advance()
        report.written["user"] = write_records(folder / OUTPUT_FILES["user"], records)

    def write_items(
        self,
        data: RecDataset,
        split: Split,
        folder: Path,
        shipped_users: dict[int, dict],
        items: Sequence[int] | None,
        mode: str,
        report: TeacherReport,
    ) -> None:
        shipped, unknown = read_shipped(self.source(data, "item"), "item", data.item_index())
        report.skip("item ids not in the dataset", unknown)
        held_out = set(np.flatnonzero(split.held_out_mask).tolist())  # zero-shot and cold-validation items
        report.skip("held-out items (their profile would come from evaluation pairs)", len(set(shipped) & held_out))
        usable = {i: r for i, r in shipped.items() if i not in held_out}
        chosen = sample_ids(restrict(sorted(usable), items), self.max_items, self.seed)
        item_profiles = {i: str(r["profile"]).strip() for i, r in usable.items()}
        neighbours = load_item_neighbours(data)
        if mode == "split":
            prompts = item_prompts(
                data,
                split,
                chosen,
                user_profiles={u: str(r["profile"]).strip() for u, r in shipped_users.items()},
                item_profiles=item_profiles,
                neighbours=neighbours,
                budget=self.budget,
            )
        else:
            prompts = {}
            for i in chosen:
                near = [j for j in neighbours.get(i, []) if j != i]
                listed = source_user_profiles(str(usable[i].get("prompt", "")))
                prompts[i] = self.budget.item_prompt(data, i, near, [item_profiles.get(j) for j in near], listed)
        records = []
        with progress_bar(len(prompts), "teacher items (file)", self.progress) as advance:
            for i, prompt in prompts.items():
                source = usable[i]
                extra = {"source_prompt": source.get("prompt", ""), "teacher": self.kind}
                records.append(ProfileRecord("item", data.item_ids[i], prompt, str(source["profile"]).strip(), extra))
                advance()
        report.written["item"] = write_records(folder / OUTPUT_FILES["item"], records)
