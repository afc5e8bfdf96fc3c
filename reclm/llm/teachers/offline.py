"""The ``offline`` teacher: a RULE-BASED stand-in for an LLM teacher, not a language model.

It exists so that the whole method runs on a fresh machine with no teacher file and no endpoint
(e.g. ml-100k). Its profiles are facts read off the dataset: user profiles from TRAIN interactions only,
item profiles from the item's own fields only:

- user identity: the user's features when the dataset has them (age band, gender, occupation,
  or any other categorical user field), else the user's dominant item category ("Comedy fan") and
  activity level ("Avid movies watcher");
- user interests: the top item categories (genres, news categories...) of the user's train items,
  plus their dominant era ("1990s movies") when items carry a year; 1-3 entries each;
- item profile: from the item's own categories and era, the same way for every item: a new (zero-shot)
  item has no users, so a trained item's target must not summarise its users either, or the item writer
  would learn targets of a kind it can never produce for new items.

"Top": the most frequent label first, then labels ranked by ``count * sqrt(lift)`` (lift = the label's
share in this user's items over its share overall), so the dominant category always shows and the
remaining slots go to what sets the user apart rather than to what everyone watches. Ties break
alphabetically: the output is deterministic.
Format: ``User identity: A, B, C; User interests: X, Y, Z.`` A student distilled on these learns to
summarise history and features, nothing more: use a real teacher (file or openai) for the paper's setting.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from reclm.data.dataset import RecDataset
from reclm.data.split import Split
from reclm.llm.prompts import Domain, domain_for, format_profile, item_prompts, user_histories
from reclm.llm.prompts import user_prompts as build_user_prompts
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

MAX_ENTRIES = 3  # per part of a user profile (the paper: three)
ITEM_ENTRIES = 5  # per part of an item profile (the paper: five)
YEAR_FIELDS = ("year", "release_year", "release_date", "date")
TEXT_FIELDS = ("title", "abstract", "description", "name", "text", "summary", "url")
SKIP_LABELS = {"", "unknown", "none", "other", "n/a", "nan", "null"}
AGE_BANDS = ((18, "Under 18"), (25, "Age 18-24"), (35, "Age 25-34"), (45, "Age 35-44"), (56, "Age 45-55"))
GENDERS = {"m": "Male", "f": "Female", "male": "Male", "female": "Female"}


# ---------------------------------------------------------------- item attributes


def tidy(label: str) -> str:
    label = " ".join(str(label).replace("_", " ").split())
    return label[:1].upper() + label[1:]


def split_values(value: str) -> list[str]:
    return [v.strip() for v in re.split(r"[,|]", str(value)) if v.strip()]


def year_of(value: str) -> int | None:
    match = re.search(r"\b(1[89]\d\d|20\d\d)\b", str(value))
    return int(match.group(1)) if match else None


def category_fields(data: RecDataset) -> list[str]:
    """Item fields that hold categories: few distinct values, not a year, not free text."""
    out = []
    for name, values in data.item_fields.items():
        if name.lower() in YEAR_FIELDS or name.lower() in TEXT_FIELDS:
            continue
        labels = {v for value in values for v in split_values(value)}
        if labels and len(labels) <= max(50, data.n_items // 20):
            out.append(name)
    return out


def year_field(data: RecDataset) -> str | None:
    for name in data.item_fields:
        if name.lower() in YEAR_FIELDS:
            return name
    return None


class ItemAttributes:
    """Per item: its category labels and its era (decade), read from the item fields."""

    def __init__(self, data: RecDataset):
        self.domain: Domain = domain_for(data)
        fields = category_fields(data)
        self.categories: list[list[str]] = [self.item_labels(data, fields, i) for i in range(data.n_items)]
        year = year_field(data)
        self.eras: list[str | None] = [None] * data.n_items
        if year is not None:
            for i, value in enumerate(data.item_fields[year]):
                y = year_of(value)
                self.eras[i] = f"{y // 10 * 10}s {self.domain.items}" if y else None

    @staticmethod
    def item_labels(data: RecDataset, fields: list[str], item: int) -> list[str]:
        values = (v for f in fields for v in split_values(data.item_fields[f][item]))
        return list(dict.fromkeys(tidy(v) for v in values if v.lower() not in SKIP_LABELS))

    def labels(self, item: int) -> list[str]:
        return self.categories[item]


# ---------------------------------------------------------------- ranking


def top_labels(counts: Counter, total: int, overall: Counter, overall_total: int, k: int) -> list[str]:
    """The most frequent label first, then the labels with the highest ``count * sqrt(lift)``
    (lift = share here / share overall); ties alphabetical. ``k`` labels at most."""

    def score(label: str) -> float:
        share = counts[label] / max(1, total)
        base = overall[label] / max(1, overall_total) or share
        return counts[label] * math.sqrt(share / base) if base else 0.0

    present = [label for label in counts if counts[label] > 0]
    if not present or k <= 0:
        return []
    first = min(present, key=lambda label: (-counts[label], -score(label), label))
    rest = sorted((label for label in present if label != first), key=lambda label: (-score(label), label))
    return [first, *rest][:k]


def age_band(value: str) -> str | None:
    try:
        age = float(value)
    except ValueError:
        return None
    for limit, band in AGE_BANDS:
        if age < limit:
            return band
    return "Age 56+"


def feature_identity(data: RecDataset, user: int) -> list[tuple[str, str]]:
    """Identity entries ``(group, label)`` from user features: age band, gender, then other
    categorical fields (occupation, country...)."""
    if not data.user_fields:
        return []
    out = []
    for name, values in data.user_fields.items():
        value = str(values[user]).strip()
        if value.lower() in SKIP_LABELS:
            continue
        if name.lower() == "age":
            band = age_band(value)
            if band:
                out.append((name, band))
        elif name.lower() in ("gender", "sex"):
            out.append((name, GENDERS.get(value.lower(), tidy(value))))
        elif len(set(values)) <= 100:  # categorical, not a free-text field
            out.append((name, tidy(value)))
    return out[:MAX_ENTRIES]


def activity_level(n: int, quartiles: tuple[float, float]) -> str:
    if n <= quartiles[0]:
        return "Occasional"
    return "Avid" if n > quartiles[1] else "Regular"


# ---------------------------------------------------------------- profiles


class OfflineProfiles:
    """Computes every offline profile of a (data, split); pure, deterministic."""

    def __init__(self, data: RecDataset, split: Split):
        self.data = data
        self.split = split
        self.attributes = ItemAttributes(data)
        self.histories = user_histories(data, split)
        self.overall = Counter(label for items in self.histories for i in items for label in self.attributes.labels(i))
        self.overall_total = sum(self.overall.values())
        self.overall_eras = Counter(self.attributes.eras[i] for items in self.histories for i in items)
        self.overall_eras.pop(None, None)
        self.overall_eras_total = sum(self.overall_eras.values())
        lengths = [len(h) for h in self.histories if len(h)]
        self.quartiles = tuple(np.percentile(lengths, [25, 75])) if lengths else (0.0, 0.0)
        self.user_parts: dict[int, tuple[list[tuple[str, str]], list[str]]] = {}

    def user_interests(self, items: Sequence[int]) -> list[str]:
        """Top categories (2 when items have a year, else 3) then the most distinctive era."""
        counts = Counter(label for i in items for label in self.attributes.labels(i))
        eras = Counter(self.attributes.eras[i] for i in items if self.attributes.eras[i])
        n_categories = MAX_ENTRIES - 1 if eras else MAX_ENTRIES
        interests = top_labels(counts, sum(counts.values()), self.overall, self.overall_total, n_categories)
        if eras:
            slots = MAX_ENTRIES - len(interests)
            interests += top_labels(eras, sum(eras.values()), self.overall_eras, self.overall_eras_total, slots)
        return interests

    def user(self, u: int) -> tuple[list[tuple[str, str]], list[str]] | None:
        """``(identities as (group, label), interests)`` of user ``u``, or None without train history."""
        if u in self.user_parts:
            return self.user_parts[u]
        items = self.histories[u]
        if len(items) == 0:
            return None
        interests = self.user_interests(items)
        identity = feature_identity(self.data, u)
        if not identity:
            domain = self.attributes.domain
            if interests and not interests[0].endswith(domain.items):
                identity.append(("fan", f"{interests[0]} fan"))
            level = activity_level(len(items), self.quartiles)
            identity.append(("activity", f"{level} {domain.items} {verb_noun(domain)}"))
        if not interests:  # items with neither categories nor years
            interests = [self.attributes.domain.items.capitalize()]
        self.user_parts[u] = (identity[:MAX_ENTRIES], interests[:MAX_ENTRIES])
        return self.user_parts[u]

    def user_profile(self, u: int) -> str | None:
        parts = self.user(u)
        return None if parts is None else format_profile([label for _, label in parts[0]], parts[1])

    def item(self, i: int) -> tuple[list[str], list[str]]:
        """Identities (``<category> fan``, up to 3) and interests (categories, then the era; up to 5) of item
        ``i``, from its own fields only: blind to who interacted with it, so trained and new items alike."""
        labels = self.attributes.labels(i)
        era = self.attributes.eras[i]
        domain = self.attributes.domain
        identities = [f"{label} fan" for label in labels[:MAX_ENTRIES]] or [
            f"{domain.items.capitalize()} {verb_noun(domain)}"
        ]
        interests = labels[: ITEM_ENTRIES - 1 if era else ITEM_ENTRIES] + ([era] if era else [])
        return identities, interests or [domain.items.capitalize()]


def verb_noun(domain: Domain) -> str:
    """``watched`` -> watcher, ``clicked on`` -> reader for news, generic -> user."""
    if domain.verb.startswith("watch"):
        return "watcher"
    if "news" in domain.items:
        return "reader"
    return "user"


class OfflineTeacher(Teacher):
    """Rule-based profiles from the dataset's own attributes (see the module docstring)."""

    kind = "offline"

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
        profiles = OfflineProfiles(data, split)
        user_text = {u: text for u in range(data.n_users) if (text := profiles.user_profile(u))}
        report.notes.append("offline teacher: rule-based profiles from dataset attributes (train pairs), not an LLM")
        if "user" in sides:
            with_history = [u for u in range(data.n_users) if len(profiles.histories[u])]
            report.skip("users with an empty train history", data.n_users - len(with_history))
            chosen = sample_ids(restrict(with_history, users), self.max_users, self.seed)
            prompts = build_user_prompts(data, split, chosen, self.budget)
            records = []
            with progress_bar(len(prompts), "teacher users (offline)", self.progress) as advance:
                for u, prompt in prompts.items():
                    extra = {"teacher": self.kind}
                    records.append(ProfileRecord("user", data.user_ids[u], prompt, user_text[u], extra))
                    advance()
            report.written["user"] = write_records(folder / OUTPUT_FILES["user"], records)
        if "item" in sides:
            chosen = sample_ids(restrict(range(data.n_items), items), self.max_items, self.seed)
            # no user profiles in the prompt either: the target does not read them
            prompts = item_prompts(data, split, chosen, neighbours=load_item_neighbours(data), budget=self.budget)
            records = []
            with progress_bar(len(prompts), "teacher items (offline)", self.progress) as advance:
                for i, prompt in prompts.items():
                    text = format_profile(*profiles.item(i))
                    records.append(ProfileRecord("item", data.item_ids[i], prompt, text, {"teacher": self.kind}))
                    advance()
            report.written["item"] = write_records(folder / OUTPUT_FILES["item"], records)
            report.extra["items_from_own_fields"] = len(records)
