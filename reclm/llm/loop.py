"""The one training loop of the LM stages: SFT, collaborative tuning, the item writer, the reward model, DPO
and PPO all step through :class:`TrainingLoop`.

A stage gives it a model and optimizer (and schedule), a batch source that says which examples each step
takes, and a ``step`` function that makes one optimizer step on them. The loop counts the steps, keeps the
per-step records, resumes from ``checkpoint/`` (adapter, optimizer, schedule, random states, batch position,
checked against the run's fingerprint) and saves it every few steps and at the end, so a crashed stage
resumes at its last saved step and ends as an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from reclm.utils import fsync_tree

# ---------------------------------------------------------------- checkpoint files


def save_checkpoint(out_dir: Path, model: Any, optimizer: Any, scheduler: Any | None, state: dict) -> None:
    """Adapter + optimizer + scheduler (if any) + RNG + loop state, written aside then swapped in (crash-safe)."""
    import torch

    final, tmp, old = out_dir / "checkpoint", out_dir / "checkpoint.tmp", out_dir / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "state": state,
            "rng": rng,
        },
        tmp / "trainer_state.pt",
    )
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    fsync_tree(tmp)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(out_dir: Path) -> Path | None:
    for name in ("checkpoint", "checkpoint.old"):  # .old survives a crash in the middle of a swap
        path = out_dir / name
        if (path / "trainer_state.pt").is_file():
            return path
    return None


def load_trainer_state(path: Path) -> dict:
    """``trainer_state.pt`` read with ``weights_only=True``: tensors, plain data and numeric numpy arrays and
    scalars (``np.random.get_state()``, the loops' example orders), nothing whose unpickling could run code
    (object arrays included): a planted file is refused with an error."""
    from reclm.cf.trainer import load_checkpoint_file

    numeric = tuple(type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFD")  # bool, integer, float, complex
    # numpy.(_)core.multiarray._reconstruct and .scalar, as numpy 1 or 2 names them
    builders = (np.zeros(0).__reduce__()[0], np.int64(0).__reduce__()[0])
    return load_checkpoint_file(path, allow=(*builders, np.ndarray, np.dtype, *numeric))


def restore_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any | None) -> dict:
    import torch
    from peft import load_peft_weights, set_peft_model_state_dict

    set_peft_model_state_dict(model, load_peft_weights(str(path)))
    saved = load_trainer_state(path / "trainer_state.pt")
    optimizer.load_state_dict(saved["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"]["torch"])
    np.random.set_state(saved["rng"]["numpy"])
    random.setstate(saved["rng"]["python"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    return saved["state"]


def resume_checkpoint(
    folder: Path | None, model: Any, optimizer: Any, fingerprint: str, scheduler: Any | None = None
) -> dict | None:
    """Restore ``folder/checkpoint`` into ``model``, ``optimizer`` (and ``scheduler``) and the random
    states, and return the loop state saved with it; None when there is none. A checkpoint of another
    run (``fingerprint`` differs) is an error, not silently resumed."""
    found = find_checkpoint(folder) if folder is not None else None
    if found is None:
        return None
    state = restore_checkpoint(found, model, optimizer, scheduler)
    if state.get("fingerprint") != fingerprint:
        raise ValueError(f"{found} was saved by a run with other data or settings; delete it to start afresh")
    return state


@dataclass
class Checkpointing:
    """Where a training loop saves its state (``folder/checkpoint``; None: never), every how many steps, and
    the fingerprint of the run (settings, data, starting point) that a resume must match."""

    folder: Path | None = None
    fingerprint: str = ""
    every: int = 10

    def resume(self, model: Any, optimizer: Any, scheduler: Any | None = None) -> dict | None:
        """The saved loop state (model, optimizer and schedule restored), or None when there is no checkpoint."""
        return resume_checkpoint(self.folder, model, optimizer, self.fingerprint, scheduler)

    def due(self, step: int) -> bool:
        return self.folder is not None and self.every > 0 and step % self.every == 0

    def save(self, model: Any, optimizer: Any, state: dict, scheduler: Any | None = None) -> None:
        assert self.folder is not None
        save_checkpoint(self.folder, model, optimizer, scheduler, {**state, "fingerprint": self.fingerprint})


def fingerprint_of(*parts: Any) -> str:
    """A short hash of what defines a training run (settings, data, starting point)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def before_training(path: Path, checkpoint_dir: Path, measure: Callable[[], dict]) -> dict:
    """A measurement of the untrained model (``measure()``, saved to ``path``), or the saved one when
    training resumes from a checkpoint in ``checkpoint_dir`` (the model in memory is no longer untrained)."""
    if path.is_file() and find_checkpoint(checkpoint_dir) is not None:
        return json.loads(path.read_text())
    result = measure()
    path.write_text(json.dumps(result, indent=2))
    return result


# ---------------------------------------------------------------- batch sources


class Resumable(Protocol):
    """A part of the loop's state that a checkpoint saves and a resume restores."""

    def state(self) -> dict: ...

    def restore(self, state: dict) -> None: ...


class Batches(Resumable, Protocol):
    def next(self) -> Any:
        """What the next step trains on (example indices)."""


class ShuffledBatches:
    """Batches of ``size`` from reshuffled passes over ``n`` examples (seeded). ``full``: a pass ends when a
    full batch no longer fits (the reward model); else its last batch may be short (DPO)."""

    def __init__(self, n: int, size: int, seed: int, full: bool = False):
        self.n, self.size, self.full = n, size, full
        self.rng = np.random.default_rng(seed)
        self.order, self.cursor = self.rng.permutation(n), 0

    def next(self) -> list[int]:
        if self.cursor + (self.size if self.full else 1) > len(self.order):
            self.order, self.cursor = self.rng.permutation(self.n), 0
        rows = self.order[self.cursor : self.cursor + self.size].tolist()
        self.cursor += self.size
        return rows

    def state(self) -> dict:
        return {"order": self.order, "cursor": self.cursor, "numpy_rng": self.rng.bit_generator.state}

    def restore(self, state: dict) -> None:
        self.order, self.cursor = state["order"], state["cursor"]
        self.rng.bit_generator.state = state["numpy_rng"]


class CyclicBatches:
    """Consecutive batches of ``size`` that wrap around ``n`` examples (PPO's prompts)."""

    def __init__(self, n: int, size: int):
        self.n, self.size, self.taken = n, size, 0

    def next(self) -> list[int]:
        start = (self.taken * self.size) % self.n
        self.taken += 1
        return [(start + k) % self.n for k in range(self.size)]

    def state(self) -> dict:
        return {"taken": self.taken}

    def restore(self, state: dict) -> None:
        self.taken = state.get("taken", state["step"])


class LengthGroupedBatches:
    """Epochs of length-grouped batches (``group(indices, seed)``, reseeded per epoch); each step takes the
    next ``grad_accum`` of them (SFT)."""

    def __init__(self, group: Callable[[int], list[list[int]]], grad_accum: int):
        self.group, self.grad_accum = group, grad_accum
        self.epoch, self.batch_pos = 0, 0
        self._batches: tuple[int, list[list[int]]] | None = None

    def batches(self) -> list[list[int]]:
        if self._batches is None or self._batches[0] != self.epoch:
            self._batches = (self.epoch, self.group(self.epoch))
        return self._batches[1]

    def next(self) -> list[list[int]]:
        batches = self.batches()
        taken = batches[self.batch_pos : self.batch_pos + self.grad_accum]
        self.batch_pos += len(taken)
        if self.batch_pos >= len(batches):
            self.epoch, self.batch_pos = self.epoch + 1, 0
        return taken

    def state(self) -> dict:
        return {"epoch": self.epoch, "batch_pos": self.batch_pos}

    def restore(self, state: dict) -> None:
        self.epoch, self.batch_pos = state["epoch"], state["batch_pos"]


# ---------------------------------------------------------------- the loop

LEGACY_HISTORY = ("losses", "train_curve")  # what earlier versions called the per-step records


@dataclass
class TrainingLoop:
    """Steps ``step(batch, state) -> record`` on ``batches`` until ``total``; ``state`` (``step``, ``history``
    of records, ``seconds`` of training, and whatever the stage adds) goes into every checkpoint together
    with the ``parts`` (the batch source first). ``writes``: False in data-parallel processes other than the
    first (they train, only the first one saves)."""

    model: Any
    optimizer: Any
    batches: Batches
    checkpoints: Checkpointing = field(default_factory=Checkpointing)
    scheduler: Any | None = None
    parts: Sequence[Resumable] = ()
    writes: bool = True

    def start(self, fresh: dict | None = None) -> tuple[dict, int | None]:
        """The loop state to go on from and the step it resumed at: the checkpoint's (model, optimizer,
        schedule, random states and every part restored), else ``fresh`` (None: a resume)."""
        saved = self.checkpoints.resume(self.model, self.optimizer, self.scheduler)
        if saved is None:
            return {"step": 0, "history": [], "seconds": 0.0, **(fresh or {})}, None
        for old in LEGACY_HISTORY:
            if old in saved and "history" not in saved:
                history = saved.pop(old)
                saved["history"] = [x[1] if isinstance(x, list | tuple) else x for x in history]
        saved.setdefault("seconds", 0.0)
        for part in (self.batches, *self.parts):
            part.restore(saved)
        return saved, saved["step"]

    def run(
        self,
        state: dict,
        total: int,
        step: Callable[[Any, dict], Any],
        after_step: Callable[[int, Any], None] | None = None,
    ) -> dict:
        """Steps from ``state["step"]`` to ``total``; after each, ``after_step(step, record)``, then a checkpoint
        when one is due; the final state is saved too (a crash after training does not redo it)."""
        started, stepped = time.perf_counter(), False
        while state["step"] < total:
            record = step(self.batches.next(), state)
            state["step"] += 1
            state["history"].append(record)
            stepped = True
            if after_step is not None:
                after_step(state["step"], record)
            if self.checkpoints.due(state["step"]) and state["step"] < total:
                state["seconds"] += time.perf_counter() - started
                started = time.perf_counter()
                self.save(state)
        state["seconds"] += time.perf_counter() - started
        if stepped and self.checkpoints.folder is not None:
            self.save(state)
        return state

    def save(self, state: dict) -> None:
        """Save the checkpoint: ``state`` and every part's state (only where this process writes)."""
        if self.writes:
            parts = {k: v for part in (self.batches, *self.parts) for k, v in part.state().items()}
            self.checkpoints.save(self.model, self.optimizer, {**state, **parts}, self.scheduler)
