"""LoRA supervised fine-tuning of the profile writer on conversations, loss on assistant responses only.

One training function, :func:`train_lora`, serves every stage that tunes the generator: the distillation
SFT on teacher pairs (:func:`train_sft`), the collaborative two-turn dialogues and the item side. It is a
small loop on torch + peft rather than trl's ``SFTTrainer``: it computes the vocabulary projection only at
response positions (most of a profile prompt is not a response, and the 49k-word projection is the costliest
part of a small model's step) and groups batches by length. It steps through the LM stages' one loop
(:class:`reclm.llm.loop.TrainingLoop`), whose checkpoints let a crashed run resume at its last saved step with
the same result as an uninterrupted one.

Started by ``accelerate launch`` or ``torchrun`` (``WORLD_SIZE`` > 1) the same loop runs data-parallel
(:class:`DataParallel`): every process builds the same batches, computes a disjoint share of each step and the
LoRA gradients are summed across processes, so a step is the step one process would take on the whole batch;
only the first process writes files.

Outputs in ``out_dir``: ``adapter/`` (PEFT LoRA), ``metrics.json`` (train-loss curve, held-out loss before,
during and after, steps, seconds, tokens), ``split.json`` (held-out example indices) and ``checkpoint/``.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from reclm.distributed import is_main_process, world_size
from reclm.llm.chat import IGNORE_INDEX, Conversation, TrainingExample, pair_conversation, training_example
from reclm.llm.loop import Checkpointing, LengthGroupedBatches, TrainingLoop
from reclm.llm.model import (
    DEFAULT_MODEL,
    default_dtype,
    load_tokenizer,
    model_identity,
    resolve_device,
    resolve_model_dir,
)
from reclm.progress import step_progress
from reclm.utils import available_cores, torch_threads


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        if self.r < 1 or self.alpha < 1 or not 0 <= self.dropout < 1 or not self.target_modules:
            raise ValueError(f"bad LoRA settings {self}: need r >= 1, alpha >= 1, 0 <= dropout < 1, target modules")


@dataclass
class TrainSettings:
    """``steps``: optimizer steps (0/None: ``epochs`` passes over the training examples)."""

    steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    warmup: float = 0.05  # share of the steps with a linear warm-up
    schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_seq_len: int = 512  # longer examples are skipped (and counted), never cut mid-response
    micro_batch_tokens: int | None = 2048  # a batch is run in pieces of at most this many padded tokens (memory)
    holdout: float = 0.1
    seed: int = 0
    eval_every: int = 50  # held-out loss every N steps (0: only before and after)
    save_every: int = 25  # checkpoint every N steps (0: only at the end)
    eval_batch_size: int = 16
    max_eval_examples: int | None = 32  # held-out examples for the loss (seeded subset; a forward each, twice)
    gradient_checkpointing: bool = False
    threads: int | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule {self.schedule!r}: expected cosine, linear or constant")
        if self.batch_size < 1 or self.grad_accum < 1 or self.lr <= 0 or not 0 <= self.holdout < 1:
            raise ValueError("need batch_size >= 1, grad_accum >= 1, lr > 0 and 0 <= holdout < 1")
        if not self.steps and self.epochs <= 0:
            raise ValueError("give steps > 0 or epochs > 0")

    # Settings that do not change what a step computes: a resumed run may change them.
    RESUMABLE = (
        "steps", "epochs", "eval_every", "save_every", "threads", "device", "eval_batch_size", "micro_batch_tokens",
    )  # fmt: skip


@dataclass
class TrainResult:
    out_dir: str
    adapter: str
    steps: int
    total_steps: int
    seconds: float
    train_tokens: int
    label_tokens: int
    n_train: int
    n_heldout: int
    skipped_too_long: int
    heldout_loss_before: float | None
    heldout_loss_after: float | None
    final_train_loss: float | None
    resumed_from: int | None
    train_curve: list[tuple[int, float]] = field(default_factory=list)
    eval_curve: list[tuple[int, float]] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- data


def holdout_split(
    n: int, fraction: float, seed: int, groups: Sequence[str] | None = None
) -> tuple[list[int], list[int]]:
    """Seeded ``(train, heldout)`` positions: about ``round(fraction * n)`` held out (at least one when asked and
    n > 1). With ``groups`` (one key per position, e.g. the prompt), a group is never split: identical prompts are
    common (on MIND 57,128 users share 14,351 train histories), and a held-out prompt also seen in training would
    make the held-out loss a training loss."""
    if groups is None:
        groups = [str(i) for i in range(n)]
    if len(groups) != n:
        raise ValueError(f"{len(groups)} group keys for {n} examples")
    members: dict[str, list[int]] = {}
    for position, key in enumerate(groups):
        members.setdefault(key, []).append(position)
    keys = list(members)
    k = round(fraction * n)
    if fraction > 0 and len(keys) > 1:
        k = max(k, 1)
    held: list[int] = []
    for g in np.random.default_rng(seed).permutation(len(keys)):
        group = members[keys[g]]
        if len(held) >= k or len(held) + len(group) >= n:
            continue
        held += group
    held_set = set(held)
    return [i for i in range(n) if i not in held_set], sorted(held)


def prompt_key(conversation: Conversation) -> str:
    """Everything but the responses: conversations with equal keys differ only in what the model must write."""
    return json.dumps([m["content"] for m in conversation if m["role"] != "assistant"])


def length_grouped_batches(indices: Sequence[int], lengths: Sequence[int], batch_size: int, seed: int) -> list[list]:
    """Shuffled batches of similar lengths (little padding): shuffle, sort within windows of 32 batches,
    cut into batches, shuffle the batches. Deterministic for a seed, so a resumed epoch sees the same batches."""
    rng = np.random.default_rng(seed)
    shuffled = [indices[i] for i in rng.permutation(len(indices))]
    window = batch_size * 32
    batches = []
    for start in range(0, len(shuffled), window):
        part = sorted(shuffled[start : start + window], key=lambda i: lengths[i])
        batches += [part[k : k + batch_size] for k in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def micro_batches(batch: list, lengths: Sequence[int], max_tokens: int | None) -> list[list]:
    """``batch`` cut into equal pieces of at most ``max_tokens`` padded tokens (one example at least): the
    step's gradient is the same (losses are summed, then divided by the step's label count), memory is not."""
    if not max_tokens:
        return [batch]
    width = max(lengths[i] for i in batch)
    pieces = min(len(batch), math.ceil(len(batch) * width / max_tokens))
    size = math.ceil(len(batch) / pieces)
    return [batch[k : k + size] for k in range(0, len(batch), size)]


def collate(examples: Sequence[TrainingExample], pad_id: int, device: str) -> dict[str, Any]:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``labels`` tensors (labels -100 on padding)."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


# ---------------------------------------------------------------- model pieces


def response_loss(model: Any, batch: dict[str, Any]) -> Any:
    """Summed next-token cross-entropy over labelled positions; the LM head runs on those positions only."""
    import torch.nn.functional as F

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    if decoder is None or head is None or getattr(base.config, "final_logit_softcapping", None):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        return F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum")
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    states = hidden.last_hidden_state[:, :-1][keep]
    return F.cross_entropy(head(states).float(), targets[keep], reduction="sum")


def heldout_loss(
    model: Any,
    examples: Sequence[TrainingExample],
    pad_id: int,
    device: str,
    batch_size: int,
    dp: DataParallel | None = None,
) -> float:
    """Mean response-token loss over ``examples`` (token-weighted), in eval mode. With ``dp``, each process
    computes its share of the batches and the sums are added up: every process gets the whole loss."""
    import torch

    if not examples:
        return float("nan")
    dp = dp or DataParallel()
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    total, count = 0.0, 0
    with torch.no_grad():
        for start in dp.share(range(0, len(order), batch_size)):
            chunk = [examples[i] for i in order[start : start + batch_size]]
            total += response_loss(model, collate(chunk, pad_id, device)).item()
            count += sum(e.n_label_tokens for e in chunk)
    model.train(was_training)
    total, count = dp.sum_values([total, count])
    return total / max(count, 1)


def build_peft_model(folder: Path, device: str, lora: LoraSettings, train: TrainSettings, init_adapter: Any) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=default_dtype(device))
    base.config.use_cache = False
    if train.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if init_adapter is not None:
        model = PeftModel.from_pretrained(base, str(init_adapter), is_trainable=True)
    else:
        config = LoraConfig(
            task_type="CAUSAL_LM",
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
        )
        model = get_peft_model(base, config)
    return model.to(device)


# ---------------------------------------------------------------- data parallel


@dataclass(frozen=True)
class DataParallel:
    """Which share of each step this process computes, and the sums across processes. ``DataParallel()`` is a
    single process (the share is everything, every collective is a no-op), so the loop has one code path.

    Every process builds the same length-grouped batches from the same seed and takes every ``world``-th example
    of each batch; LoRA gradients (small) and losses are summed with ``all_reduce``, and the loss is divided by
    the step's label tokens counted over all processes, so clipping, AdamW and the schedule see the same
    gradient as one process would and the parameters stay identical on every process. ``device`` is where this
    process trains (``cuda:LOCAL_RANK`` on GPUs) and where the reduced tensors live."""

    rank: int = 0
    world: int = 1
    local_world: int = 1
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence) -> list:
        """This process's part of ``items``: every ``world``-th, from position ``rank`` (all of them alone)."""
        return list(items) if self.world == 1 else list(items)[self.rank :: self.world]

    def sum_values(self, values: list[float]) -> list[float]:
        """``values`` summed over the processes (float64)."""
        if self.world == 1:
            return values
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def sum_grads(self, params: list, loss_sum: float) -> float:
        """Sum the gradients of ``params`` (missing ones as zeros: a process may have had no example) and
        ``loss_sum`` over the processes, in one float32 ``all_reduce``; returns the summed loss."""
        if self.world == 1:
            return loss_sum
        import torch
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.tensor([loss_sum], device=grads[0].device)])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset : offset + g.numel()].view_as(g).to(p.dtype)
            offset += g.numel()
        return float(flat[-1])

    def broadcast(self, params: list) -> None:
        """The first process's values of ``params`` everywhere (same start even if an initialisation differed)."""
        if self.world == 1:
            return
        import torch
        import torch.distributed as dist

        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def reseed(self, seed: int, step: int) -> None:
        """Several processes: a torch seed per (seed, step, process) before each step, so dropout masks differ
        between processes and a resumed run draws the ones the uninterrupted run drew (the checkpoint holds the
        first process's random state only). One process: nothing (its random state is checkpointed)."""
        if self.world > 1:
            import torch

            torch.manual_seed(int(np.random.SeedSequence([seed, step, self.rank]).generate_state(1)[0]))

    def threads(self, requested: int | None) -> int:
        """Torch threads: ``requested``, ``RECLM_THREADS``, else the cores divided among this machine's processes."""
        if self.world > 1 and not requested and not os.environ.get("RECLM_THREADS"):
            requested = max(1, available_cores() // self.local_world)
        return torch_threads(requested)


def data_parallel(device: str) -> DataParallel:
    """This process's place in the launch (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, as
    ``accelerate launch`` and ``torchrun`` set them), joining the process group (nccl on CUDA, gloo on CPU)
    unless already joined; ``device`` ``cuda`` becomes ``cuda:LOCAL_RANK``. One process: ``DataParallel``
    on ``device``."""
    world = world_size()
    if world == 1:
        if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") and "MASTER_PORT" in os.environ:
            print(
                "warning: accelerate launch --cpu started ONE process (accelerate runs several CPU processes only "
                "through MPI); for N CPU processes use --multi_gpu or examples/accelerate-cpu.yaml (torchrun)",
                file=sys.stderr,
            )
        return DataParallel(device=device)
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK") or 0)
    if device == "cuda":
        device = f"cuda:{local_rank}"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        atexit.register(dist.destroy_process_group)
    rank, local_world = int(os.environ.get("RANK") or 0), int(os.environ.get("LOCAL_WORLD_SIZE") or world)
    return DataParallel(rank, world, local_world, device)


def run_fingerprint(conversations: Sequence[Conversation], model_id: str, lora: LoraSettings, train: TrainSettings,
                    init_adapter: Any) -> str:  # fmt: skip
    """What a checkpoint must match to be resumed: data, base model, LoRA and step-defining settings."""
    settings = {k: v for k, v in asdict(train).items() if k not in TrainSettings.RESUMABLE}
    h = hashlib.sha256()
    h.update(json.dumps([model_id, asdict(lora), settings, str(init_adapter)], sort_keys=True).encode())
    h.update(json.dumps(list(conversations), sort_keys=True).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- the loop


@dataclass
class ExampleSplit:
    """Tokenised examples and the positions used for training, held out, and evaluated (a held-out subset)."""

    examples: list[TrainingExample]
    train: list[int]
    heldout: list[int]
    eval: list[int]
    skipped_too_long: int
    lengths: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.lengths = [len(e.input_ids) for e in self.examples]

    @property
    def eval_examples(self) -> list[TrainingExample]:
        return [self.examples[i] for i in self.eval]


def split_examples(tokenizer: Any, conversations: Sequence[Conversation], train: TrainSettings) -> ExampleSplit:
    """Tokenise, drop what does not fit ``max_seq_len``, hold out whole prompt groups, pick the eval subset."""
    examples = [training_example(tokenizer, c) for c in conversations]
    usable = [i for i, e in enumerate(examples) if len(e.input_ids) <= train.max_seq_len and e.n_label_tokens]
    if not usable:
        raise ValueError(f"no training example fits in max_seq_len={train.max_seq_len} tokens")
    keys = [prompt_key(conversations[i]) for i in usable]
    train_pos, held_pos = holdout_split(len(usable), train.holdout, train.seed, keys)
    train_idx, held_idx = [usable[p] for p in train_pos], [usable[p] for p in held_pos]
    eval_idx = held_idx
    if train.max_eval_examples is not None and len(held_idx) > train.max_eval_examples:
        pick = np.random.default_rng(train.seed + 1).choice(len(held_idx), train.max_eval_examples, replace=False)
        eval_idx = sorted(held_idx[int(p)] for p in pick)
    return ExampleSplit(examples, train_idx, held_idx, eval_idx, len(examples) - len(usable))


def total_steps(train: TrainSettings, n_train: int) -> int:
    """``steps``, or the optimizer steps of ``epochs`` passes over ``n_train`` examples."""
    if train.steps:
        return int(train.steps)
    steps_per_epoch = math.ceil(math.ceil(n_train / train.batch_size) / train.grad_accum)
    return max(1, math.ceil(train.epochs * steps_per_epoch))


def make_optimizer(model: Any, train: TrainSettings, total: int) -> tuple[list, Any, Any]:
    """The trainable parameters, AdamW over them and the learning-rate schedule over ``total`` steps."""
    import torch
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    schedule = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[train.schedule]
    return params, optimizer, get_scheduler(schedule, optimizer, int(train.warmup * total), total)


def fresh_state() -> dict[str, Any]:
    """What SFT adds to the loop state a checkpoint saves: counters and the held-out curve (the fingerprint is
    added by :class:`Checkpointing` on saving)."""
    return {
        "train_tokens": 0,
        "label_tokens": 0,
        "eval_curve": [],
        "heldout_loss_before": None,
    }


@dataclass
class LoraRun:
    """What one optimizer step needs: the model, its optimizer and schedule, the data and the settings."""

    model: Any
    params: list
    optimizer: Any
    scheduler: Any
    data: ExampleSplit
    train: TrainSettings
    pad_id: int
    device: str
    dp: DataParallel = field(default_factory=DataParallel)

    def heldout_loss(self) -> float:
        examples, batch = self.data.eval_examples, self.train.eval_batch_size
        return heldout_loss(self.model, examples, self.pad_id, self.device, batch, self.dp)

    def step(self, group: list[list[int]], state: dict) -> float:
        """One optimizer step on the batches in ``group`` (this process's share of each, run in memory-bounded
        pieces); updates the token counters in ``state`` and returns the step's mean loss per label token (all
        processes' examples: the counters and curves are the same in every process)."""
        import torch

        examples, lengths, max_tokens = self.data.examples, self.data.lengths, self.train.micro_batch_tokens
        everything = [examples[i] for batch in group for i in batch]
        n_labels = sum(e.n_label_tokens for e in everything)
        shares = [self.dp.share(batch) for batch in group]
        pieces = [piece for share in shares if share for piece in micro_batches(share, lengths, max_tokens)]
        self.dp.reseed(self.train.seed, state["step"])
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for piece in pieces:
            loss = response_loss(self.model, collate([examples[i] for i in piece], self.pad_id, self.device))
            (loss / n_labels).backward()
            loss_sum += loss.detach().item()
        loss_sum = self.dp.sum_grads(self.params, loss_sum)
        if self.train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.train.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        state["train_tokens"] += sum(len(e.input_ids) for e in everything)
        state["label_tokens"] += n_labels
        return loss_sum / n_labels


def lora_loop(run: LoraRun, out_dir: Path, fingerprint: str) -> TrainingLoop:
    """The training loop over ``run``: epochs of length-grouped batches (``grad_accum`` per step), a checkpoint
    every ``save_every`` steps and at the end (only the first process writes)."""
    train, lengths, indices = run.train, run.data.lengths, run.data.train

    def epoch_batches(epoch: int) -> list[list[int]]:
        return length_grouped_batches(indices, lengths, train.batch_size, train.seed + epoch)

    return TrainingLoop(
        run.model,
        run.optimizer,
        LengthGroupedBatches(epoch_batches, train.grad_accum),
        Checkpointing(out_dir, fingerprint, every=train.save_every or 0),
        scheduler=run.scheduler,
        writes=run.dp.main,
    )


def held_out_every(run: LoraRun, state: dict, total: int) -> Callable[[int], None]:
    """After a step: the held-out loss every ``eval_every`` steps and at the last one."""

    def measure(step: int) -> None:
        every = run.train.eval_every
        if (every and step % every == 0) or step >= total:
            state["eval_curve"].append((step, run.heldout_loss()))

    return measure


def train_lora(
    conversations: Sequence[Conversation],
    out_dir: str | Path,
    model: str | os.PathLike = DEFAULT_MODEL,
    lora: LoraSettings | None = None,
    train: TrainSettings | None = None,
    init_adapter: str | os.PathLike | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    description: str = "sft",
) -> TrainResult:
    """LoRA-tune ``model`` on ``conversations`` (loss on every assistant turn); resumes from ``out_dir/checkpoint``.

    ``init_adapter`` starts from an existing adapter (e.g. the SFT one for collaborative tuning).
    ``on_step(step, loss)`` is called after each optimizer step (in every process of a data-parallel launch).
    ``description`` names the progress bar. Under ``accelerate launch`` / ``torchrun`` the steps are shared
    by the processes (:class:`DataParallel`); the first one writes the files and every one returns the result.
    """
    import torch

    lora, train = lora or LoraSettings(), train or TrainSettings()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dp = data_parallel(resolve_device(train.device))
    device = dp.device
    threads = dp.threads(train.threads)
    folder = resolve_model_dir(model)
    tokenizer = load_tokenizer(folder, padding_side="right")
    data = split_examples(tokenizer, conversations, train)
    if dp.main:
        split = {"train": data.train, "heldout": data.heldout, "eval": data.eval}
        (out_dir / "split.json").write_text(json.dumps(split))

    torch.manual_seed(train.seed)
    peft_model = build_peft_model(folder, device, lora, train, init_adapter)
    peft_model.train()
    total = total_steps(train, len(data.train))
    params, optimizer, scheduler = make_optimizer(peft_model, train, total)
    run = LoraRun(peft_model, params, optimizer, scheduler, data, train, tokenizer.pad_token_id, device, dp)

    fingerprint = run_fingerprint(conversations, model_identity(folder), lora, train, init_adapter)
    loop = lora_loop(run, out_dir, fingerprint)
    state, resumed_from = loop.start(fresh_state())
    dp.broadcast(params)
    dp.barrier()  # every process has read the checkpoint before the first one may replace it
    if resumed_from is None:
        state["heldout_loss_before"] = run.heldout_loss()
        state["eval_curve"].append((0, state["heldout_loss_before"]))

    measure = held_out_every(run, state, total)
    with step_progress(description, total, enabled=progress and dp.main) as update:

        def after_step(step: int, loss: float) -> None:
            update(step, f"loss {loss:.3f}")
            if on_step is not None:
                on_step(step, loss)
            measure(step)

        loop.run(state, total, run.step, after_step)
    adapter_dir = out_dir / "adapter"
    if dp.main:
        shutil.rmtree(adapter_dir, ignore_errors=True)
        peft_model.save_pretrained(adapter_dir)
        tokenizer.save_pretrained(adapter_dir)

    extra = {
        "model": str(model),
        "model_identity": model_identity(folder),
        "init_adapter": str(init_adapter) if init_adapter else None,
        "lora": asdict(lora),
        "train": asdict(train),
        "device": device,
        "threads": threads,
        "processes": dp.world,
        "n_eval": len(data.eval),
        "tokens_per_s": round(state["train_tokens"] / max(state["seconds"], 1e-9), 1),
    }
    result = train_result(out_dir, adapter_dir, state, total, data, resumed_from, extra)
    if dp.main:
        (out_dir / "metrics.json").write_text(json.dumps(result.to_dict(), indent=2))
    dp.barrier()  # the files exist when any process returns
    return result


def train_result(
    out_dir: Path, adapter_dir: Path, state: dict, total: int, data: ExampleSplit, resumed_from: int | None, extra: dict
) -> TrainResult:
    return TrainResult(
        out_dir=str(out_dir),
        adapter=str(adapter_dir),
        steps=state["step"],
        total_steps=total,
        seconds=round(state["seconds"], 2),
        train_tokens=state["train_tokens"],
        label_tokens=state["label_tokens"],
        n_train=len(data.train),
        n_heldout=len(data.heldout),
        skipped_too_long=data.skipped_too_long,
        heldout_loss_before=state["heldout_loss_before"],
        heldout_loss_after=state["eval_curve"][-1][1],
        final_train_loss=state["history"][-1] if state["history"] else None,
        resumed_from=resumed_from,
        train_curve=list(enumerate(state["history"], start=1)),
        eval_curve=[tuple(x) for x in state["eval_curve"]],
        extra=extra,
    )


# ---------------------------------------------------------------- distillation SFT on teacher records


def settings_from(cls: type, options: dict[str, Any]) -> Any:
    """Build a settings dataclass from a dict, rejecting unknown keys with a one-line error."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} option(s) {unknown}; known: {sorted(known)}")
    return cls(**options)


def teacher_conversations(path: str | Path) -> tuple[list[Conversation], list[tuple[str, str]]]:
    """One-turn conversations (prompt -> profile) from a teacher records file, and their ``(kind, id)``."""
    from reclm.llm.records import read_records

    records = [r for r in read_records(path) if r.profile.strip()]
    if not records:
        raise ValueError(f"{path}: no teacher records with a profile to train on")
    return [pair_conversation(r.prompt, r.profile) for r in records], [(r.kind, r.id) for r in records]


def train_sft(
    teacher_dir: str | Path,
    out_dir: str | Path,
    base_model: str | os.PathLike = DEFAULT_MODEL,
    lora: dict | LoraSettings | None = None,
    kind: str = "user",
    progress: bool = True,
    **options: Any,
) -> TrainResult:
    """Distillation SFT on ``teacher_dir/{users,items}.jsonl`` (``kind``): writes the adapter, metrics and
    ``heldout.json`` (``{"user": [raw ids], "item": [...]}``, what the quality report compares against)."""
    if kind not in ("user", "item"):
        raise ValueError(f"kind {kind!r}: expected user or item")
    path = Path(teacher_dir) / f"{kind}s.jsonl"
    conversations, keys = teacher_conversations(path)
    lora_settings = lora if isinstance(lora, LoraSettings) else settings_from(LoraSettings, dict(lora or {}))
    train = settings_from(TrainSettings, options)
    result = train_lora(conversations, out_dir, base_model, lora_settings, train, progress=progress)
    result.extra["teacher_file"] = str(path)
    if is_main_process():
        held = json.loads((Path(out_dir) / "split.json").read_text())["heldout"]
        heldout = {"user": [], "item": []}
        for i in held:
            heldout[keys[i][0]].append(keys[i][1])
        (Path(out_dir) / "heldout.json").write_text(json.dumps(heldout))
        (Path(out_dir) / "metrics.json").write_text(json.dumps(result.to_dict(), indent=2))
    return result
