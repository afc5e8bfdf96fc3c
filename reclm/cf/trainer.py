"""The one trainer for every backbone: BPR (+ the backbone's extra terms) with Adam, validation
every ``eval_every`` epochs, early stopping with patience, the best-validation checkpoint kept in
memory and restored, and test / zero-shot evaluated once, at that epoch.

When the split has cold-validation items, a second selection runs beside the first: the best epoch by
the same metric on the ``cold_valid`` task, at which zero-shot is evaluated again
(``zero_shot_cold_selected``). Each selection stops on its own patience and then keeps its best epoch;
training goes on until both have stopped. Training never reads validation, so each selection is the
one it would make alone.

A run with an output folder also saves its whole state there (``checkpoint.pt``: weights, optimizer,
the best epoch so far, history, random states) at the end of an epoch at most every
``checkpoint_seconds``; a run started again on the same folder, config and split resumes from it and
ends exactly as an uninterrupted run would. The file is removed when the run finishes. Files of a run
directory are read with ``weights_only=True`` (:func:`load_checkpoint_file`): a planted file cannot run code.

``metrics.json`` is the mark of a finished run (the report and ``serve`` look for it): it is removed when
training starts and written last, atomically, once every other output is on disk."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import pickle
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn

from reclm.cachekeys import every_field
from reclm.cf.backbones import CFModel, build_model
from reclm.cf.config import CFConfig
from reclm.cf.evaluator import EvalResult, Evaluator
from reclm.cf.features import SideFeatures
from reclm.cf.sampler import BPRSampler
from reclm.data.split import Split
from reclm.progress import progress as make_progress
from reclm.utils import fsync_path, seed_everything, torch_threads, write_text_atomic

CHECKPOINT_FORMAT = "reclm-cf/2"  # /2: profile inputs with presence masks and a "no profile" vector
RESUME_FORMAT = "reclm-cf-resume/2"
CHECKPOINT_SECONDS = 60.0
POPULARITY_K = 20  # the list length of the popularity-concentration measures
SELECTIONS = ("valid", "cold_valid")  # the validation tasks an epoch is selected on


@dataclass
class CFResult:
    valid: dict[str, float]
    test: dict[str, float]
    zero_shot: dict[str, float]
    best_epoch: int
    epoch_seconds: float
    eval_seconds: float
    epochs_run: int
    history: list[dict] = field(default_factory=list)
    model: CFModel | None = None
    out_dir: Path | None = None
    cold_valid: dict[str, float] = field(default_factory=dict)  # at the cold-selected epoch
    zero_shot_cold_selected: dict[str, float] = field(default_factory=dict)
    best_epoch_cold: int | None = None  # None: the split has no cold-validation users
    popularity: dict[str, float] = field(default_factory=dict)

    def metrics_json(self) -> dict:
        return {
            "valid": self.valid,
            "test": self.test,
            "zero_shot": self.zero_shot,
            "best_epoch": self.best_epoch,
            "cold_valid": self.cold_valid,
            "zero_shot_cold_selected": self.zero_shot_cold_selected,
            "best_epoch_cold": self.best_epoch_cold,
            "popularity": self.popularity,
            "epoch_seconds": self.epoch_seconds,
            "eval_seconds": self.eval_seconds,
            "epochs_run": self.epochs_run,
        }


class UnsafeCheckpointError(ValueError):
    """A file to be loaded holds Python objects other than tensors and plain data: loading it could run code."""


def load_checkpoint_file(path: Path, map_location: str | torch.device = "cpu", allow: Sequence[Any] = ()) -> Any:
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings and plain containers only (plus the
    classes and functions in ``allow``). A file holding anything else, which unpickling could make run code,
    is refused with :class:`UnsafeCheckpointError`; other errors (a torn file) are raised as they are."""
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" not in str(exc).lower():
            raise
        found = re.search(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>", str(exc))
        what = next((g for g in found.groups() if g), "") if found else ""
        raise UnsafeCheckpointError(
            f"{path}: refused to load: it holds Python objects that are not tensors or plain data"
            f"{f' ({what})' if what else ''}, and loading them could run code; reclm never writes such a file. "
            "Delete it if you did not put it there."
        ) from None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA device (use --device cpu or auto)")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def new_selection() -> dict:
    """The best epoch so far on one validation task; ``done`` once its patience ran out."""
    return {"score": -np.inf, "epoch": 0, "metrics": {}, "state": None, "since": 0, "done": False}


def new_loop(selections: tuple[str, ...]) -> dict:
    return {"epoch": 0, "stopped": False, "best": {name: new_selection() for name in selections}}


def popularity_concentration(lists: np.ndarray, counts: np.ndarray, candidates: np.ndarray) -> dict[str, float]:
    """Share of the slots of the top-k ``lists`` taken by the k most popular ``candidates`` (by train
    interaction ``counts``), and coverage: distinct listed items / candidates."""
    k = lists.shape[1]
    popular = candidates[np.argsort(-counts[candidates], kind="stable")[:k]]
    return {
        "k": k,
        "users": len(lists),
        "popular_share": float(np.isin(lists, popular).mean()),
        "coverage": float(len(np.unique(lists)) / len(candidates)),
    }


class Trainer:
    def __init__(
        self,
        split: Split,
        config: CFConfig,
        features: SideFeatures,
        show_progress: bool = True,
        history_path: Path | None = None,
        checkpoint_path: Path | None = None,
        checkpoint_seconds: float = CHECKPOINT_SECONDS,
        text_state: dict[str, torch.Tensor] | None = None,
        text_cold_state: dict[str, torch.Tensor] | None = None,
    ):
        if len(split.train) == 0:
            raise ValueError("the split has no train pairs")
        if len(split.valid) == 0:
            raise ValueError("the split has no validation pairs: model selection needs them (use a valid ratio > 0)")
        self.split, self.config, self.features = split, config, features
        self.show_progress = show_progress
        torch_threads(config.threads)
        self.device = resolve_device(config.device)
        seed_everything(config.seed)
        self.rng = np.random.default_rng(config.seed)
        self.model = build_model(config, split.n_users, split.n_items, split.train, features, self.device)
        # the text run's models: epoch 0 of the selections (config.from_text); "warm" also trains on from there
        self.text_states = {"valid": text_state, "cold_valid": text_cold_state or text_state} if text_state else {}
        if text_state is not None:
            check_text_state(self.model, text_state)
            if config.from_text == "warm":
                load_text_model(self.model, text_state)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        candidates = np.flatnonzero(~split.held_out_mask)  # zero-shot and cold-validation items stay unseen
        self.sampler = BPRSampler(split.train, split.n_items, candidates)
        self.evaluator = Evaluator(split, config.topks, config.eval_batch_size, self.device)
        self.selections = tuple(name for name in SELECTIONS if name == "valid" or self.evaluator.has(name))
        self.cold_selection: dict | None = None  # the cold-valid best epoch, set by fit()
        self.history: list[dict] = []
        self.history_path = history_path  # rewritten after every epoch, so a long run can be followed
        self.checkpoint_path = checkpoint_path
        self.checkpoint_seconds = checkpoint_seconds
        self.resumed_from = 0  # the epoch a saved state was restored at (0: started afresh)

    # ------------------------------------------------------------ one epoch
    def train_epoch(self) -> dict[str, float]:
        model, cfg = self.model, self.config
        model.train()
        model.start_epoch(self.rng)
        users, pos, neg = self.sampler.epoch(self.rng)
        users_t = torch.as_tensor(users, device=self.device)
        pos_t = torch.as_tensor(pos, device=self.device)
        neg_t = torch.as_tensor(neg, device=self.device)
        sums: dict[str, float] = {}
        n_batches = 0
        for start in range(0, len(users), cfg.batch_size):
            batch = slice(start, start + cfg.batch_size)
            terms = model.batch_loss(users_t[batch], pos_t[batch], neg_t[batch])
            extra = model.fusion.extra_loss(users_t[batch], pos_t[batch])
            if extra is not None:
                terms["fusion"] = extra
                terms["total"] = terms["total"] + extra
            self.optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            self.optimizer.step()
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
            n_batches += 1
        return {("loss" if k == "total" else k): v / max(1, n_batches) for k, v in sums.items()}

    def evaluate(self, task: str, per_user: bool = False) -> EvalResult:
        return self.evaluator.evaluate(self.model, task, per_user=per_user)

    # ------------------------------------------------------------ resumable state
    @functools.cached_property
    def fingerprint(self) -> dict:
        """What a saved state must match to be resumed: the run's settings (not threads or device), its
        split's train and validation pairs, and its feature values."""
        digest = hashlib.sha256()
        split = self.split
        held_out = (split.zero_shot_items, split.cold_valid_items, split.cold_valid)
        arrays = (split.train, split.valid, *held_out, *self.features.arrays())
        for array in arrays:
            digest.update(b"-" if array is None else np.ascontiguousarray(array).tobytes())
        return {
            "format": RESUME_FORMAT,
            "config": self.config.cache_key(),
            "data": digest.hexdigest(),
        }

    @property
    def older_fingerprint(self) -> dict:
        """The fingerprint as written while ``added_later`` settings were still in it (reclm.cachekeys)."""
        current = self.fingerprint  # computed (and cached) outside every_field
        with every_field():
            return {**current, "config": self.config.cache_key()}

    def save_state(self, loop: dict) -> None:
        """Write the whole training state atomically (a crash mid-write leaves the previous one)."""
        state = {
            "fingerprint": self.fingerprint,
            "loop": loop,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "history": self.history,
            "numpy_rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
        }
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(state, tmp)
        fsync_path(tmp)
        tmp.replace(self.checkpoint_path)

    def restore_state(self) -> dict | None:
        """The loop variables of a saved state of this very run, restored into the trainer; None if there
        is none (or it belongs to another config or split: then it is ignored and overwritten)."""
        path = self.checkpoint_path
        if path is None or not path.is_file():
            return None
        try:
            state = load_checkpoint_file(path, map_location=self.device)
        except UnsafeCheckpointError:
            raise
        except Exception:  # a torn file: start afresh
            return None
        if state.get("fingerprint") not in (self.fingerprint, self.older_fingerprint):
            return None
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.history = state["history"]
        self.rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.resumed_from = state["loop"]["epoch"]
        return state["loop"]

    def remove_state(self) -> None:
        if self.checkpoint_path is not None:
            self.checkpoint_path.unlink(missing_ok=True)

    # ------------------------------------------------------------ the loop
    def fit(self) -> tuple[int, dict[str, float]]:
        """Train until early stopping; restore and return the best validation epoch and its metrics (the
        best cold-validation epoch is left in ``self.cold_selection``)."""
        cfg = self.config
        loop = self.restore_state()
        if loop is None:
            loop = new_loop(self.selections)
            if self.text_states:
                self.validate_text_models(loop)
        last_saved = time.perf_counter()
        columns = [
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
        ]
        with make_progress(*columns, disable=not self.show_progress) as progress:
            name = f"{cfg.backbone}/{cfg.features}"
            bar = progress.add_task(name, total=cfg.epochs, completed=loop["epoch"], status="")  # resumed: from there
            while loop["epoch"] < cfg.epochs and not loop["stopped"]:
                loop["epoch"] += 1
                status = self.run_epoch(loop)
                progress.update(bar, advance=1, status=status)
                loop["stopped"] = all(best["done"] for best in loop["best"].values())
                if self.checkpoint_path is not None and time.perf_counter() - last_saved >= self.checkpoint_seconds:
                    self.save_state(loop)
                    last_saved = time.perf_counter()
        for name, candidate in loop.get("text", {}).items():  # the text model wins where no epoch beat it
            if candidate["score"] >= loop["best"][name]["score"]:
                loop["best"][name] = candidate
        self.cold_selection = loop["best"].get("cold_valid")
        best = loop["best"]["valid"]
        if best["state"] is not None:
            self.model.load_state_dict(best["state"])
        return best["epoch"], best["metrics"]

    def run_epoch(self, loop: dict) -> str:
        """Train epoch ``loop["epoch"]``, validate when due and update the best so far; the status line."""
        cfg, epoch, metric = self.config, loop["epoch"], self.config.valid_metric
        start = time.perf_counter()
        losses = self.train_epoch()
        synchronize(self.device)
        record: dict = {"epoch": epoch, **losses, "train_seconds": time.perf_counter() - start}
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            start = time.perf_counter()
            for name in self.selections:
                record[name] = self.evaluate(name).metrics
                self.update_selection(loop["best"][name], record[name], epoch)
            record["eval_seconds"] = time.perf_counter() - start
        self.history.append(record)
        if self.history_path is not None:
            self.history_path.write_text(json.dumps(self.history, indent=1))
        status = f"loss {losses['loss']:.4f}"
        for name, best in loop["best"].items():
            if best["epoch"]:
                status += f"  best {name} {metric} {best['score']:.4f} @ {best['epoch']}"
        return status

    def validate_text_models(self, loop: dict) -> None:
        """Epoch 0 of a profile run given its text run: each selection's candidate is the text run's model as
        that selection chose it (profile branch at zero: exactly the text model), so a run whose epochs never
        beat it on validation ends as the text model. ``warm`` trains on from it, so it is the selection's
        first epoch; ``candidate`` trains from scratch, so it is set aside and compared at the end (early
        stopping counts the run's own epochs: a model from scratch starts far below a trained one)."""
        record: dict = {"epoch": 0, "train_seconds": 0.0}
        training_start = copy.deepcopy(self.model.state_dict())
        loop["text"] = {}
        for name in self.selections:
            load_text_model(self.model, self.text_states[name])
            record[name] = self.evaluate(name).metrics
            target = loop["best"][name] if self.config.from_text == "warm" else new_selection()
            self.update_selection(target, record[name], 0)
            if self.config.from_text != "warm":
                loop["text"][name] = target
            self.model.load_state_dict(training_start)
        self.history.append(record)

    def update_selection(self, best: dict, metrics: dict[str, float], epoch: int) -> None:
        """Keep ``epoch`` if it beats the best so far (weights copied); count a miss otherwise. A selection
        whose patience ran out (more than ``patience`` misses, as RecBole's stopping_step) is final."""
        if best["done"]:
            return
        score = metrics.get(self.config.valid_metric, float("nan"))
        if score > best["score"]:
            best.update(score=score, epoch=epoch, metrics=metrics, since=0)
            best["state"] = copy.deepcopy(self.model.state_dict())
        else:
            best["since"] += 1
        best["done"] = best["since"] > self.config.patience

    # ------------------------------------------------------------ after training
    def evaluate_cold_selected(self) -> dict[str, EvalResult]:
        """``cold_valid`` and ``zero_shot`` at the best cold-validation epoch (empty without one); the
        model is left at the full-shot selection."""
        best = self.cold_selection
        if best is None or best["state"] is None:
            return {}
        current = copy.deepcopy(self.model.state_dict())
        self.model.load_state_dict(best["state"])
        try:
            out = {"cold_valid": self.evaluate("cold_valid", per_user=True)}
            zero = self.evaluate("zero_shot", per_user=True)
        finally:
            self.model.load_state_dict(current)
        name = "zero_shot_cold_selected"
        frame = zero.per_user.assign(task=name) if zero.per_user is not None else None
        out[name] = EvalResult(name, zero.metrics, zero.n_users, frame)
        return out

    def popularity(self, k: int = POPULARITY_K) -> dict[str, float]:
        """Popularity concentration of the full-shot top-``k`` lists of every user with a full-shot test item."""
        if not self.evaluator.has("test"):
            return {}
        lists = self.evaluator.rank_all(self.model, "test", k)
        counts = np.bincount(self.split.train[:, 1], minlength=self.split.n_items)
        return popularity_concentration(lists, counts, self.evaluator.tasks["test"].candidate_ids)


def check_text_state(model: CFModel, state: dict[str, torch.Tensor]) -> None:
    """Refuse a ``state`` that is not a trained ``text`` model of ``model``'s backbone and split: every weight
    must exist in ``model`` with the same shape, and the ID and text weights must all be there."""
    if not getattr(model.fusion, "contains_text_model", False):
        raise ValueError(f"fusion {model.config.fusion!r} does not contain the text model: use residual or local")
    own = model.state_dict()
    for name, value in state.items():
        if name not in own or own[name].shape != value.shape:
            raise ValueError(f"text model: {name!r} does not fit this model (a text model of another backbone?)")
    if any(".user_id." in name or ".text_mlp." in name for name in own if name not in state):
        raise ValueError("text model: the state lacks the text model's ID or text weights")


def load_text_model(model: CFModel, state: dict[str, torch.Tensor]) -> None:
    """Load a trained ``text`` model's weights into a profile mode of a residual fusion (the ``text`` model
    plus profile corrections whose last layer starts at zero): what ``model`` has beyond them, the profile
    branch, keeps its values, so at initialisation the result is the ``text`` model exactly."""
    check_text_state(model, state)
    model.load_state_dict(state, strict=False)


def train_cf(
    split: Split,
    config: CFConfig,
    features: SideFeatures | None = None,
    out_dir: str | Path | None = None,
    show_progress: bool = True,
    user_ids: list[str] | None = None,
    extra_info: dict | None = None,
    checkpoint_seconds: float = CHECKPOINT_SECONDS,
    text_state: dict[str, torch.Tensor] | None = None,
    text_cold_state: dict[str, torch.Tensor] | None = None,
) -> CFResult:
    """Train ``config.backbone`` on ``split``, select on validation, evaluate test and zero-shot at the
    best validation epoch (zero-shot again at the best cold-validation epoch), and (when ``out_dir`` is
    given) write metrics.json, history.json, per_user.csv, config.yaml, model.pt (the full-shot selection)
    and, for dot-product models, embeddings.npz. With ``out_dir`` the run saves its state there as it goes
    and resumes from it when started again. With ``config.from_text`` a profile mode takes its ``text`` run's
    weights (``text_state``; ``text_cold_state``: that run's cold-selected ones, ``model_cold.pt``) as epoch 0
    of the selections, and with ``warm`` trains on from them."""
    features = features or SideFeatures()
    if config.from_text != "none" and config.features.startswith("text+") and text_state is None:
        raise ValueError(f"from_text {config.from_text!r}: pass the trained text model's weights as text_state")
    if text_state is not None and config.from_text == "none":
        raise ValueError("text_state given but from_text is 'none': say how to use it (candidate or warm)")
    history_path = checkpoint_path = None
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        history_path, checkpoint_path = Path(out_dir) / "history.json", Path(out_dir) / "checkpoint.pt"
        unpublish(Path(out_dir))
    trainer = Trainer(
        split, config, features, show_progress=show_progress, history_path=history_path,
        checkpoint_path=checkpoint_path, checkpoint_seconds=checkpoint_seconds, text_state=text_state,
        text_cold_state=text_cold_state,
    )  # fmt: skip
    best_epoch, _ = trainer.fit()
    results = {task: trainer.evaluate(task, per_user=True) for task in ("valid", "test", "zero_shot")}
    cold = trainer.evaluate_cold_selected()
    history = trainer.history
    trained = [h for h in history if h["epoch"] > 0]  # epoch 0 (the text model) trained nothing
    evals = [h["eval_seconds"] for h in history if "eval_seconds" in h]
    result = CFResult(
        valid=results["valid"].metrics,
        test=results["test"].metrics,
        zero_shot=results["zero_shot"].metrics,
        best_epoch=best_epoch,
        epoch_seconds=float(np.mean([h["train_seconds"] for h in trained])) if trained else 0.0,
        eval_seconds=float(np.mean(evals)) if evals else 0.0,
        epochs_run=len(trained),
        history=history,
        model=trainer.model,
        cold_valid=cold["cold_valid"].metrics if cold else {},
        zero_shot_cold_selected=cold["zero_shot_cold_selected"].metrics if cold else {},
        best_epoch_cold=trainer.cold_selection["epoch"] if cold else None,
        popularity=trainer.popularity(),
    )
    if out_dir is not None:
        extra = {**(extra_info or {}), "resumed_from_epoch": trainer.resumed_from}
        result.out_dir = write_outputs(Path(out_dir), result, trainer, {**results, **cold}, user_ids, extra)
        trainer.remove_state()
    return result


def write_outputs(
    out: Path,
    result: CFResult,
    trainer: Trainer,
    results: dict[str, EvalResult],
    user_ids: list[str] | None,
    extra_info: dict,
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    unpublish(out)
    config = trainer.config
    metrics = result.metrics_json()
    metrics.update(
        {
            "users_evaluated": {task: r.n_users for task, r in results.items()},
            "train_seconds_total": float(sum(h["train_seconds"] for h in result.history)),
            "device": str(trainer.device),
            "threads": torch.get_num_threads(),
            "feature_coverage": trainer.features.coverage,
            "split": trainer.split.stats(),
            "config": config.model_dump(),
            **extra_info,
        }
    )
    (out / "history.json").write_text(json.dumps(result.history, indent=2))
    (out / "config.yaml").write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))
    frames = [r.per_user for r in results.values() if r.per_user is not None]
    per_user = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["task", "user"])
    if user_ids is not None and len(per_user):
        per_user.insert(2, "user_id", np.asarray(user_ids, dtype=object)[per_user["user"].to_numpy()])
    per_user.to_csv(out / "per_user.csv", index=False, float_format="%.6g")
    save_model(trainer.model, out / "model.pt", trainer.split.train, trainer.features)
    save_cold_model(trainer, out / "model_cold.pt")
    if trainer.model.dot_product:
        users, items = trainer.model.final_embeddings()
        np.savez(out / "embeddings.npz", users=users.cpu().numpy(), items=items.cpu().numpy())
    for name in ("history.json", "config.yaml", "per_user.csv", "model.pt", "model_cold.pt", "embeddings.npz"):
        if (out / name).is_file():
            fsync_path(out / name)
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2))  # last: says every file above is complete
    return out


def unpublish(out: Path) -> None:
    """Remove ``out/metrics.json`` (durably) before ``out``'s other files are rewritten: a run folder with a
    ``metrics.json`` is a finished one, whose files belong together."""
    if (out / "metrics.json").exists():
        (out / "metrics.json").unlink()
        fsync_path(out)


def save_model(model: CFModel, path: Path, train: np.ndarray, features: SideFeatures) -> None:
    """A self-contained checkpoint: config, sizes, feature dims, train edges (for the graph) and weights
    (feature matrices are buffers of the fusion module, so they travel in the state dict)."""
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "config": model.config.model_dump(),
            "n_users": model.n_users,
            "n_items": model.n_items,
            "feature_dims": features.dims(),
            "train": torch.as_tensor(np.asarray(train, dtype=np.int64)),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        },
        path,
    )


def save_cold_model(trainer: Trainer, path: Path) -> None:
    """A run without profiles also keeps its cold-selected model (``model_cold.pt``): a profile run given this
    run is epoch 0 of its cold selection (:func:`train_cf`'s ``text_cold_state``)."""
    selection = trainer.cold_selection
    if trainer.config.features not in ("none", "text") or not selection or selection["state"] is None:
        return
    current = copy.deepcopy(trainer.model.state_dict())
    trainer.model.load_state_dict(selection["state"])
    try:
        save_model(trainer.model, path, trainer.split.train, trainer.features)
    finally:
        trainer.model.load_state_dict(current)


def load_text_run(
    folder: str | Path, name: str = "text run"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """The weights of a finished ``text`` run's folder, for :func:`train_cf`'s ``text_state`` and
    ``text_cold_state``: its selected model and, where it kept one, its cold-selected model (``name``: what
    the error calls the folder)."""
    model = Path(folder) / "model.pt"
    if not model.is_file():
        raise FileNotFoundError(f"{name} {folder}: no model.pt (expected a finished train-cf output folder)")
    cold = model.with_name("model_cold.pt")
    cold_state = load_checkpoint_file(cold)["state_dict"] if cold.is_file() else None
    return load_checkpoint_file(model)["state_dict"], cold_state


def load_model(path: str | Path, device: str | torch.device = "cpu") -> CFModel:
    """Rebuild a trained model from ``model.pt`` (fusion encoders included, so new users and items can
    be encoded with ``model.fusion.encode_new_items`` / ``encode_new_users``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model checkpoint at {path}")
    checkpoint = load_checkpoint_file(path)
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a reclm CF checkpoint (format {checkpoint.get('format')!r})")
    config = CFConfig(**checkpoint["config"])
    dims = checkpoint["feature_dims"]
    n_users, n_items = checkpoint["n_users"], checkpoint["n_items"]
    rows = {"item_text": n_items, "user_profiles": n_users, "item_profiles": n_items}
    placeholders = {
        name: (np.zeros((rows[name], dim), np.float32) if dim else None) for name, dim in dims.items()
    }  # overwritten by the state dict's buffers
    features = SideFeatures(**placeholders)
    model = build_model(config, n_users, n_items, checkpoint["train"].numpy(), features, device)
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    return model
