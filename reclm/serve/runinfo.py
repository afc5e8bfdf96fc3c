"""What the server reads from a run directory besides the data: which CF model to serve, which adapters
write profiles, and the settings (prompt budget, decoding, encoder) the run's own profiles were made with."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from reclm.llm.generation.base import DecodeParams
from reclm.llm.prompts import PromptBudget
from reclm.rundir import RunDir

DEFAULT_METRIC = "ndcg@20"
USER_GENERATORS = ("rl", "collab", "sft")  # the last tuned user-profile writer comes first


@dataclass
class ModelChoice:
    """One trained CF run under ``RUN/cf/``."""

    name: str
    folder: Path
    backbone: str
    features: str
    valid: dict[str, float]
    final: bool = True  # False for the pipeline's ablation runs (profiles of an earlier generator)

    def score(self, metric: str) -> float:
        value = self.valid.get(metric)
        return float(value) if value is not None and not math.isnan(float(value)) else -math.inf


def read_model_choice(folder: Path) -> ModelChoice | None:
    metrics_path, model_path = folder / "metrics.json", folder / "model.pt"
    if not (metrics_path.is_file() and model_path.is_file()):
        return None
    try:
        metrics = json.loads(metrics_path.read_text())
    except (OSError, ValueError):
        return None
    config = metrics.get("config") or {}
    pipeline = metrics.get("pipeline_run") or {}
    return ModelChoice(
        name=folder.name,
        folder=folder,
        backbone=str(config.get("backbone", "?")),
        features=str(config.get("features", "?")),
        valid={k: float(v) for k, v in (metrics.get("valid") or {}).items()},
        final=bool(pipeline.get("final", "@" not in folder.name)),
    )


def list_models(run: RunDir) -> list[ModelChoice]:
    if not run.cf.is_dir():
        return []
    found = [read_model_choice(folder) for folder in sorted(run.cf.iterdir()) if folder.is_dir()]
    return [c for c in found if c is not None]


def choose_model(run: RunDir, name: str | None = None, metric: str = DEFAULT_METRIC) -> ModelChoice:
    """``name`` (``cf/<name>``, ``<name>`` or a folder), else the best final run by VALIDATION ``metric``
    among the ``text+profiles`` runs, else among all runs."""
    if name:
        given = Path(name)
        candidates = [given, run.root / given, run.cf / given]
        for folder in candidates:
            choice = read_model_choice(folder)
            if choice is not None:
                return choice
        available = ", ".join(f"cf/{c.name}" for c in list_models(run)) or "none"
        raise FileNotFoundError(f"model {name!r}: no metrics.json + model.pt there (available: {available})")
    models = [c for c in list_models(run) if c.final]
    if not models:
        raise FileNotFoundError(
            f"{run.cf}: no trained CF model (model.pt + metrics.json); run `reclm train-cf --run {run.root}` "
            "or `reclm run` first"
        )
    preferred = [c for c in models if c.features == "text+profiles"] or models
    return max(preferred, key=lambda c: (c.score(metric), c.name))


def find_adapter(run: RunDir, kind: str) -> Path | None:
    """The adapter that writes ``kind`` profiles: the last tuned user writer (rl, collab, sft); for items the
    item writer (``item_sft``) when the run has one, else the user writer."""
    stages = (("item_sft",) if kind == "item" else ()) + USER_GENERATORS
    for stage in stages:
        path = run.stage_adapter(stage)
        if path is not None:
            return path
    return None


@dataclass
class RunSettings:
    base_model: str = "smollm2-135m"
    budget: PromptBudget = field(default_factory=PromptBudget)
    params: DecodeParams = field(default_factory=DecodeParams)
    encoder: str = "all-MiniLM-L6-v2"
    sources: dict[str, str] = field(default_factory=dict)  # setting -> file it came from


def read_yaml(path: Path) -> dict:
    try:
        loaded = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def read_json(path: Path) -> dict:
    try:
        loaded = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def run_settings(run: RunDir) -> RunSettings:
    """Settings that make on-the-fly profiles like the run's own: the decoding parameters recorded in
    ``profiles/generation.json``, else ``config.yaml``'s ``generation``; the prompt budget and base model
    from ``config.yaml``; the encoder named by the embedding metadata."""
    settings = RunSettings()
    config = read_yaml(run.root / "config.yaml")
    if config:
        settings.sources["config"] = str(run.root / "config.yaml")
    llm, prompt, generation = (config.get(k) or {} for k in ("llm", "prompt", "generation"))
    settings.base_model = str(llm.get("base_model") or settings.base_model)
    settings.budget = PromptBudget(
        max_items=int(prompt.get("max_items") or settings.budget.max_items),
        max_words=int(prompt.get("max_words") or settings.budget.max_words),
        max_profiles=int(prompt.get("max_profiles", settings.budget.max_profiles)),
        max_neighbours=int(prompt.get("max_neighbours", settings.budget.max_neighbours)),
        style=str(prompt.get("style") or "paper"),  # runs from before styles existed used the paper's
    )
    recorded = read_json(run.profiles / "generation.json").get("params")
    if isinstance(recorded, str):
        try:
            settings.params = DecodeParams(**json.loads(recorded))
            settings.sources["params"] = str(run.profiles / "generation.json")
        except (TypeError, ValueError):
            pass
    if "params" not in settings.sources and generation:
        settings.params = DecodeParams(
            max_new_tokens=int(generation.get("max_new_tokens") or settings.params.max_new_tokens),
            temperature=float(generation.get("temperature") or 0.0),
            seed=int(generation.get("seed") or 0),
        )
    for meta in ("item_text.json", "items.json", "users.json"):
        name = read_json(run.embeddings / meta).get("encoder")
        if name:
            settings.encoder = str(name)
            settings.sources["encoder"] = str(run.embeddings / meta)
            break
    else:
        encoder = config.get("encoder") or {}
        settings.encoder = str(encoder.get("model") or settings.encoder)
    return settings
