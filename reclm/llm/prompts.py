"""The paper's profile prompts, for any dataset.

User side: the user's train history rendered as item text (``['cate': ..., 'title': ...]``, the
paper's rendering), the most recent ``max_items`` only, long fields cut to ``max_words`` words.
Item side: the item's text and related (neighbour) items with their profiles. The item writer's prompts
(:mod:`reclm.llm.item_side`) show nothing else, for trained and new items alike; a teacher's item prompt may
also show the profiles of users who interacted with the item in train (``max_profiles``).

The wording is the paper's (see ``../shared/datasets/*/teacher_*_profiles.jsonl``) with its
redundant sentences dropped, because CPU generation time grows with prompt length. Two styles:

- ``paper``: the paper's layout, items as ``['title': 'Heat', 'year': 1995]``;
- ``compact``: the same instruction first, then the data, one item per line as ``- Heat (1995; Action)``.
  About half the tokens, and the instruction becomes part of the prefix that every prompt shares, which
  the CTranslate2 backend computes once (``static_prompt``): CPU prefill is most of generation time. The domain words
("news articles" / "clicked on", "movies" / "watched") and the item fields come from a small
:class:`Domain` per dataset, with a generic default. The chat template is applied by the generation
backend, not here.

Teachers and generation must build prompts the same way (SFT trains on teacher prompts): both use
:func:`user_histories` + :class:`PromptBudget`, or :func:`user_prompts` / :func:`item_prompts`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from reclm.data.dataset import RecDataset
from reclm.data.split import Split

USER_SLOTS = 3  # the paper: "only the most likely three identities and interests"
ITEM_SLOTS = 5  # the paper's item profiles: 5 identities and 5 interests


def format_template(slots: int) -> str:
    identities = ", ".join(f"[Identity {k}]" for k in range(1, slots + 1))
    interests = ", ".join(f"[Interest {k}]" for k in range(1, slots + 1))
    return f"User identity: {identities}; User interests: {interests}."


def short_template(slots: int) -> str:
    """The format line of compact prompts: first and last slot only. Every prompt token also costs at
    each decoded token (ml-100k item prompts, CTranslate2 int8 on CPU: 1.3x the profiles/s)."""
    identities, interests = f"[Identity 1], ..., [Identity {slots}]", f"[Interest 1], ..., [Interest {slots}]"
    return f"User identity: {identities}; User interests: {interests}."


PROFILE_FORMAT = format_template(USER_SLOTS)
ITEM_PROFILE_FORMAT = format_template(ITEM_SLOTS)
COMPACT_ITEM_FORMAT = short_template(ITEM_SLOTS)


# ---------------------------------------------------------------- per-dataset words and fields


@dataclass(frozen=True)
class Domain:
    """How a dataset's items are named in prompts, and which item fields show (``(field, key)`` pairs,
    in order; empty means every field under its own name)."""

    items: str = "items"
    item: str = "item"
    verb: str = "interacted with"
    fields: tuple[tuple[str, str], ...] = ()

    def item_fields(self, data: RecDataset) -> list[tuple[str, str]]:
        if self.fields:
            present = [(f, k) for f, k in self.fields if f in data.item_fields]
            if present:
                return present
        return [(f, f) for f in data.item_fields]


MOVIES = Domain("movies", "movie", "watched")
DOMAINS: dict[str, Domain] = {
    "mind": Domain(
        "news articles",
        "news article",
        "clicked on",
        (("category", "cate"), ("subcategory", "sub_cate"), ("title", "title"), ("abstract", "abstract")),
    ),
    "netflix": Domain("movies", "movie", "watched", (("year", "year"), ("title", "title"))),
    "ml-100k": Domain("movies", "movie", "watched", (("title", "title"), ("year", "year"), ("genres", "genres"))),
    "ml-": MOVIES,
}
GENERIC = Domain()


def register_domain(name: str, domain: Domain) -> None:
    """Describe a dataset (matched on ``RecDataset.name``, exactly or as a prefix)."""
    DOMAINS[name.lower()] = domain


def domain_for(data: RecDataset) -> Domain:
    name = data.name.lower()
    if name in DOMAINS:
        return DOMAINS[name]
    prefixes = sorted((k for k in DOMAINS if name.startswith(k)), key=len, reverse=True)
    return DOMAINS[prefixes[0]] if prefixes else GENERIC


# ---------------------------------------------------------------- rendering


def cut_words(text: str, max_words: int | None) -> str:
    words = text.split()
    if max_words is None or len(words) <= max_words:
        return " ".join(words)
    return " ".join(words[:max_words]) + " ..."


def render_value(value: str, max_words: int | None) -> str:
    text = cut_words(str(value), max_words)
    return text if re.fullmatch(r"-?\d+", text) else repr(text)


STYLES = ("paper", "compact")


def check_style(style: str) -> str:
    if style not in STYLES:
        raise ValueError(f"prompt style {style!r}: expected one of {', '.join(STYLES)}")
    return style


def title_field(fields: Sequence[tuple[str, str]]) -> tuple[str, str]:
    """The field that names an item (title / name), else the first one."""
    return next(((f, k) for f, k in fields if f.lower() in ("title", "name")), fields[0])


def render_item(
    data: RecDataset, item: int, max_words: int | None = None, domain: Domain | None = None, style: str = "paper"
) -> str:
    """``['cate': 'sports', 'title': "Rickie Fowler's ..."]``: the paper's rendering; ``compact``: the title,
    then the other fields in parentheses (``Heat (1995; Action, Crime)``). Empty fields are left out."""
    domain = domain or domain_for(data)
    if check_style(style) == "compact":
        return render_item_compact(data, item, max_words, domain)
    parts = [
        f"'{key}': {render_value(data.item_fields[field][item], max_words)}"
        for field, key in domain.item_fields(data)
        if str(data.item_fields[field][item]).strip()
    ]
    return "[" + ", ".join(parts) + "]"


def render_item_compact(data: RecDataset, item: int, max_words: int | None, domain: Domain) -> str:
    fields = domain.item_fields(data)
    if not fields:
        return ""
    first = title_field(fields)
    values = [cut_words(str(data.item_fields[f][item]), max_words) for f, _ in fields if f != first[0]]
    rest = "; ".join(v for v in values if v)
    head = cut_words(str(data.item_fields[first[0]][item]), max_words)
    return f"{head} ({rest})" if head and rest else head or rest


def render_listing(
    data: RecDataset, items: Sequence[int], max_words: int | None, domain: Domain, style: str = "paper"
) -> str:
    """Items for a prompt: side by side (``paper``) or one per line after ``- `` (``compact``)."""
    rendered = [render_item(data, int(i), max_words, domain, style) for i in items]
    if style == "compact":
        return "".join(f"\n- {text}" for text in rendered)
    return " ".join(rendered)


def render_profile(profile: str) -> str:
    return "[" + " ".join(profile.split()).strip("[] ") + "]"


# ---------------------------------------------------------------- prompts

DEFAULT_MAX_ITEMS = 10
DEFAULT_MAX_WORDS = 30
DEFAULT_NEIGHBOUR_WORDS = 10
DEFAULT_MAX_NEIGHBOURS = 3


def user_prompt(
    data: RecDataset,
    history_items: Sequence[int] | np.ndarray,
    max_items: int | None = DEFAULT_MAX_ITEMS,
    max_words: int | None = DEFAULT_MAX_WORDS,
    user: int | None = None,
    style: str = "paper",
) -> str:
    """The user-profile instruction from a train history (oldest first): its last ``max_items`` items,
    fields cut to ``max_words`` words. With ``user`` given, the dataset's user features are shown too."""
    items = [int(i) for i in history_items]
    if not items:
        raise ValueError("a user prompt needs at least one history item")
    if max_items is not None:
        items = items[-max_items:]
    domain = domain_for(data)
    listing = render_listing(data, items, max_words, domain, check_style(style))
    features = data.user_feature_text(user) if user is not None else ""
    if style == "compact":
        about = f"\nThe user's features: {features}." if features else ""
        return (
            "Now you are a user profile generator. Generate the user's profile strictly in the following format: "
            f"{PROFILE_FORMAT}{about}\n"
            f"{domain.items.capitalize()} the user previously {domain.verb}:{listing}"
        )
    about = f"The user's features: {features}. " if features else ""
    return (
        "Now you are a user profile generator. "
        f"{about}Here is the list of {domain.items} the user previously {domain.verb}: {listing} "
        f"Based on this information, please generate the user's profile strictly in the following format: "
        f"{PROFILE_FORMAT} Provide only the most likely three identities and interests."
    )


def item_prompt(
    data: RecDataset,
    item: int,
    neighbour_items: Sequence[int] = (),
    neighbour_profiles: Sequence[str | None] = (),
    user_profiles: Sequence[str] = (),
    max_words: int | None = DEFAULT_MAX_WORDS,
    neighbour_words: int | None = DEFAULT_NEIGHBOUR_WORDS,
    style: str = "paper",
) -> str:
    """The item-profile instruction: the item's text, profiles of users who interacted with it in
    train (``user_profiles``), and related items with their profiles (``neighbour_profiles`` aligned
    with ``neighbour_items``; a missing profile shows the item alone). Neighbours' fields are cut
    shorter (``neighbour_words``): their profiles carry the signal, and item prompts grow fast."""
    if neighbour_profiles and len(neighbour_profiles) != len(neighbour_items):
        raise ValueError(
            f"{len(neighbour_profiles)} neighbour profiles for {len(neighbour_items)} neighbour items: expected aligned"
        )
    domain = domain_for(data)
    if check_style(style) == "compact":
        return item_prompt_compact(
            data, item, neighbour_items, neighbour_profiles, user_profiles, max_words, neighbour_words, domain
        )
    parts = [
        "Now you are a profile generator. "
        f"Based on the information below, please generate the profile of the users that this {domain.item} targets. "
        f"The {domain.item}: {render_item(data, item, max_words, domain)}."
    ]
    if user_profiles:
        listing = "".join(render_profile(p) for p in user_profiles)
        parts.append(f"Profiles of users who {domain.verb} it: {listing}.")
    if neighbour_items:
        profiles = list(neighbour_profiles) or [None] * len(neighbour_items)
        shown = []
        for other, profile in zip(neighbour_items, profiles):
            text = render_item(data, int(other), neighbour_words, domain)
            shown.append(f"{text} targets {render_profile(profile)}" if profile else text)
        parts.append(f"Related {domain.items}: " + "; ".join(shown) + ".")
    parts.append(
        f"Please provide the profile with {ITEM_SLOTS} identities and {ITEM_SLOTS} interests strictly in the "
        f"following format: {ITEM_PROFILE_FORMAT}"
    )
    return " ".join(parts)


def item_prompt_compact(
    data: RecDataset,
    item: int,
    neighbour_items: Sequence[int],
    neighbour_profiles: Sequence[str | None],
    user_profiles: Sequence[str],
    max_words: int | None,
    neighbour_words: int | None,
    domain: Domain,
) -> str:
    lines = [
        "Now you are a profile generator. Generate the profile of the users that the "
        f"{domain.item} below targets, strictly in the following format: {COMPACT_ITEM_FORMAT}",
        f"The {domain.item}: {render_item(data, item, max_words, domain, 'compact')}",
    ]
    if user_profiles:
        lines.append(f"Profiles of users who {domain.verb} it:")
        lines += [f"- {' '.join(p.split())}" for p in user_profiles]
    if neighbour_items:
        profiles = list(neighbour_profiles) or [None] * len(neighbour_items)
        lines.append(f"Related {domain.items}:")
        for other, profile in zip(neighbour_items, profiles):
            text = render_item(data, int(other), neighbour_words, domain, "compact")
            lines.append(f"- {text} targets {' '.join(profile.split())}" if profile else f"- {text}")
    return "\n".join(lines)


# ---------------------------------------------------------------- token budget


def count_tokens(tokenizer: object, text: str) -> int:
    """Tokens of ``text`` under a HF tokenizer (``encode``) or any ``str -> int`` callable."""
    encode = getattr(tokenizer, "encode", None)
    if encode is not None:
        try:
            return len(encode(text, add_special_tokens=False))
        except TypeError:
            return len(encode(text))
    return int(tokenizer(text))  # type: ignore[operator]


@dataclass
class PromptBudget:
    """Length limits for prompts: the most recent ``max_items`` history items, fields cut to
    ``max_words`` words; per item prompt at most ``max_neighbours`` related items (fields cut to
    ``neighbour_words``) and, in teachers' item prompts only, ``max_profiles`` user profiles (the item
    writer never shows an item's users); optionally ``max_tokens`` for user prompts (the raw prompt,
    before the chat template) given a tokenizer."""

    max_items: int | None = DEFAULT_MAX_ITEMS
    max_words: int | None = DEFAULT_MAX_WORDS
    max_profiles: int = ITEM_SLOTS
    max_tokens: int | None = None
    max_neighbours: int = DEFAULT_MAX_NEIGHBOURS
    neighbour_words: int | None = DEFAULT_NEIGHBOUR_WORDS
    style: str = "paper"

    def __post_init__(self) -> None:
        check_style(self.style)

    def user_prompt(
        self, data: RecDataset, history: Sequence[int] | np.ndarray, user: int | None = None, tokenizer=None
    ) -> str:
        if tokenizer is not None and self.max_tokens is not None:
            return self.fit_to_tokens(data, history, tokenizer, user)
        return user_prompt(data, history, self.max_items, self.max_words, user, self.style)

    def fit_to_tokens(
        self, data: RecDataset, history: Sequence[int] | np.ndarray, tokenizer, user: int | None = None
    ) -> str:
        """The user prompt with the most recent items that fit in ``max_tokens`` (oldest dropped first;
        one item is always kept, even if alone it is over budget)."""
        items = [int(i) for i in history]
        if self.max_items is not None:
            items = items[-self.max_items :]
        if self.max_tokens is None:
            return user_prompt(data, items, None, self.max_words, user, self.style)

        def build(keep: int) -> str:
            return user_prompt(data, items[-keep:], None, self.max_words, user, self.style)

        fits: Callable[[int], bool] = lambda keep: count_tokens(tokenizer, build(keep)) <= self.max_tokens  # noqa: E731
        if fits(len(items)):
            return build(len(items))
        low, high = 1, len(items)  # invariant: the answer is in [low, high); high does not fit
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
        return build(low)

    def item_prompt(
        self,
        data: RecDataset,
        item: int,
        neighbour_items: Sequence[int] = (),
        neighbour_profiles: Sequence[str | None] = (),
        user_profiles: Sequence[str] = (),
    ) -> str:
        k, n = self.max_profiles, self.max_neighbours
        return item_prompt(
            data,
            item,
            list(neighbour_items)[:n],
            list(neighbour_profiles)[:n],
            list(user_profiles)[-k:] if k > 0 else [],
            self.max_words,
            self.neighbour_words,
            self.style,
        )


# ---------------------------------------------------------------- histories and prompt sets


def user_histories(data: RecDataset, split: Split) -> list[np.ndarray]:
    """Each user's train items, oldest first: by timestamp where the dataset has them (ties keep the
    split's order), else in the split's train order (:meth:`Split.train_histories`). Never includes
    validation or test pairs."""
    histories = split.train_histories()
    if data.timestamps is None or len(split.train) == 0:
        return histories
    keys = data.inter_user * data.n_items + data.inter_item
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    out = []
    for u, items in enumerate(histories):
        if len(items) < 2:
            out.append(items)
            continue
        pos = np.searchsorted(sorted_keys, u * data.n_items + items)
        times = data.timestamps[order[np.minimum(pos, len(order) - 1)]]
        out.append(items[np.argsort(times, kind="stable")])
    return out


def user_prompts(
    data: RecDataset,
    split: Split,
    users: Sequence[int] | None = None,
    budget: PromptBudget | None = None,
    tokenizer=None,
    with_features: bool = True,
) -> dict[int, str]:
    """``{user index: prompt}`` for ``users`` (default all) with a non-empty train history."""
    budget = budget or PromptBudget()
    histories = user_histories(data, split)
    wanted = range(data.n_users) if users is None else users
    return {
        int(u): budget.user_prompt(data, histories[u], int(u) if with_features else None, tokenizer)
        for u in wanted
        if len(histories[u])
    }


def item_train_users(split: Split) -> list[np.ndarray]:
    """Per item, the users who interacted with it in train (split order)."""
    order = np.argsort(split.train[:, 1], kind="stable")
    items, users = split.train[order, 1], split.train[order, 0]
    bounds = np.searchsorted(items, np.arange(split.n_items + 1))
    return [users[bounds[i] : bounds[i + 1]] for i in range(split.n_items)]


def item_prompts(
    data: RecDataset,
    split: Split,
    items: Sequence[int] | None = None,
    user_profiles: Mapping[int, str] | None = None,
    item_profiles: Mapping[int, str] | None = None,
    neighbours: Mapping[int, Sequence[int]] | None = None,
    budget: PromptBudget | None = None,
) -> dict[int, str]:
    """``{item index: prompt}``: item text, the profiles of its most recent train users that have one
    (``user_profiles`` by user index), and its ``neighbours`` with their ``item_profiles`` (by item index).
    Items without any train user (zero-shot) get neighbours only, or their text alone."""
    budget = budget or PromptBudget()
    user_profiles = user_profiles or {}
    item_profiles = item_profiles or {}
    neighbours = neighbours or {}
    train_users = item_train_users(split)
    wanted = range(data.n_items) if items is None else items
    out = {}
    for i in wanted:
        i = int(i)
        profiles = [user_profiles[int(u)] for u in train_users[i] if int(u) in user_profiles]
        near = [int(j) for j in neighbours.get(i, ()) if int(j) != i]
        out[i] = budget.item_prompt(data, i, near, [item_profiles.get(j) for j in near], profiles)
    return out


# ---------------------------------------------------------------- profile text

PROFILE_PATTERN = re.compile(r"user\s+identit(?:y|ies)\s*:\s*(.*?)\s*;\s*user\s+interests?\s*:\s*(.*)", re.I | re.S)


def split_entries(text: str) -> list[str]:
    text = text.strip().strip("[]").strip()
    text = re.split(r"\n\s*\n", text)[0]  # stop at a blank line (chatter after the profile)
    text = text.rstrip(" .]")
    entries = [e.strip().strip("[]'\"").strip() for e in re.split(r"[,;]", text)]
    return [e for e in entries if e]


def parse_profile(text: str) -> tuple[list[str], list[str]] | None:
    """``(identities, interests)`` of "User identity: A, B; User interests: X, Y.", or None when
    either part is missing or empty."""
    match = PROFILE_PATTERN.search(text or "")
    if not match:
        return None
    identities, interests = split_entries(match.group(1)), split_entries(match.group(2))
    if not identities or not interests:
        return None
    return identities, interests


def format_profile(identities: Sequence[str], interests: Sequence[str]) -> str:
    """``User identity: A, B, C; User interests: X, Y, Z.``"""
    return f"User identity: {', '.join(identities)}; User interests: {', '.join(interests)}."
