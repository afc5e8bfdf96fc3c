"""Collaborative instruction tuning: two-turn dialogues that teach the profile writer what similar users share.

Turn 1 (user): the target user's TRAIN history with one item masked, the train histories of similar users
(from :mod:`reclm.llm.neighbours`) and the text of the items involved. Turn 1 (assistant): the profiles of
the target and of each similar user (written by the distilled model, else the teacher's).
Turn 2 (user): "Will user U interact with <item X>? Just answer Yes or No." Turn 2 (assistant): "Yes" when
X is the masked item (half the dialogues), "No" when X is a negative drawn from the similar users' train
items that the target has no interaction with (train, validation or test: a held-out positive is never
shown, not even as a "No").

Every dialogue record keeps the raw ids of the items shown for each user and of the question's pair, so the
leakage audit (:mod:`reclm.llm.audit`) checks ids as well as text. Training reuses the chat template with
response-only labels (:mod:`reclm.llm.chat`) and the LoRA SFT loop (:mod:`reclm.llm.sft`), starting from the
SFT adapter.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from reclm.data.dataset import RecDataset
from reclm.data.split import Split
from reclm.llm.chat import SYSTEM_PROMPT, Conversation, as_conversation
from reclm.llm.prompts import PROFILE_FORMAT, count_tokens, domain_for, render_item, user_histories
from reclm.utils import atomic_write

if TYPE_CHECKING:
    from reclm.llm.sft import TrainSettings

YES, NO = "Yes", "No"
TEMPLATE_TOKENS = 64  # what the chat template adds to a dialogue's message text (SmolLM2: about 35)
DIALOGUES_FILE = "dialogues.jsonl"

# Segment headers of a turn-1 prompt; the audit parses them back to tell whose history a listing is.
TARGET_HEADER = "User {user} {verb}:"
NEIGHBOUR_HEADER = "Similar user {user} {verb}:"
HEADER_PATTERN = re.compile(r"(?:^|\n)(?:Similar user|User) (\S+) [^:\n]*:")
QUESTION_PATTERN = re.compile(r"Will user (\S+) interact with this [^:]*: (.*)\? Just answer Yes or No\.", re.S)


@dataclass
class CollabBudget:
    """Length limits of a dialogue: most recent ``target_items`` / ``neighbour_items`` per user, item fields
    cut to ``max_words`` words, at most ``neighbours`` similar users, and ``max_tokens`` for the whole
    rendered conversation when a tokenizer is given (neighbour items go first, then the target's oldest,
    then whole neighbours)."""

    target_items: int = 10
    neighbour_items: int = 5
    max_words: int | None = 20
    neighbours: int = 3
    max_tokens: int | None = 1024


@dataclass
class Dialogue:
    """One collaborative dialogue, in dataset indices."""

    user: int
    masked_item: int
    question_item: int
    answer: str
    neighbours: list[int]
    shown: dict[int, list[int]]
    messages: Conversation
    negative_source: str = ""
    extra: dict = field(default_factory=dict)

    def to_record(self, data: RecDataset) -> dict:
        """JSON record with raw ids: what the audit and the trainer read back."""
        raw_u, raw_i = data.user_ids, data.item_ids
        return {
            "kind": "dialogue",
            "id": raw_u[self.user],
            "messages": self.messages,
            "answer": self.answer,
            "masked_item": raw_i[self.masked_item],
            "question": [raw_u[self.user], raw_i[self.question_item]],
            "neighbours": [raw_u[v] for v in self.neighbours],
            "items": {raw_u[u]: [raw_i[i] for i in items] for u, items in self.shown.items()},
            "negative_source": self.negative_source,
            **self.extra,
        }


# ---------------------------------------------------------------- text


def listing(data: RecDataset, items: Sequence[int], max_words: int | None) -> str:
    domain = domain_for(data)
    return " ".join(render_item(data, int(i), max_words, domain) for i in items)


def turn1_prompt(
    data: RecDataset, user_id: str, target_items: Sequence[int], neighbours: Mapping[str, Sequence[int]], max_words
) -> str:
    domain = domain_for(data)
    lines = [
        f"Now you are a user profile generator. Below are the {domain.items} that user {user_id} and "
        f"{len(neighbours)} similar users previously {domain.verb}.",
        TARGET_HEADER.format(user=user_id, verb=domain.verb) + " " + listing(data, target_items, max_words),
    ]
    for other, items in neighbours.items():
        lines.append(NEIGHBOUR_HEADER.format(user=other, verb=domain.verb) + " " + listing(data, items, max_words))
    ids = ", ".join([user_id, *neighbours])
    lines.append(
        f"Please generate the profiles of users {ids}, one line each, strictly in the following format: "
        f"User [id]: {PROFILE_FORMAT} Provide only the most likely three identities and interests."
    )
    return "\n".join(lines)


def turn1_response(user_id: str, profiles: Mapping[str, str]) -> str:
    """``User <id>: <profile>`` per line, target first."""
    return "\n".join(f"User {uid}: {' '.join(p.split())}" for uid, p in profiles.items())


def turn2_prompt(data: RecDataset, user_id: str, item: int, max_words: int | None) -> str:
    domain = domain_for(data)
    return (
        f"Will user {user_id} interact with this {domain.item}: {render_item(data, item, max_words, domain)}? "
        "Just answer Yes or No."
    )


def segments(prompt: str) -> dict[str, str]:
    """``{raw user id: text}`` of a dialogue's user turns: each history listing under its header, and the
    turn-2 question under the user it asks about. Text outside any header is left out."""
    out: dict[str, str] = {}
    question = QUESTION_PATTERN.search(prompt)
    if question:
        out[question.group(1)] = question.group(2)
        prompt = prompt[: question.start()] + prompt[question.end() :]
    marks = list(HEADER_PATTERN.finditer(prompt))
    for k, mark in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(prompt)
        body = prompt[mark.end() : end].split("\nPlease generate")[0]
        out[mark.group(1)] = out.get(mark.group(1), "") + "\n" + body
    return out


# ---------------------------------------------------------------- construction


@dataclass
class DialogueSet:
    dialogues: list[Dialogue]
    skipped: dict[str, int]

    def balance(self) -> float:
        return float(np.mean([d.answer == YES for d in self.dialogues])) if self.dialogues else float("nan")


def held_out_items(split: Split) -> list[set[int]]:
    """Per user, the items of their validation, cold-validation and test pairs (never to be shown with that user)."""
    out: list[set[int]] = [set() for _ in range(split.n_users)]
    for pairs in (split.valid, split.cold_valid, split.test):
        for u, i in pairs.tolist():
            out[u].add(i)
    return out


def balanced_answers(n: int, rng: np.random.Generator) -> list[str]:
    """Exactly ``n // 2`` (or one more) Yes answers, shuffled."""
    answers = [YES] * ((n + 1) // 2) + [NO] * (n // 2)
    rng.shuffle(answers)
    return answers


def draw_negative(
    rng: np.random.Generator,
    neighbour_items: Sequence[int],
    forbidden: set[int],
    seen_items: np.ndarray,
    looks_forbidden: Callable[[int], bool] = lambda item: False,
) -> tuple[int, str]:
    """A negative for the target: one of the neighbours' train items the target never interacted with; when
    there is none, any train-seen item the target never interacted with (nor one with the same text)."""
    pool = sorted({int(i) for i in neighbour_items} - forbidden)
    if pool:
        return int(rng.choice(pool)), "neighbours"
    for _ in range(1000):
        item = int(rng.choice(seen_items))
        if item not in forbidden and not looks_forbidden(item):
            return item, "random"
    raise ValueError("no negative item available: every train item is one of the target's")


def fit_dialogue(
    build: Callable[[int, int, int], Conversation], budget: CollabBudget, n_target: int, n_neigh: int, tokenizer
) -> tuple[Conversation, int, int, int]:
    """Shrink (neighbour items, target items, neighbours) until the rendered conversation fits ``max_tokens``."""
    t, k, m = min(n_target, budget.target_items), budget.neighbour_items, n_neigh
    while True:
        conversation = build(t, k, m)
        if tokenizer is None or budget.max_tokens is None:
            return conversation, t, k, m
        text = "\n".join(message["content"] for message in conversation)
        if count_tokens(tokenizer, text) <= budget.max_tokens:
            return conversation, t, k, m
        if k > 1 and m > 0:
            k -= 1
        elif t > 1:
            t -= 1
        elif m > 0:
            m -= 1
        else:
            return conversation, t, k, m


def build_dialogues(
    data: RecDataset,
    split: Split,
    neighbours: Mapping[int, Sequence[int]],
    profiles: Mapping[int, str],
    users: Sequence[int],
    budget: CollabBudget | None = None,
    tokenizer=None,
    seed: int = 0,
    system: str | None = SYSTEM_PROMPT,
) -> DialogueSet:
    """One dialogue per target in ``users`` (indices) that has at least two train items and a profile.

    ``neighbours``: similar users per user (best first); neighbours without a profile or a train history are
    left out. ``profiles``: ``{user index: profile}`` for the turn-1 response."""
    budget = budget or CollabBudget()
    rng = np.random.default_rng(seed)
    histories = user_histories(data, split)
    train_sets = [set(h.tolist()) for h in histories]
    held_out = held_out_items(split)
    seen_items = np.unique(split.train[:, 1])
    skipped = {"fewer than two train items": 0, "no profile": 0}
    eligible = []
    for u in users:
        u = int(u)
        if len(histories[u]) < 2:
            skipped["fewer than two train items"] += 1
        elif u not in profiles:
            skipped["no profile"] += 1
        else:
            eligible.append(u)
    answers = balanced_answers(len(eligible), rng)
    dialogues = []
    texts: dict[int, str] = {}

    def text_of(item: int) -> str:
        if item not in texts:
            texts[item] = render_item(data, item, budget.max_words)
        return texts[item]

    for u, answer in zip(eligible, answers):
        history = [int(i) for i in histories[u]]
        masked = history[int(rng.integers(len(history)))]
        # an item with the same text as the masked one (ml-100k has duplicate titles) is masked too
        rest = [i for i in history if text_of(i) != text_of(masked)]
        if not rest:
            skipped["fewer than two train items"] += 1
            continue
        near = [int(v) for v in neighbours.get(u, ()) if int(v) != u and int(v) in profiles and len(histories[v])]
        near = near[: budget.neighbours]
        forbidden = train_sets[u] | held_out[u]
        forbidden_text = {text_of(i) for i in forbidden}
        if answer == YES:
            question, source = masked, "masked"
        else:
            pool = [i for v in near for i in histories[v].tolist() if text_of(i) not in forbidden_text]
            question, source = draw_negative(
                rng, pool, forbidden, seen_items, lambda i, f=forbidden_text: text_of(i) in f
            )
        uid = data.user_ids[u]

        def build(t: int, k: int, m: int, u=u, uid=uid, rest=rest, near=near, question=question, answer=answer):
            shown = {data.user_ids[v]: [int(i) for i in histories[v][-k:]] for v in near[:m]}
            conversation = as_conversation(
                [
                    {"role": "user", "content": turn1_prompt(data, uid, rest[-t:], shown, budget.max_words)},
                    {
                        "role": "assistant",
                        "content": turn1_response(uid, {data.user_ids[w]: profiles[w] for w in [u, *near[:m]]}),
                    },
                    {"role": "user", "content": turn2_prompt(data, uid, question, budget.max_words)},
                    {"role": "assistant", "content": answer},
                ],
                system,
            )
            return conversation

        conversation, t, k, m = fit_dialogue(build, budget, len(rest), len(near), tokenizer)
        shown = {u: rest[-t:], **{v: [int(i) for i in histories[v][-k:]] for v in near[:m]}}
        dialogues.append(Dialogue(u, masked, question, answer, near[:m], shown, conversation, source))
    return DialogueSet(dialogues, skipped)


# ---------------------------------------------------------------- files


def write_dialogues(path: Path, data: RecDataset, dialogues: Sequence[Dialogue]) -> int:
    with atomic_write(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for d in dialogues:
            handle.write(json.dumps(d.to_record(data), ensure_ascii=False) + "\n")
    return len(dialogues)


def read_dialogues(path: Path) -> list[dict]:
    from reclm.data.tables import read_jsonl

    return [{k: v for k, v in r.items() if k != "_line"} for r in read_jsonl(path, ["messages", "question"])]


def budget_dict(budget: CollabBudget) -> dict:
    return asdict(budget)


# ---------------------------------------------------------------- profile writers and the stage


class ProfileWriter:
    """``prompts -> profiles`` through the project's generation runner (greedy, one line, cached on disk per
    (model, adapter, prompt, decoding); ``backend``: transformers | ct2 | openai). A failed prompt gives ""."""

    def __init__(
        self,
        base_model: str,
        adapter: str | Path | None,
        backend: str = "transformers",
        batch_size: int = 16,
        max_new_tokens: int = 64,
        cache_path: str | Path | None = None,
        progress: bool = True,
        quantization: str | None = None,
    ):
        from reclm.llm.generation import DecodeParams, make_generator

        options = {"quantization": quantization} if quantization else {}  # ct2 only: None = its default
        self.generator = make_generator(backend, base_model, adapter, batch_size, **options)
        self.params = DecodeParams(max_new_tokens=max_new_tokens)
        self.cache_path, self.progress = cache_path, progress

    def __call__(self, prompts: Sequence[str]) -> list[str]:
        from reclm.llm.generation import GenerationCache, generate_texts

        cache = GenerationCache(self.cache_path)
        try:
            texts, _ = generate_texts(self.generator, list(prompts), self.params, cache, progress=self.progress,
                                      desc="profiles")  # fmt: skip
        finally:
            cache.close()
        return [t or "" for t in texts]

    def close(self) -> None:
        self.generator.close()


def profile_writer(
    base_model: str, adapter: str | Path | None, backend: str = "transformers", **options
) -> ProfileWriter:
    return ProfileWriter(base_model, adapter, backend, **options)


def yes_no_accuracy(model, tokenizer, records: Sequence[dict]) -> dict:
    """Turn-2 accuracy: is the next-token logit of the right answer above the other's, given the dialogue up
    to the question (turn-1 response included)? Also the mean probability of the right answer."""
    import torch

    from reclm.llm.chat import render
    from reclm.llm.rl.common import forward

    ids = {a: tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in (YES, NO)}
    device = next(model.parameters()).device
    right, probs = [], []
    for record in records:
        text = render(tokenizer, record["messages"][:-1], add_generation_prompt=True)
        enc = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(device)
        with torch.no_grad():
            logits = forward(model, enc["input_ids"], enc["attention_mask"]).logits[0, -1].float()
        pair = torch.softmax(logits[[ids[YES], ids[NO]]], dim=0)
        p_right = float(pair[0] if record["answer"] == YES else pair[1])
        right.append(p_right > 0.5)
        probs.append(p_right)
    if not right:
        return {"dialogues": 0}
    return {
        "dialogues": len(right),
        "accuracy": round(float(np.mean(right)), 4),
        "p_right": round(float(np.mean(probs)), 4),
    }


def collect_profiles(
    data: RecDataset,
    split: Split,
    teacher_users: Path,
    users: Sequence[int],
    source: str,
    generate: Callable[[list[str]], list[str]] | None,
    prompt_budget,
    out: Path,
) -> tuple[dict[int, str], dict[str, int]]:
    """Turn-1 responses: the distilled model's profiles of ``users`` (written to ``out/profiles.jsonl``), with
    the teacher's (``teacher_users``, a profiles file) where the distilled one is missing or malformed;
    ``source="teacher"`` uses teacher ones only."""
    from reclm.llm.prompts import parse_profile, user_prompts
    from reclm.llm.records import ProfileRecord, read_profiles, write_records

    index = data.user_index()
    teacher = (
        {index[r]: p for r, p in read_profiles(teacher_users, "user").items() if r in index}
        if teacher_users.is_file()
        else {}
    )
    counts = {"distilled": 0, "teacher": 0, "missing": 0}
    profiles: dict[int, str] = {}
    if source == "distilled":
        if generate is None:
            raise ValueError("distilled profiles need a generator (the SFT adapter)")
        prompts = user_prompts(data, split, sorted(set(int(u) for u in users)), prompt_budget)
        order = sorted(prompts)
        texts = generate([prompts[u] for u in order])
        histories = user_histories(data, split)
        records = []
        for u, text in zip(order, texts):
            shown = [data.item_ids[i] for i in histories[u][-prompt_budget.max_items :]]
            records.append(
                ProfileRecord("user", data.user_ids[u], prompts[u], text, {"items": {data.user_ids[u]: shown}})
            )
            if parse_profile(text):
                profiles[u] = text.strip()
        write_records(out / "profiles.jsonl", records)
    elif source != "teacher":
        raise ValueError(f"profile source {source!r}: expected distilled or teacher")
    for u in users:
        u = int(u)
        if u in profiles:
            counts["distilled"] += 1
        elif u in teacher and parse_profile(teacher[u]):
            profiles[u] = teacher[u]
            counts["teacher"] += 1
        else:
            counts["missing"] += 1
    return profiles, counts


def collab_settings(budget: CollabBudget, train: dict, seed: int) -> tuple[CollabBudget, TrainSettings]:
    """The dialogue budget and the training settings, made consistent: the dialogue budget counts message
    text, the chat template adds about ``TEMPLATE_TOKENS`` more, so one is derived from the other."""
    from reclm.llm.sft import TrainSettings, settings_from

    train = {"seed": seed, **train}
    if "max_seq_len" in train and budget.max_tokens is not None:
        budget = replace(budget, max_tokens=min(budget.max_tokens, int(train["max_seq_len"]) - TEMPLATE_TOKENS))
    elif budget.max_tokens is not None:
        train["max_seq_len"] = budget.max_tokens + TEMPLATE_TOKENS
    return budget, settings_from(TrainSettings, train)


def dialogue_count(steps: int | None, batch_size: int, holdout: float) -> int:
    """The default number of dialogues: one pass of ``steps x batch_size`` after the held-out share."""
    return max(8, math.ceil((steps or 1) * batch_size / (1 - holdout)))


def dialogue_targets(data: RecDataset, split: Split, near: Mapping[int, Sequence[int]], n: int, seed: int) -> list[int]:
    """``n`` seeded target users (fewer when fewer qualify): two train items at least, and neighbours."""
    histories = user_histories(data, split)
    candidates = np.array([u for u in range(data.n_users) if len(histories[u]) >= 2 and near.get(u)], dtype=np.int64)
    if not len(candidates):
        raise ValueError("no user has two train items and neighbours: nothing to build dialogues from")
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(candidates, size=min(n, len(candidates)), replace=False).tolist())


def yes_no_before_after(base_model: str, adapters: Mapping[str, Any], records: Sequence[dict]) -> dict:
    """Held-out Yes/No accuracy of each adapter (``{"before": ..., "after": ...}``)."""
    from reclm.llm.model import load_base

    result = {}
    for name, adapter in adapters.items():
        model, tok = load_base(base_model, adapter=adapter)
        result[f"yes_no_{name}"] = yes_no_accuracy(model, tok, records)
        del model
    return result


def run_collab(
    data: RecDataset,
    split: Split,
    base_model: str,
    out: Path,
    init_adapter: str | Path,
    neighbours: Mapping[int, Sequence[int]],
    teacher_users: Path,
    dialogues: int | None = None,
    budget: CollabBudget | None = None,
    prompt_budget=None,
    lora: dict | None = None,
    train: dict | None = None,
    profile_source: str = "distilled",
    generate: Callable[[list[str]], list[str]] | None = None,
    seed: int = 0,
    evaluate: bool = True,
    progress: bool = True,
    backend: str = "transformers",
    writer: dict | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Build the dialogues (``out/dialogues.jsonl``) and continue ``init_adapter`` (the SFT adapter) on them
    (``out/adapter``).

    ``neighbours``: similar users per user (the run's neighbour lists); ``teacher_users``: the teacher's user
    profiles (turn-1 responses where a distilled one is missing). ``dialogues``: how many targets (default:
    one pass of ``train.steps x train.batch_size``). ``train`` and ``lora``: :class:`reclm.llm.sft.TrainSettings`
    / ``LoraSettings`` fields. ``writer``: ProfileWriter options (batch_size, max_new_tokens) of the distilled
    profiles."""
    from reclm.distributed import refuse_data_parallel
    from reclm.llm.model import load_tokenizer
    from reclm.llm.prompts import PromptBudget
    from reclm.llm.sft import LoraSettings, settings_from, train_lora

    refuse_data_parallel("collab tuning (its profile generation and Yes/No evaluation)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    budget, train_settings = collab_settings(budget or CollabBudget(), dict(train or {}), seed)
    prompt_budget = prompt_budget or PromptBudget()
    n = dialogues or dialogue_count(train_settings.steps, train_settings.batch_size, train_settings.holdout)
    targets = dialogue_targets(data, split, neighbours, n, seed)
    needed = sorted({*targets, *(v for u in targets for v in neighbours.get(u, ())[: budget.neighbours])})
    own_writer = None
    if profile_source == "distilled" and generate is None:
        log(f"collab: writing distilled profiles of {len(needed)} users with {init_adapter}")
        generate = own_writer = profile_writer(base_model, init_adapter, backend, progress=progress, **(writer or {}))
    try:
        profiles, counts = collect_profiles(
            data, split, teacher_users, needed, profile_source, generate, prompt_budget, out
        )
    finally:
        if own_writer is not None:
            own_writer.close()  # free the generation model before training
    built = build_dialogues(data, split, neighbours, profiles, targets, budget, load_tokenizer(base_model), seed)
    write_dialogues(out / DIALOGUES_FILE, data, built.dialogues)
    log(f"collab: {len(built.dialogues)} dialogues (Yes share {built.balance():.2f}), profiles {counts}")
    conversations = [d.messages for d in built.dialogues]
    lora_settings = settings_from(LoraSettings, dict(lora or {}))
    result = train_lora(
        conversations, out, base_model, lora_settings, train_settings, init_adapter, progress, description="collab"
    )
    summary: dict = {
        "dialogues": len(built.dialogues),
        "yes_share": built.balance(),
        "skipped": built.skipped,
        "profiles": counts,
        "negatives": {s: sum(d.negative_source == s for d in built.dialogues) for s in ("neighbours", "random")},
        "budget": budget_dict(budget),
        "train": result.to_dict(),
    }
    if evaluate:
        held = json.loads((out / "split.json").read_text())["heldout"]
        records = [built.dialogues[i].to_record(data) for i in held][:32]
        summary.update(yes_no_before_after(base_model, {"before": init_adapter, "after": result.adapter}, records))
        log(f"collab: held-out Yes/No accuracy {summary['yes_no_before']} -> {summary['yes_no_after']}")
    (out / "collab.json").write_text(json.dumps(summary, indent=2))
    return summary
