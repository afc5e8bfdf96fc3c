"""The item side: an item-profile writer tuned on the teacher's item profiles, then item profiles for EVERY item,
the zero-shot ones included.

One recipe for every item, trained or new, as in the paper's released code: an item prompt shows the item's text
and its ``max_neighbours`` text-nearest items of the *neighbour pool*, each with its teacher profile
(:func:`reclm.llm.prompts.PromptBudget.item_prompt`). Never the item's own users or interactions: a new item has
none, so a trained item's prompt must not carry them either (``prompt.max_profiles`` does not apply here).

- The neighbour pool: the items seen in train that have a teacher item profile, so every neighbour shown carries
  a profile and a new item's prompt uses only what is known at training time. When the teacher wrote no usable
  item profile, the pool is every item seen in train and neighbours are shown as text alone.
- Text similarity: cosine of item-text embeddings (``RUN/neighbours/item_text.npz``, written by the neighbours
  stage and passed in as ``text_vectors``; computed here when it is missing). An item is never its own
  neighbour.
- A neighbour's profile is always its TEACHER profile, never one generated earlier in the same run: one
  generation pass writes every item, and a prompt does not depend on the order items are written in.

Training targets: the teacher's item profiles (``RUN/teacher/items.jsonl``: the shipped GPT-3.5 profiles on
MIND / Netflix, the offline teacher's on ml-100k), never those of held-out items (zero-shot, cold-validation).
Training and generation prompts are built by the same function.

Outputs: ``RUN/item_sft/adapter`` (+ metrics), ``RUN/item_sft/train.jsonl`` (the training records) and
``RUN/item_sft/items.jsonl`` (records ``{kind: item, id, prompt, profile, neighbours, source}``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from reclm.data.dataset import RecDataset
from reclm.data.split import Split
from reclm.llm.prompts import PromptBudget, parse_profile
from reclm.llm.records import ProfileRecord, read_profiles, write_records

TRAIN_FILE = "train.jsonl"
OUTPUT_FILE = "items.jsonl"

Generate = Callable[[list[str]], list[str]]


def load_profiles_by_index(path: Path, index: Mapping[str, int], kind: str) -> dict[int, str]:
    if not path.is_file():
        return {}
    return {index[raw]: p for raw, p in read_profiles(path, kind).items() if raw in index and p.strip()}


def held_out_items(split: Split) -> set[int]:
    """Items whose interactions are all held out (zero-shot, cold-validation): never a training target, never a
    kept teacher profile (a teacher may have seen their held-out interactions)."""
    return set(np.flatnonzero(split.held_out_mask).tolist())


def teacher_item_profiles(path: Path, data: RecDataset, split: Split) -> dict[int, str]:
    """The teacher's item profiles (``path``: its ``items.jsonl``) the item side may use: in the profile format,
    not of a held-out item."""
    profiles = load_profiles_by_index(path, data.item_index(), "item")
    held = held_out_items(split)
    return {i: p for i, p in profiles.items() if i not in held and parse_profile(p)}


def neighbour_pool(split: Split, teacher: Mapping[int, str]) -> np.ndarray:
    """Items that may be shown as neighbours: seen in train and with a teacher profile (all seen items when no
    seen item has one)."""
    from reclm.llm.neighbours import items_with_train

    seen = items_with_train(split)
    profiled = np.zeros_like(seen)
    profiled[[i for i in teacher if i < len(profiled)]] = True
    pool = seen & profiled
    return pool if pool.any() else seen


def item_neighbour_lists(
    data: RecDataset, k: int, pool: np.ndarray, text_vectors: np.ndarray | None
) -> dict[int, list[int]]:
    """Every item's ``k`` text-nearest pool items (by ``text_vectors``, the run's item-text embeddings, or by
    ones computed now when None)."""
    from reclm.llm.neighbours import item_text_vectors, text_neighbours

    vectors = text_vectors if text_vectors is not None else item_text_vectors(data)
    table = text_neighbours(vectors, k, pool)
    return {i: table.of(i) for i in range(data.n_items)}


def item_records(
    data: RecDataset,
    items: Sequence[int],
    shown: Mapping[int, str],
    neighbours: Mapping[int, Sequence[int]],
    budget: PromptBudget,
    targets: Mapping[int, str] | None = None,
) -> list[ProfileRecord]:
    """Records built by the one item recipe: the item's text and its neighbours with the profiles ``shown`` has
    for them (the target profile when ``targets`` has one). Each keeps the raw ids of the neighbours it shows."""
    records = []
    for i in (int(i) for i in items):
        near = [int(j) for j in neighbours.get(i, ()) if int(j) != i][: budget.max_neighbours]
        prompt = budget.item_prompt(data, i, near, [shown.get(j) for j in near])
        extra = {"neighbours": [data.item_ids[j] for j in near]}
        records.append(ProfileRecord("item", data.item_ids[i], prompt, (targets or {}).get(i, ""), extra))
    return records


def recipe_inputs(
    data: RecDataset,
    split: Split,
    budget: PromptBudget,
    teacher_items: Path,
    text_vectors: np.ndarray | None,
    neighbours: Mapping[int, Sequence[int]] | None,
) -> tuple[dict[int, str], Mapping[int, Sequence[int]]]:
    """(teacher item profiles, neighbour lists): what every item prompt of the run is built from (``neighbours``
    when given, else the text-nearest pool items by ``text_vectors``)."""
    teacher = teacher_item_profiles(teacher_items, data, split)
    if neighbours is None:
        neighbours = item_neighbour_lists(data, budget.max_neighbours, neighbour_pool(split, teacher), text_vectors)
    return teacher, neighbours


def training_records(
    data: RecDataset,
    split: Split,
    budget: PromptBudget,
    teacher_items: Path,
    text_vectors: np.ndarray | None = None,
    neighbours: Mapping[int, Sequence[int]] | None = None,
) -> list[ProfileRecord]:
    """The item writer's examples: one per teacher item profile, its prompt built as at generation."""
    teacher, neighbours = recipe_inputs(data, split, budget, teacher_items, text_vectors, neighbours)
    if not teacher:
        raise ValueError(f"{teacher_items}: no teacher item profiles to train the item writer on")
    return item_records(data, sorted(teacher), teacher, neighbours, budget, teacher)


def train_item_writer(
    data: RecDataset,
    split: Split,
    base_model: str,
    out: Path,
    teacher_items: Path,
    text_vectors: np.ndarray | None = None,
    budget: PromptBudget | None = None,
    lora: dict | None = None,
    train: dict | None = None,
    init_adapter: str | Path | None = None,
    neighbours: Mapping[int, Sequence[int]] | None = None,
    progress: bool = True,
) -> dict:
    """LoRA SFT of the item-profile writer on the teacher's item profiles (``teacher_items``; prompts show
    neighbours by ``text_vectors``), reusing :func:`reclm.llm.sft.train_lora`."""
    from reclm.distributed import is_main_process
    from reclm.llm.chat import pair_conversation
    from reclm.llm.sft import LoraSettings, TrainSettings, settings_from, train_lora

    out = Path(out)
    records = training_records(data, split, budget or PromptBudget(), teacher_items, text_vectors, neighbours)
    if is_main_process():  # under accelerate launch every process trains, the first one writes
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
    if is_main_process():
        (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


def generate_item_profiles(
    data: RecDataset,
    split: Split,
    generate: Generate,
    out: Path,
    teacher_items: Path,
    text_vectors: np.ndarray | None = None,
    budget: PromptBudget | None = None,
    items: Sequence[int] | None = None,
    neighbours: Mapping[int, Sequence[int]] | None = None,
    keep_teacher: bool = False,
) -> dict:
    """Profiles for ``items`` (default EVERY item) written to ``out/items.jsonl`` in ONE call of
    ``generate(prompts) -> profiles`` (the item writer, e.g. the generation runner with the item adapter).
    Prompts are built from ``teacher_items`` and ``text_vectors`` as in :func:`train_item_writer`.
    ``keep_teacher``: items with a teacher profile keep it instead of being written."""
    from reclm.distributed import refuse_data_parallel
    from reclm.llm.neighbours import items_with_train

    refuse_data_parallel("item profile generation")
    out = Path(out)
    budget = budget or PromptBudget()
    wanted = list(range(data.n_items)) if items is None else [int(i) for i in items]
    teacher, neighbours = recipe_inputs(data, split, budget, teacher_items, text_vectors, neighbours)
    kept = {i: teacher[i] for i in wanted if keep_teacher and i in teacher}
    records = {i: ProfileRecord("item", data.item_ids[i], "", p, {"source": "teacher"}) for i, p in kept.items()}
    todo = [i for i in wanted if i not in kept]
    batch = item_records(data, todo, teacher, neighbours, budget)
    profiles = generate([r.prompt for r in batch]) if batch else []
    for i, record, profile in zip(todo, batch, profiles):
        record.profile = (profile or "").strip()
        record.extra["source"] = "generated"
        records[i] = record
    n = write_records(out / OUTPUT_FILE, [records[i] for i in wanted])
    zero_shot = set(split.zero_shot_items.tolist())
    seen = items_with_train(split)
    summary = {
        "items": n,
        "by_writer": len(todo),
        "kept_teacher": len(kept),
        "zero_shot_items": sum(1 for i in wanted if i in zero_shot),
        "unseen_items": sum(1 for i in wanted if not seen[i]),
        "parsed": sum(1 for r in records.values() if parse_profile(r.profile)),
        "path": str(out / OUTPUT_FILE),
    }
    (out / "generation.json").write_text(json.dumps(summary, indent=2))
    return summary
