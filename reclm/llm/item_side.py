"""The item side: an item-profile writer tuned on the paper's item instructions, then item profiles for EVERY
item, the zero-shot ones included.

An item instruction shows the item's text, the profiles of (up to ``max_profiles``) users who interacted with
it in TRAIN, and its neighbour items with their profiles (:func:`reclm.llm.prompts.item_prompts`). Training
targets are the teacher's item profiles (``RUN/teacher/items.jsonl``: the shipped GPT-3.5 profiles on
MIND / Netflix, the offline teacher's on ml-100k); prompts are rebuilt here with the run's neighbours so
that training and generation see the same format.

Neighbours (:mod:`reclm.llm.neighbours`): items seen in train get CF / co-occurrence neighbours; zero-shot
items, which have no interactions, get neighbours by text similarity among the items seen in train.
Generation runs in two passes: seen items first, then zero-shot items, whose prompts can then show the
profiles just written for their (seen) neighbours.

Outputs: ``RUN/item_sft/adapter`` (+ metrics), ``RUN/item_sft/train.jsonl`` (the training records) and
``RUN/item_sft/items.jsonl`` (generated records ``{kind: item, id, prompt, profile, users, neighbours}``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from reclm.data.dataset import RecDataset
from reclm.data.split import Split
from reclm.llm.prompts import PromptBudget, item_prompts, item_train_users, parse_profile
from reclm.llm.records import ProfileRecord, read_profiles, write_records

TRAIN_FILE = "train.jsonl"
OUTPUT_FILE = "items.jsonl"

Generate = Callable[[list[str]], list[str]]


def shown_users(split: Split, items: Sequence[int], user_profiles: Mapping[int, str], k: int) -> dict[int, list[int]]:
    """Per item, the train users whose profiles its prompt shows (the most recent ``k`` with a profile),
    exactly as :func:`reclm.llm.prompts.item_prompts` picks them."""
    train_users = item_train_users(split)
    out = {}
    for i in items:
        with_profile = [int(u) for u in train_users[int(i)] if int(u) in user_profiles]
        out[int(i)] = with_profile[-k:] if k > 0 else []
    return out


def item_records(
    data: RecDataset,
    split: Split,
    items: Sequence[int],
    user_profiles: Mapping[int, str],
    item_profiles: Mapping[int, str],
    neighbours: Mapping[int, Sequence[int]],
    budget: PromptBudget,
    targets: Mapping[int, str] | None = None,
) -> list[ProfileRecord]:
    """Item records (prompt, and the target profile when ``targets`` has one) keeping the ids that built
    each prompt: ``users`` (raw ids of the users whose profiles it shows) and ``neighbours`` (raw item ids)."""
    items = [int(i) for i in items]
    prompts = item_prompts(data, split, items, user_profiles, item_profiles, neighbours, budget)
    users = shown_users(split, items, user_profiles, budget.max_profiles)
    records = []
    for i in items:
        near = [int(j) for j in neighbours.get(i, ()) if int(j) != i][: budget.max_neighbours]
        extra = {
            "users": [data.user_ids[u] for u in users[i]],
            "neighbours": [data.item_ids[j] for j in near],
        }
        profile = (targets or {}).get(i, "")
        records.append(ProfileRecord("item", data.item_ids[i], prompts[i], profile, extra))
    return records


def load_profiles_by_index(path: Path, index: Mapping[str, int], kind: str) -> dict[int, str]:
    if not path.is_file():
        return {}
    return {index[raw]: p for raw, p in read_profiles(path, kind).items() if raw in index and p.strip()}


def user_profiles_for_items(run, data: RecDataset) -> dict[int, str]:
    """User profiles shown in item prompts: the run's generated profiles where present, else the teacher's."""
    index = data.user_index()
    profiles = load_profiles_by_index(run.teacher / "users.jsonl", index, "user")
    profiles.update(load_profiles_by_index(run.profiles / "users.jsonl", index, "user"))
    return profiles


def item_neighbour_lists(run, data: RecDataset, split: Split, k: int) -> dict[int, list[int]]:
    """The run's item neighbours (``reclm neighbours``), or neighbours computed now from train co-occurrence
    and item text."""
    from reclm.llm.neighbours import item_neighbours, items_with_train, load_neighbours

    try:
        table = load_neighbours(run, data, "item")
    except Exception:  # noqa: BLE001 - no neighbour stage in this run: compute them
        table = item_neighbours(data, split, k)
    seen = items_with_train(split)
    # only items seen in train may be shown as neighbours (their profiles come from train data)
    return {i: [j for j in table.of(i) if seen[j] and j != i][:k] for i in range(data.n_items)}


def train_item_writer(
    run,
    data: RecDataset,
    split: Split,
    base_model: str,
    out: Path | None = None,
    budget: PromptBudget | None = None,
    lora: dict | None = None,
    train: dict | None = None,
    init_adapter: str | Path | None = None,
    neighbours: Mapping[int, Sequence[int]] | None = None,
    progress: bool = True,
) -> dict:
    """LoRA SFT of the item-profile writer on the teacher's item profiles (reusing :func:`reclm.llm.sft.train_lora`)."""
    from reclm.llm.chat import pair_conversation
    from reclm.llm.sft import LoraSettings, TrainSettings, settings_from, train_lora

    out = Path(out or run.stage("item_sft"))
    budget = budget or PromptBudget()
    index = data.item_index()
    teacher = load_profiles_by_index(run.teacher / "items.jsonl", index, "item")
    # zero-shot items are never training targets: a teacher may have seen their (test) interactions
    zero_shot = set(split.zero_shot_items.tolist())
    targets = {i: p for i, p in teacher.items() if i not in zero_shot and parse_profile(p)}
    if not targets:
        raise ValueError(f"{run.teacher / 'items.jsonl'}: no teacher item profiles to train the item writer on")
    neighbours = neighbours if neighbours is not None else item_neighbour_lists(run, data, split, budget.max_neighbours)
    user_profiles = load_profiles_by_index(run.teacher / "users.jsonl", data.user_index(), "user")
    records = []
    for i in sorted(targets):
        # the item's own profile is never shown among its neighbours' profiles
        others = {j: p for j, p in targets.items() if j != i}
        records += item_records(data, split, [i], user_profiles, others, neighbours, budget, targets)
    write_records(out / TRAIN_FILE, records)
    conversations = [pair_conversation(r.prompt, r.profile) for r in records]
    lora_settings = settings_from(LoraSettings, dict(lora or {}))
    train_settings = settings_from(TrainSettings, dict(train or {}))
    result = train_lora(
        conversations,
        out,
        base_model,
        lora_settings,
        train_settings,
        init_adapter=init_adapter,
        progress=progress,
        description="item side",
    )
    summary = {"examples": len(records), **result.to_dict()}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


def generate_item_profiles(
    run,
    data: RecDataset,
    split: Split,
    generate: Generate,
    out: Path | None = None,
    budget: PromptBudget | None = None,
    items: Sequence[int] | None = None,
    neighbours: Mapping[int, Sequence[int]] | None = None,
    keep_teacher: bool = False,
) -> dict:
    """Profiles for ``items`` (default EVERY item) written to ``out/items.jsonl``: seen items first, then the
    items without train interactions, whose neighbours' profiles are by then known.

    ``generate(prompts) -> profiles`` is the item writer (e.g. the generation runner with the item adapter).
    ``keep_teacher``: items with a teacher profile keep it instead of being regenerated."""
    from reclm.llm.neighbours import items_with_train

    out = Path(out or run.stage("item_sft"))
    budget = budget or PromptBudget()
    wanted = list(range(data.n_items)) if items is None else [int(i) for i in items]
    neighbours = neighbours if neighbours is not None else item_neighbour_lists(run, data, split, budget.max_neighbours)
    user_profiles = user_profiles_for_items(run, data)
    teacher = load_profiles_by_index(run.teacher / "items.jsonl", data.item_index(), "item")
    zero_shot = set(split.zero_shot_items.tolist())
    known = {i: p for i, p in teacher.items() if i not in zero_shot}
    seen = items_with_train(split)
    records: dict[int, ProfileRecord] = {}
    for group in ([i for i in wanted if seen[i]], [i for i in wanted if not seen[i]]):
        if keep_teacher:
            for i in [i for i in group if i in known]:
                records[i] = ProfileRecord("item", data.item_ids[i], "", known[i], {"source": "teacher"})
            group = [i for i in group if i not in known]
        if not group:
            continue
        batch = item_records(data, split, group, user_profiles, known, neighbours, budget)
        profiles = generate([r.prompt for r in batch])
        for i, record, profile in zip(group, batch, profiles):
            record.profile = profile.strip()
            record.extra["source"] = "generated"
            records[i] = record
            if parse_profile(record.profile):
                known[i] = record.profile  # later (zero-shot) prompts may show it
    n = write_records(out / OUTPUT_FILE, [records[i] for i in wanted])
    parsed = sum(1 for r in records.values() if parse_profile(r.profile))
    summary = {
        "items": n,
        "zero_shot_items": sum(1 for i in wanted if i in zero_shot),
        "unseen_items": sum(1 for i in wanted if not seen[i]),
        "parsed": parsed,
        "path": str(out / OUTPUT_FILE),
    }
    (out / "generation.json").write_text(json.dumps(summary, indent=2))
    return summary
