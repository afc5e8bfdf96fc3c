"""Preference pairs and the reward model that scores a profile given the user's prompt.

Pairs come from users NOT used for SFT (so the reward model judges profiles the writer was not fitted on).
For each user: ``chosen`` is a good profile (teacher or distilled); ``rejected`` is one of the paper's
negative kinds, in its proportions (exact counts by largest remainder, then shuffled):

| kind              | share | rejected profile                                        |
|-------------------|-------|---------------------------------------------------------|
| ``neighbour``     | 30%   | a similar user's profile (another user's if none has one)|
| ``concat``        | 30%   | own profile + the neighbour's profile                   |
| ``identity_only`` | 10%   | ``User identity: A, B, C`` (interests dropped)          |
| ``identity_dup``  | 10%   | the identity part written twice, no interests           |
| ``identity_empty``| 10%   | ``User identity: ``                                     |
| ``dot``           | 10%   | ``.``                                                   |

The reward model is the base causal LM as ``AutoModelForSequenceClassification`` (one label) with LoRA
(the score head is trained in full), reading the chat-rendered (prompt, profile) conversation, trained
with the pairwise loss ``-log sigmoid(r_chosen - r_rejected)``. Accuracy is reported on held-out USERS
per negative kind and averaged over kinds.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from reclm.data.dataset import RecDataset
from reclm.data.split import Split
from reclm.distributed import refuse_data_parallel
from reclm.llm.chat import SYSTEM_PROMPT, as_conversation, render
from reclm.llm.loop import Checkpointing, ShuffledBatches, TrainingLoop, before_training
from reclm.llm.prompts import PromptBudget, parse_profile, user_histories
from reclm.utils import atomic_write, write_json

NEGATIVE_SHARES: dict[str, float] = {
    "neighbour": 0.3,
    "concat": 0.3,
    "identity_only": 0.1,
    "identity_dup": 0.1,
    "identity_empty": 0.1,
    "dot": 0.1,
}
NEGATIVE_KINDS = tuple(NEGATIVE_SHARES)
PAIRS_FILE = "pairs.jsonl"


# ---------------------------------------------------------------- negatives


def allocate_kinds(n: int, rng: np.random.Generator, shares: Mapping[str, float] = NEGATIVE_SHARES) -> list[str]:
    """``n`` negative kinds in the given proportions: floor counts, the remainder to the largest fractions
    (ties in table order), then shuffled."""
    total = sum(shares.values())
    exact = {k: n * v / total for k, v in shares.items()}
    counts = {k: int(math.floor(x)) for k, x in exact.items()}
    left = n - sum(counts.values())
    for k in sorted(shares, key=lambda k: -(exact[k] - counts[k]))[:left]:
        counts[k] += 1
    kinds = [k for k in shares for _ in range(counts[k])]
    rng.shuffle(kinds)
    return kinds


def identity_part(profile: str) -> str:
    """``User identity: A, B, C`` of a profile (the text before the interests when it does not parse)."""
    parsed = parse_profile(profile)
    if parsed:
        return "User identity: " + ", ".join(parsed[0])
    head = profile.split(";")[0].strip().rstrip(".")
    return head if head.lower().startswith("user identit") else "User identity: " + head


def make_negative(kind: str, own: str, other: str | None) -> str:
    """The rejected profile of ``kind`` for a user whose good profile is ``own`` (``other``: a neighbour's)."""
    own = " ".join(own.split())
    if kind == "neighbour":
        if other is None:
            raise ValueError("a 'neighbour' negative needs another user's profile")
        return " ".join(other.split())
    if kind == "concat":
        if other is None:
            raise ValueError("a 'concat' negative needs another user's profile")
        return f"{own} {' '.join(other.split())}"
    if kind == "identity_only":
        return identity_part(own)
    if kind == "identity_dup":
        part = identity_part(own)
        return f"{part}; {part}"
    if kind == "identity_empty":
        return "User identity: "
    if kind == "dot":
        return "."
    raise ValueError(f"negative kind {kind!r}: expected one of {', '.join(NEGATIVE_KINDS)}")


@dataclass
class PreferencePair:
    user: int
    prompt: str
    chosen: str
    rejected: str
    negative: str
    other: int | None = None  # whose profile the neighbour / concat negative used
    items: list[int] = field(default_factory=list)  # the history items the prompt may show

    def to_record(self, data: RecDataset) -> dict:
        return {
            "kind": "user",
            "id": data.user_ids[self.user],
            "prompt": self.prompt,
            "chosen": self.chosen,
            "rejected": self.rejected,
            "negative": self.negative,
            "other": None if self.other is None else data.user_ids[self.other],
            "items": {data.user_ids[self.user]: [data.item_ids[i] for i in self.items]},
        }

    @classmethod
    def from_record(cls, record: dict, data: RecDataset) -> PreferencePair:
        users, items = data.user_index(), data.item_index()
        listed = next(iter(record.get("items", {}).values()), [])
        other = record.get("other")
        return cls(
            users[str(record["id"])],
            record["prompt"],
            record["chosen"],
            record["rejected"],
            record["negative"],
            None if other is None else users[str(other)],
            [items[str(i)] for i in listed],
        )


def build_pairs(
    data: RecDataset,
    split: Split,
    chosen: Mapping[int, str],
    users: Sequence[int],
    neighbours: Mapping[int, Sequence[int]],
    budget: PromptBudget | None = None,
    seed: int = 0,
    pool: Mapping[int, str] | None = None,
) -> list[PreferencePair]:
    """One pair per user in ``users`` that has a train history and a ``chosen`` profile.

    ``pool``: profiles the neighbour negatives may use (default ``chosen``); a user's first neighbour with a
    profile in the pool is used, else a random other user of the pool."""
    budget = budget or PromptBudget()
    pool = dict(pool if pool is not None else chosen)
    rng = np.random.default_rng(seed)
    histories = user_histories(data, split)
    eligible = [int(u) for u in users if int(u) in chosen and len(histories[int(u)])]
    kinds = allocate_kinds(len(eligible), rng)
    pool_users = np.array(sorted(pool), dtype=np.int64)
    pairs = []
    for u, kind in zip(eligible, kinds):
        other = None
        if kind in ("neighbour", "concat"):
            own = normalised(chosen[u])
            # a neighbour whose profile reads the same (two users with the same history) is no negative
            near = [
                int(v)
                for v in neighbours.get(u, ())
                if int(v) != u and int(v) in pool and normalised(pool[int(v)]) != own
            ]
            if near:
                other = near[0]
            else:
                candidates = [int(v) for v in pool_users if int(v) != u and normalised(pool[int(v)]) != own]
                if not candidates:
                    raise ValueError("neighbour negatives need profiles of at least two users that differ")
                other = int(rng.choice(candidates))
        history = [int(i) for i in histories[u]]
        shown = history[-budget.max_items :] if budget.max_items else history
        rejected = make_negative(kind, chosen[u], pool.get(other) if other is not None else None)
        pairs.append(PreferencePair(u, budget.user_prompt(data, history, u), chosen[u], rejected, kind, other, shown))
    return pairs


def normalised(profile: str) -> str:
    return " ".join(profile.split()).lower()


def kind_counts(pairs: Sequence[PreferencePair]) -> dict[str, int]:
    return {k: sum(p.negative == k for p in pairs) for k in NEGATIVE_KINDS}


def split_by_user(pairs: Sequence[PreferencePair], eval_share: float, seed: int) -> tuple[list, list]:
    """(train, eval) pairs; a user's pairs all go to one side."""
    users = sorted({p.user for p in pairs})
    rng = np.random.default_rng(seed)
    n_eval = int(round(eval_share * len(users)))
    held = set(rng.choice(users, size=n_eval, replace=False).tolist()) if n_eval else set()
    return [p for p in pairs if p.user not in held], [p for p in pairs if p.user in held]


def write_pairs(path: Path, data: RecDataset, pairs: Sequence[PreferencePair], split_of: Mapping[int, str]) -> int:
    with atomic_write(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for p in pairs:
            handle.write(json.dumps({**p.to_record(data), "split": split_of.get(p.user, "train")}) + "\n")
    return len(pairs)


def read_pairs(path: Path, data: RecDataset) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, eval) pairs of a ``pairs.jsonl``."""
    from reclm.data.tables import read_jsonl

    train, held = [], []
    for record in read_jsonl(path, ["id", "prompt", "chosen", "rejected", "negative"]):
        (held if record.get("split") == "eval" else train).append(PreferencePair.from_record(record, data))
    return train, held


# ---------------------------------------------------------------- the reward model


@dataclass
class RewardConfig:
    """Reward-model training; the fields the pipeline's ``llm.reward`` also has share its defaults."""

    steps: int = 10
    batch_size: int = 4  # pairs per step
    lr: float = 2e-4
    head_lr: float | None = None  # default: 10 x lr
    max_seq_len: int = 512
    seed: int = 0
    eval_batch_size: int = 16
    micro_batch: int = 4  # pairs per forward pass (gradients accumulate over the step's pairs): bounds memory
    lora: dict = field(default_factory=lambda: {"r": 8, "alpha": 16, "dropout": 0.05})
    # LoRA only in the top N decoder layers (None: all): backward stops there, about 2x cheaper steps on a CPU
    lora_layers: int | None = None
    device: str | None = None


def pad_token_for(tokenizer) -> int:
    """A padding id that never occurs in rendered chat text: ``<|endoftext|>`` when the tokenizer has it
    and the template does not use it, else the tokenizer's pad (or eos) token."""
    candidate = tokenizer.convert_tokens_to_ids("<|endoftext|>") if "<|endoftext|>" in tokenizer.get_vocab() else None
    template = getattr(tokenizer, "chat_template", "") or ""
    if candidate is not None and "<|endoftext|>" not in template:
        return int(candidate)
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


def load_reward_model(base_model: str, adapter: str | Path | None = None, config: RewardConfig | None = None):
    """(model, tokenizer): the base LM with a one-output score head; a saved reward adapter is loaded when
    given, else a fresh trainable LoRA is added."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from reclm.llm.model import default_dtype, load_tokenizer, resolve_device, resolve_model_dir, without_load_report

    config = config or RewardConfig()
    folder = resolve_model_dir(base_model)
    device = resolve_device(config.device)
    tokenizer = load_tokenizer(folder, padding_side="right")
    pad = pad_token_for(tokenizer)
    torch.manual_seed(config.seed)  # the new score head's initial weights
    with without_load_report():  # the score head is new: seeded here, or restored from the adapter below
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=1, dtype=default_dtype(device) if device != "cpu" else torch.float32
        )
    model.config.pad_token_id = pad
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    else:
        lora = config.lora
        layers = None
        if config.lora_layers:
            total = int(model.config.num_hidden_layers)
            layers = list(range(max(0, total - config.lora_layers), total))
        peft_config = LoraConfig(
            task_type="SEQ_CLS",
            r=int(lora.get("r", 8)),
            lora_alpha=int(lora.get("alpha", 16)),
            lora_dropout=float(lora.get("dropout", 0.05)),
            target_modules=list(lora.get("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj"])),
            layers_to_transform=layers,
        )
        torch.manual_seed(config.seed)
        model = get_peft_model(model, peft_config)
    model.to(device)
    return model, tokenizer


def conversation_text(tokenizer, prompt: str, response: str, system: str | None = SYSTEM_PROMPT) -> str:
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return render(tokenizer, as_conversation(messages, system), add_generation_prompt=False)


def encode_batch(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_len: int, device) -> dict:
    """Right-padded ids of the rendered conversations; over-long ones lose the START of the prompt (the
    response and the most recent history stay)."""
    import torch

    pad = pad_token_for(tokenizer)
    rows = []
    for prompt, response in zip(prompts, responses):
        ids = tokenizer(conversation_text(tokenizer, prompt, response), add_special_tokens=False)["input_ids"]
        rows.append(ids[-max_len:])
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, r in enumerate(rows):
        input_ids[k, : len(r)] = torch.tensor(r)
        mask[k, : len(r)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


def last_token_scores(model, batch: dict):
    """The score head at each row's last real token (no reliance on pad-id detection)."""
    import torch

    out = model(**batch)
    logits = out.logits.squeeze(-1)
    if logits.dim() == 1:  # the model already pooled; pooling uses the pad id, which never occurs in text
        return logits
    last = batch["attention_mask"].sum(dim=1) - 1
    return logits[torch.arange(len(last)), last]


def score_texts(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], max_len: int = 512, batch=16):
    """Reward of each (prompt, response) as a float tensor (no gradient)."""
    import torch

    device = next(model.parameters()).device
    out = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(prompts), batch):
            enc = encode_batch(
                tokenizer, prompts[start : start + batch], responses[start : start + batch], max_len, device
            )
            out.append(last_token_scores(model, enc).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def pairwise_loss(chosen_scores, rejected_scores):
    """``-log sigmoid(r_chosen - r_rejected)``, averaged."""
    import torch.nn.functional as F

    return -F.logsigmoid(chosen_scores - rejected_scores).mean()


def evaluate_pairs(model, tokenizer, pairs: Sequence[PreferencePair], max_len: int, batch: int = 16) -> dict:
    """Held-out pairwise accuracy per negative kind, its mean over kinds, and overall."""
    if not pairs:
        return {"pairs": 0}
    prompts = [p.prompt for p in pairs]
    chosen = score_texts(model, tokenizer, prompts, [p.chosen for p in pairs], max_len, batch)
    rejected = score_texts(model, tokenizer, prompts, [p.rejected for p in pairs], max_len, batch)
    right = (chosen > rejected).numpy()
    per_kind = {}
    for kind in NEGATIVE_KINDS:
        rows = [k for k, p in enumerate(pairs) if p.negative == kind]
        if rows:
            per_kind[kind] = {"accuracy": round(float(right[rows].mean()), 4), "pairs": len(rows)}
    accs = [v["accuracy"] for v in per_kind.values()]
    return {
        "pairs": len(pairs),
        "accuracy": round(float(right.mean()), 4),
        "accuracy_mean_over_kinds": round(float(np.mean(accs)), 4),
        "per_kind": per_kind,
        "margin_mean": round(float((chosen - rejected).mean()), 4),
    }


def reward_fingerprint(base_model: str, config: RewardConfig, train: Sequence[PreferencePair]) -> str:
    """What a reward checkpoint must match to be resumed: base model, step-defining settings, train pairs."""
    settings = {k: v for k, v in asdict(config).items() if k not in ("device", "eval_batch_size")}
    digest = hashlib.sha256(json.dumps([str(base_model), settings], sort_keys=True, default=str).encode())
    for pair in train:  # streamed: checkpoints saved by earlier versions keep matching
        digest.update(json.dumps([pair.prompt, pair.chosen, pair.rejected]).encode())
    return digest.hexdigest()[:16]


def train_reward_model(
    model,
    tokenizer,
    train: Sequence[PreferencePair],
    config: RewardConfig,
    progress: Callable[[int, float], None] | None = None,
    checkpoints: Checkpointing | None = None,
) -> list[float]:
    """Pairwise-loss training of ``model`` (LoRA + score head) for ``config.steps`` steps; returns losses.

    With ``checkpoints``, the training state is saved as they say and a run started again resumes from it
    (and ends as an uninterrupted run would)."""
    import torch

    if not train:
        raise ValueError("no preference pairs to train the reward model on")
    device = next(model.parameters()).device
    head = [p for n, p in model.named_parameters() if p.requires_grad and "score" in n]
    body = [p for n, p in model.named_parameters() if p.requires_grad and "score" not in n]
    optimizer = torch.optim.AdamW(
        [{"params": body, "lr": config.lr}, {"params": head, "lr": config.head_lr or 10 * config.lr}],
        weight_decay=0.0,
    )
    loop = TrainingLoop(model, optimizer, ShuffledBatches(len(train), config.batch_size, config.seed, full=True),
                        checkpoints or Checkpointing())  # fmt: skip
    state, _ = loop.start()

    def step(rows: list[int], _state: dict) -> float:
        batch = [train[k] for k in rows]
        optimizer.zero_grad()
        loss = 0.0
        for start in range(0, len(batch), max(1, config.micro_batch)):
            part = batch[start : start + max(1, config.micro_batch)]
            prompts = [p.prompt for p in part]
            responses = [p.chosen for p in part] + [p.rejected for p in part]
            enc = encode_batch(tokenizer, prompts + prompts, responses, config.max_seq_len, device)
            scores = last_token_scores(model, enc).float()
            part_loss = pairwise_loss(scores[: len(part)], scores[len(part) :]) * len(part) / len(batch)
            part_loss.backward()
            loss += float(part_loss.detach())
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
        optimizer.step()
        return loss

    model.train()
    after = None if progress is None else (lambda s, loss: progress(s - 1, loss))
    losses = loop.run(state, config.steps, step, after)["history"]
    model.eval()
    return losses


# ---------------------------------------------------------------- the stage


@dataclass
class RewardResult:
    pairs: dict
    before: dict
    after: dict
    losses: list[float]
    seconds: float
    adapter: str

    def to_dict(self) -> dict:
        return asdict(self)


def chosen_profiles(
    data: RecDataset,
    path: Path,
    exclude: set[str] | None = None,
    shipped: bool = True,
) -> dict[int, str]:
    """``{user index: good profile}`` of users not in ``exclude`` (raw ids used for SFT).

    ``path``: the run's user profiles (its teacher's, or the distilled ``profiles/users.jsonl``); ``shipped``:
    plus the dataset's shipped teacher profiles of users ``path`` lacks (for teacher profiles)."""
    from reclm.data.tables import read_jsonl
    from reclm.llm.records import read_profiles

    exclude = exclude or set()
    index = data.user_index()
    found: dict[str, str] = {}
    if path.is_file():
        found.update(read_profiles(path, "user"))
    resource = data.resources.get("teacher_user_profiles")
    if shipped and resource is not None:
        for record in read_jsonl(Path(resource), ["user", "profile"]):
            found.setdefault(str(record["user"]), str(record["profile"]).strip())
    return {index[raw]: p for raw, p in found.items() if raw in index and raw not in exclude and parse_profile(p)}


def sft_user_ids(teacher: Path, heldout: set[str] | None) -> set[str]:
    """Raw ids of the users whose teacher profiles the SFT stage may have trained on: the users of the
    ``teacher`` profiles file minus those SFT held out (``heldout``, see
    :meth:`reclm.rundir.RunDir.sft_heldout`); every teacher user when SFT has not run (the safe assumption)."""
    from reclm.llm.records import read_profiles

    users = set(read_profiles(teacher, "user")) if teacher.is_file() else set()
    return users - heldout if heldout is not None else users


def pool_neighbours(
    users: list[int],
    pool: list[int],
    vectors: np.ndarray | None,
    lists: Mapping[int, Sequence[int]] | None,
) -> tuple[Mapping[int, Sequence[int]], str]:
    """Neighbours for the neighbour / concat negatives: the nearest users (by the run's CF user ``vectors``)
    among those with a profile; else the run's neighbour ``lists``; else none (a random other user is used)."""
    from reclm.llm.neighbours import nearest_among

    if vectors is not None:
        return nearest_among(vectors, users, pool, 10), "nearest CF users with a profile"
    if lists is not None:
        return lists, "the run's neighbour lists"
    return {}, "random other users (no neighbours in this run)"


def run_reward(
    data: RecDataset,
    split: Split,
    base_model: str,
    out: Path,
    profiles: Path,
    sft_users: set[str],
    config: RewardConfig | None = None,
    source: str = "teacher",
    max_pairs: int | None = None,
    eval_share: float = 0.2,
    budget: PromptBudget | None = None,
    neighbours: Mapping[int, Sequence[int]] | None = None,
    user_vectors: np.ndarray | None = None,
    neighbour_lists: Mapping[int, Sequence[int]] | None = None,
    log: Callable[[str], None] = print,
) -> RewardResult:
    """Build the pairs (``out/pairs.jsonl``), train the reward model (``out/adapter``) and report held-out
    accuracy before and after training (``out/metrics.json``).

    ``profiles``: the ``source`` user profiles (teacher or distilled) the good profiles come from, of users not
    in ``sft_users`` (raw ids SFT may have trained on). Neighbour negatives: ``neighbours`` when given, else
    the nearest by ``user_vectors`` (the run's CF user embeddings), else ``neighbour_lists``, else random."""
    refuse_data_parallel("the reward model")
    config = config or RewardConfig()
    out = Path(out)
    start = time.perf_counter()
    shipped = source == "teacher"
    chosen = chosen_profiles(data, profiles, exclude=sft_users, shipped=shipped)
    if len(chosen) < 2:
        raise ValueError(
            f"only {len(chosen)} users have a {source} profile and were not used for SFT: the reward model needs "
            "more (sample fewer teacher users for SFT, or use --source distilled after `reclm profile`)"
        )
    pool = chosen_profiles(data, profiles, shipped=shipped)  # any user's profile may serve as a neighbour negative
    users = sorted(chosen)
    if max_pairs is not None and max_pairs < len(users):
        users = sorted(np.random.default_rng(config.seed).choice(users, size=max_pairs, replace=False).tolist())
    neighbour_source = "given"
    if neighbours is None:
        neighbours, neighbour_source = pool_neighbours(users, sorted(pool), user_vectors, neighbour_lists)
    pairs = build_pairs(data, split, chosen, users, neighbours, budget, seed=config.seed, pool=pool)
    train, held = split_by_user(pairs, eval_share, config.seed)
    write_pairs(out / PAIRS_FILE, data, pairs, {p.user: "eval" for p in held})
    log(f"reward: {len(train)} train / {len(held)} held-out pairs, kinds {kind_counts(pairs)}")
    log(f"reward: neighbour negatives from {neighbour_source}")

    model, tokenizer = load_reward_model(base_model, config=config)
    untrained = lambda: evaluate_pairs(model, tokenizer, held, config.max_seq_len, config.eval_batch_size)  # noqa: E731
    before = before_training(out / "before.json", out, untrained)
    log(f"reward: held-out accuracy before training {before.get('accuracy_mean_over_kinds')}")
    from reclm.progress import step_progress

    with step_progress("reward", config.steps) as update:
        losses = train_reward_model(
            model, tokenizer, train, config, progress=lambda s, loss: update(s + 1, f"loss {loss:.4f}"),
            checkpoints=Checkpointing(out, reward_fingerprint(base_model, config, train), every=25),
        )  # fmt: skip
    after = evaluate_pairs(model, tokenizer, held, config.max_seq_len, config.eval_batch_size)
    model.save_pretrained(out / "adapter")
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
    result = RewardResult(
        pairs={
            "train": len(train),
            "eval": len(held),
            "kinds": kind_counts(pairs),
            "source": source,
            "excluded_sft_users": len(sft_users),
        },
        before=before,
        after=after,
        losses=losses,
        seconds=round(time.perf_counter() - start, 1),
        adapter=str(out / "adapter"),
    )
    write_json(out / "metrics.json", {**result.to_dict(), "config": asdict(config), "base_model": base_model})
    return result
