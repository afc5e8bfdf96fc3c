"""Leakage audit: no validation or test pair (user, item) may appear in any prompt of any stage.

Every JSON Lines file a stage writes under the run (teacher records, SFT data, collaborative dialogues,
reward pairs, RL prompts, item-side data, generation records) is read back and checked two ways:

- **by ids**: records that keep the ids used to build them (``items: {raw user: [raw items]}``,
  ``question: [raw user, raw item]``, ``users`` shown in an item prompt) must not name a held-out pair;
- **by text**: each user's part of a prompt (a plain user prompt is all the subject's; a dialogue is cut
  at its ``User <id> ...:`` headers, and its question goes to the user it asks about) must not contain the
  text of an item that user has only in validation or test. An item's text signature is the start of its
  title field as the prompt renders it. When the signature is shared with one of the user's train items
  the hit is counted as ``ambiguous``, not as a leak. Item prompts are checked for the profiles of users
  whose only interaction with the item is held out.

The result is ``RUN/audit.json``; ``reclm audit RUN`` exits with 1 when a leak is found.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from reclm.data.dataset import RecDataset
from reclm.data.split import Split
from reclm.llm import collab
from reclm.llm.prompts import domain_for, title_field
from reclm.rundir import RunDir

STAGE_FOLDERS = ("teacher", "sft", "collab", "reward", "rl", "item_sft", "profiles", "ablation")
SIGNATURE_WORDS = 6
MAX_EXAMPLES = 20
PROFILE_IN_ITEM_PROMPT = re.compile(r"Profiles of users who [^:]*: (.*?)\.(?: Related | Please provide)", re.S)
PROFILE_LINES_IN_ITEM_PROMPT = re.compile(r"Profiles of users who [^:\n]*:((?:\n- [^\n]*)+)")  # compact style
BRACKETED = re.compile(r"\[([^\[\]]*)\]")


@dataclass
class FileAudit:
    records: int = 0
    id_pairs: int = 0
    text_segments: int = 0
    leaks: int = 0
    ambiguous: int = 0


@dataclass
class AuditReport:
    files: dict[str, FileAudit] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    @property
    def leaks(self) -> int:
        return sum(f.leaks for f in self.files.values())

    @property
    def ok(self) -> bool:
        return self.leaks == 0

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "leaks": self.leaks,
            "files": {k: asdict(v) for k, v in self.files.items()},
            "examples": self.examples,
        }


# ---------------------------------------------------------------- what is held out


class HeldOut:
    """Per user, the items met only in validation or test (a pair also in train is not held out)."""

    def __init__(self, data: RecDataset, split: Split):
        self.data = data
        self.user_index = data.user_index()
        self.item_index = data.item_index()
        self.train: dict[int, set[int]] = defaultdict(set)
        for u, i in split.train.tolist():
            self.train[u].add(i)
        self.held: dict[int, set[int]] = defaultdict(set)
        self.by_item: dict[int, set[int]] = defaultdict(set)
        for pairs in (split.valid, split.cold_valid, split.test):
            for u, i in pairs.tolist():
                if i not in self.train[u]:
                    self.held[u].add(i)
                    self.by_item[i].add(u)
        self.signatures = item_signatures(data)

    def is_held(self, raw_user: str, raw_item: str) -> bool:
        u, i = self.user_index.get(str(raw_user)), self.item_index.get(str(raw_item))
        return u is not None and i is not None and i in self.held[u]

    def text_hits(self, raw_user: str, text: str) -> tuple[list[int], list[int]]:
        """(leaked, ambiguous) held-out items of ``raw_user`` whose signature occurs in ``text``."""
        u = self.user_index.get(str(raw_user))
        if u is None or not self.held[u]:
            return [], []
        train_signatures = {s for i in self.train[u] for s in self.signatures[i]}
        leaked, ambiguous = [], []
        text = f"\n{text}\n"  # a compact line may open or close the text
        for i in sorted(self.held[u]):
            found = [s for s in self.signatures[i] if s and s in text]
            if found:
                (ambiguous if any(s in train_signatures for s in found) else leaked).append(i)
        return leaked, ambiguous


def item_signatures(data: RecDataset) -> list[tuple[str, ...]]:
    """Per item, the strings that show it in a prompt: ``'title': '<first words>`` in each quoting that
    :func:`reclm.llm.prompts.render_value` may use, ended by the closing quote when the title is that short,
    else by the space before the next word (so "Heat" never matches "Heathers"); empty without text.
    The compact style shows an item on its own line (``- Heat (1995; ...)``) or after ``: `` in a question."""
    fields = domain_for(data).item_fields(data)
    if not fields:
        return [()] * data.n_items
    field_name, key = title_field(fields)
    out = []
    for value in data.item_fields[field_name]:
        words = str(value).split()
        if not words:
            out.append(())
            continue
        head = " ".join(words[:SIGNATURE_WORDS])
        whole = len(words) <= SIGNATURE_WORDS
        variants = []
        for quote, text in (("'", head), ('"', head), ("'", head.replace("\\", "\\\\").replace("'", "\\'"))):
            variants.append(f"'{key}': {quote}{text}" + (quote if whole else " "))
        for cut in range(1, min(SIGNATURE_WORDS, len(words))):  # a title cut to fewer words (small max_words)
            short = " ".join(words[:cut]) + " ..."
            variants += [f"'{key}': '{short}'", f"'{key}': \"{short}\""]
        if whole and re.fullmatch(r"-?\d+", head):  # numbers are rendered bare
            variants.append(f"'{key}': {head},")
        for lead in ("\n- ", ": "):  # compact style
            variants += [f"{lead}{head} (", f"{lead}{head}\n"] if whole else [f"{lead}{head} "]
            variants += [f"{lead}{' '.join(words[:cut])} ... (" for cut in range(1, min(SIGNATURE_WORDS, len(words)))]
        out.append(tuple(dict.fromkeys(variants)))
    return out


# ---------------------------------------------------------------- reading records


def run_files(run: RunDir) -> Iterator[Path]:
    for name in STAGE_FOLDERS:
        folder = run.stage(name)
        if folder.is_dir():
            yield from sorted(folder.rglob("*.jsonl"))


def iter_json_lines(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a crash
            if isinstance(record, dict):
                yield record


def user_texts(record: dict) -> dict[str, str]:
    """``{raw user id: text}`` of a record's user-side prompt parts."""
    messages = record.get("messages")
    if isinstance(messages, list):
        text = "\n".join(str(m.get("content", "")) for m in messages if isinstance(m, dict) and m.get("role") == "user")
        if collab.HEADER_PATTERN.search(text) or collab.QUESTION_PATTERN.search(text):
            return collab.segments(text)
        return {str(record["id"]): text} if "id" in record and record.get("kind", "user") == "user" else {}
    prompt = record.get("prompt")
    if isinstance(prompt, str) and record.get("kind", "user") == "user" and "id" in record:
        return {str(record["id"]): prompt}
    return {}


def id_pairs(record: dict) -> Iterable[tuple[str, str]]:
    """The (raw user, raw item) pairs a record says it put in its prompt."""
    items = record.get("items")
    if isinstance(items, dict):
        for user, listed in items.items():
            for item in listed or ():
                yield str(user), str(item)
    question = record.get("question")
    if isinstance(question, list) and len(question) == 2:
        yield str(question[0]), str(question[1])
    if record.get("kind") == "item" and isinstance(record.get("users"), list):
        for user in record["users"]:
            yield str(user), str(record["id"])


# ---------------------------------------------------------------- the audit


class ProfileOwners:
    """Which users a profile text belongs to (from every user-profile file of the run)."""

    def __init__(self, paths: Iterable[Path]):
        self.owners: dict[str, set[str]] = defaultdict(set)
        for path in paths:
            for record in iter_json_lines(path):
                if record.get("kind") == "user" and isinstance(record.get("profile"), str):
                    self.owners[normalise(record["profile"])].add(str(record.get("id")))

    def in_item_prompt(self, prompt: str) -> list[set[str]]:
        """For each user profile shown in an item prompt, the users it may belong to."""
        match = PROFILE_IN_ITEM_PROMPT.search(prompt)
        if match:
            shown = [normalise(text) for text in BRACKETED.findall(match.group(1))]
        elif match := PROFILE_LINES_IN_ITEM_PROMPT.search(prompt):
            shown = [normalise(line[2:]) for line in match.group(1).strip("\n").split("\n")]
        else:
            return []
        return [self.owners[text] for text in shown if text in self.owners]


def normalise(profile: str) -> str:
    return " ".join(profile.split()).strip("[] ")


def audit_record(record: dict, held: HeldOut, owners: ProfileOwners, stats: FileAudit, examples: list[str], where: str):
    stats.records += 1
    for user, item in id_pairs(record):
        stats.id_pairs += 1
        if held.is_held(user, item):
            stats.leaks += 1
            if len(examples) < MAX_EXAMPLES:
                examples.append(f"{where}: record names held-out pair (user {user}, item {item})")
    for user, text in user_texts(record).items():
        stats.text_segments += 1
        leaked, ambiguous = held.text_hits(user, text)
        stats.leaks += len(leaked)
        stats.ambiguous += len(ambiguous)
        for item in leaked[: max(0, MAX_EXAMPLES - len(examples))]:
            examples.append(f"{where}: text of held-out item {held.data.item_ids[item]} shown for user {user}")
    if record.get("kind") == "item" and isinstance(record.get("prompt"), str):
        item = held.item_index.get(str(record.get("id")))
        held_users = {held.data.user_ids[u] for u in held.by_item.get(item, ())} if item is not None else set()
        for owners_of_text in owners.in_item_prompt(record["prompt"]) if held_users else ():
            stats.text_segments += 1
            if owners_of_text <= held_users:  # only users whose pair with the item is held out wrote this
                stats.leaks += 1
                if len(examples) < MAX_EXAMPLES:
                    examples.append(
                        f"{where}: item {record['id']} prompt shows the profile of user(s) "
                        f"{sorted(owners_of_text)}, whose pair with it is held out"
                    )
            elif owners_of_text & held_users:
                stats.ambiguous += 1


def audit_files(data: RecDataset, split: Split, paths: Iterable[Path], root: Path | None = None) -> AuditReport:
    paths = list(paths)
    held = HeldOut(data, split)
    owners = ProfileOwners(paths)
    report = AuditReport()
    for path in paths:
        name = str(path.relative_to(root)) if root and path.is_relative_to(root) else str(path)
        stats = report.files.setdefault(name, FileAudit())
        for number, record in enumerate(iter_json_lines(path), start=1):
            audit_record(record, held, owners, stats, report.examples, f"{name}:{number}")
    return report


def audit_run(run: RunDir, data: RecDataset | None = None, split: Split | None = None) -> AuditReport:
    """Audit every stage file of ``run``; writes ``RUN/audit.json``."""
    if data is None or split is None:
        data, split = run.load()
    report = audit_files(data, split, run_files(run), run.root)
    (run.root / "audit.json").write_text(json.dumps(report.to_dict(), indent=2))
    return report
