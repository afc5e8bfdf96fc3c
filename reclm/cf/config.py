"""Hyperparameters of a CF run: one pydantic model, loadable from YAML and overridable by CLI flags.

Defaults follow RecBole 1.2.1's model files where they exist; where reclm differs (SimGCL's weight,
``reg_weight``) the choice and its measurements are in docs/decisions.md.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from reclm.cachekeys import added_later, key_dump

Backbone = Literal["bias-mf", "ncf", "lightgcn", "sgl", "simgcl"]
FeatureMode = Literal["none", "text", "text+profiles", "text+user-profiles", "text+item-profiles"]
BACKBONES: tuple[str, ...] = ("bias-mf", "ncf", "lightgcn", "sgl", "simgcl")
FEATURE_MODES: tuple[str, ...] = ("none", "text", "text+profiles", "text+user-profiles", "text+item-profiles")
FUSION_NAMES: tuple[str, ...] = ("concat", "paper", "residual", "local")  # the strategies of reclm.cf.fusion.FUSIONS
FROM_TEXT_FUSIONS: tuple[str, ...] = ("residual", "local")  # the text model plus corrections that start at zero
FromText = Literal["none", "candidate", "warm"]
METRIC_PATTERN = re.compile(r"^(recall|ndcg)@(\d+)$")


class CFConfig(BaseModel):
    """Everything that changes a CF result. Unknown keys are rejected (a typo must not pass silently)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    backbone: Backbone = "lightgcn"
    features: FeatureMode = "none"
    fusion: str = Field("local", description="fusion strategy (registry in reclm.cf.fusion.FUSIONS)")
    profile_dropout: float = Field(
        0.0, ge=0, lt=1, description="training: share of profiles replaced by the learned 'no profile' vector"
    )
    from_text: FromText = added_later(
        "none",
        description="how a profile mode uses the trained `text` run of its backbone and seed (train_cf's text_state):"
        " `candidate`: train from scratch, the text model is epoch 0 of the selection (kept unless an epoch beats it"
        " on validation); `warm`: continue training from it (also epoch 0); `none`: ignore it (the paper's way)",
    )

    dim: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(2048, ge=1)
    layers: int = Field(2, ge=0, description="graph propagation layers (LightGCN, SGL, SimGCL)")
    reg_weight: float = Field(1e-4, ge=0, description="L2 on the batch's layer-0 representations")
    epochs: int = Field(300, ge=1)
    patience: int = Field(
        10, ge=1, description="stop after more than this many validations without improvement (RecBole's stopping_step)"
    )
    eval_every: int = Field(1, ge=1, description="validate every N epochs (selection is always on validation)")
    valid_metric: str = "ndcg@20"
    topks: list[int] = Field(default_factory=lambda: [10, 20, 40])
    eval_batch_size: int = Field(1024, ge=1, description="users scored at once in full ranking")
    seed: int = 2020
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: RECLM_THREADS or all cores)")

    # side-feature encoders (text / profile embedding -> dim)
    feature_hidden: list[int] = Field(default_factory=lambda: [128], description="hidden sizes of the feature MLPs")

    # SGL (edge-dropout views)
    sgl_drop_ratio: float = Field(0.1, ge=0, lt=1)
    sgl_ssl_weight: float = Field(0.05, ge=0)
    sgl_ssl_tau: float = Field(0.5, gt=0)

    # SimGCL (noise-perturbed views)
    simgcl_eps: float = Field(0.1, ge=0)
    simgcl_ssl_weight: float = Field(0.05, ge=0)
    simgcl_ssl_tau: float = Field(0.2, gt=0)

    ssl_negatives: Literal["batch", "all"] = Field(
        "batch", description="InfoNCE negatives: the batch's other nodes (SELFRec) or every node (RecBole SGL)"
    )
    ssl_nodes: int | None = added_later(
        None, ge=2, description="InfoNCE on at most this many of a batch's distinct users (and items), drawn at random"
    )  # null: all of them. Its cost grows with their square: big batches on big catalogues (docs/decisions.md)

    # NCF (NeuMF)
    ncf_mlp: list[int] = Field(default_factory=lambda: [128, 64])
    ncf_dropout: float = Field(0.1, ge=0, lt=1)

    @field_validator("valid_metric")
    @classmethod
    def _metric_name(cls, value: str) -> str:
        value = value.lower()
        if not METRIC_PATTERN.match(value):
            raise ValueError(f"valid_metric {value!r}: expected recall@K or ndcg@K")
        return value

    @field_validator("topks")
    @classmethod
    def _topks(cls, value: list[int]) -> list[int]:
        if not value or any(k < 1 for k in value):
            raise ValueError(f"topks {value}: expected positive integers")
        return sorted(set(value))

    @model_validator(mode="after")
    def _metric_in_topks(self) -> CFConfig:
        k = int(self.valid_metric.split("@")[1])
        if k not in self.topks:
            # the validation metric's K is always computed
            object.__setattr__(self, "topks", sorted({*self.topks, k}))
        return self

    @model_validator(mode="after")
    def _from_text_fusion(self) -> CFConfig:
        if self.from_text != "none" and self.fusion not in FROM_TEXT_FUSIONS:
            raise ValueError(f"from_text needs a fusion that adds profiles to the text model: {FROM_TEXT_FUSIONS}")
        return self

    @property
    def max_k(self) -> int:
        return max(self.topks)

    def cache_key(self) -> dict:
        """The settings that decide a run's results, for cache keys and resume fingerprints: every field
        (``added_later`` ones at their default left out, reclm.cachekeys) but where it runs (threads, device)."""
        return key_dump(self, mode="json", exclude={"threads", "device"})

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: object) -> CFConfig:
        """Read a YAML mapping (optionally under a top-level ``cf:`` key), then apply non-None overrides."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            raise ValueError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or 'parse error'})") from exc
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of CF settings")
        raw = raw.get("cf", raw)
        raw = {str(k).replace("-", "_"): v for k, v in raw.items()}
        return cls.build(raw, source=str(path), **overrides)

    @classmethod
    def build(cls, base: dict | None = None, source: str = "settings", **overrides: object) -> CFConfig:
        values = dict(base or {})
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except Exception as exc:  # pydantic's ValidationError: make it one readable line
            raise ValueError(f"{source}: {one_line_validation_error(exc)}") from exc

    def run_name(self) -> str:
        return f"{self.backbone}-{self.features}-s{self.seed}"


def one_line_validation_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    parts = []
    for err in errors():
        where = ".".join(str(p) for p in err.get("loc", ())) or "config"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)
