"""The pipeline's configuration: one YAML file, validated by pydantic (unknown keys are errors).

``load_config(path)`` reads a YAML file; ``default_config(dataset)`` is what ``reclm run --dataset X``
uses: the built-in defaults below, which are the CPU ml-100k setting (``configs/ml-100k.yaml`` spells
them out; a test keeps the two equal), with ``dataset`` set.
Every error is one line naming the file and the key path, e.g.
``configs/x.yaml: cf.backbones[2]: 'lightgnc' is not one of 'bias-mf', 'ncf', 'lightgcn', 'sgl', 'simgcl'``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from reclm.cachekeys import added_later, key_dump
from reclm.cf.config import BACKBONES, FROM_TEXT_FUSIONS, Backbone, CFConfig, FeatureMode, FromText
from reclm.data.split import SplitSpec

# The pipeline's stages in the order they run (reclm.pipeline.table.build_stages); the report needs all others.
STAGE_ORDER = (
    "prepare", "teacher", "sft", "neighbours", "collab", "reward", "rl", "item_side", "profiles", "encode",
    "train_cf", "report",
)  # fmt: skip


class ConfigError(ValueError):
    """A bad configuration; the message is one line naming the file and the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SplitOptions(Section):
    """reclm.data.split.SplitSpec as YAML."""

    method: Literal["auto", "random", "temporal", "snapshot"] = "auto"
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    zero_shot_fraction: float = Field(0.1, ge=0, lt=1)
    seed: int = 2020
    # items held out to select the zero-shot epoch without test (docs/evaluation.md); 0 turns it off
    cold_valid_fraction: float = Field(0.05, ge=0, lt=1)
    zero_shot: Literal["random", "latest"] = "random"  # latest: the items first interacted with last

    @field_validator("ratios")
    @classmethod
    def ratios_sum_to_one(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(r < 0 for r in value) or abs(sum(value) - 1) > 1e-6:
            raise ValueError(f"{list(value)} must be three non-negative numbers summing to 1")
        return value

    @model_validator(mode="after")
    def items_left_to_train(self) -> SplitOptions:
        if self.zero_shot_fraction + self.cold_valid_fraction >= 1:
            raise ValueError("zero_shot_fraction + cold_valid_fraction must be below 1 (items are left to train on)")
        return self

    def spec(self) -> SplitSpec:
        return SplitSpec(
            self.method, self.ratios, self.zero_shot_fraction, self.seed, self.cold_valid_fraction, self.zero_shot
        )


class StageSwitches(Section):
    """Which stages run. Switching a stage off keeps the run valid: the profiles come from the last
    generator that is on (distilled -> collaborative -> RL)."""

    teacher: Literal["file", "openai", "offline"] = "offline"
    sft: bool = True
    collab: bool = True
    reward: bool = False  # DPO builds its own preference pairs; PPO needs the reward model
    rl: Literal["ppo", "dpo", "none"] = "dpo"
    item_side: bool = True
    ablation: bool = False  # also profile with every earlier generator and train the ablation backbones on them

    @model_validator(mode="after")
    def consistent(self) -> StageSwitches:
        if not self.sft:
            for name in ("collab", "reward"):
                if getattr(self, name):
                    raise ValueError(f"{name}: true needs sft: true (it tunes the distilled model)")
            if self.rl != "none":
                raise ValueError("rl needs sft: true (it tunes the distilled model)")
        if self.rl == "ppo" and not self.reward:
            raise ValueError("rl: ppo needs reward: true (PPO optimises the reward model's score)")
        return self

    def generators(self) -> list[str]:
        """User-profile generators in the order they build on each other (the last one writes the profiles)."""
        chain = ["sft"] if self.sft else []
        if self.collab:
            chain.append("collab")
        if self.rl != "none":
            chain.append("rl")
        return chain


class OpenAITeacher(Section):
    """reclm.llm.teachers.EndpointConfig: any OpenAI-compatible chat endpoint (key read from the
    environment variable ``api_key_env``, null: no key; sent over https, or http to a loopback host only;
    prices per 1,000 tokens, for the ledger and the spending cap)."""

    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-3.5-turbo"
    api_key_env: str | None = "OPENAI_API_KEY"
    concurrency: int = Field(8, ge=1, le=256)
    max_retries: int = Field(6, ge=0)
    timeout: float = Field(60.0, gt=0)
    max_tokens: int = Field(160, ge=8)
    temperature: float = Field(0.0, ge=0, le=2)
    price_in: float = Field(0.0005, ge=0)
    price_out: float = Field(0.0015, ge=0)


class TeacherOptions(Section):
    """Which users and items get teacher profiles (``null`` = all), and where they come from."""

    users: int | None = Field(None, ge=1)
    items: int | None = Field(None, ge=1)
    seed: int = 0
    user_file: str | None = None  # file teacher: defaults to the dataset's teacher_user_profiles.jsonl
    item_file: str | None = None
    prompt_from: Literal["auto", "split", "source"] = "auto"  # file teacher: what our prompts are built from
    # openai teacher: stop before the ledger's total cost (USD, over every attempt) could pass this (null: no cap)
    max_cost: float | None = Field(None, ge=0)
    openai: OpenAITeacher = OpenAITeacher()


class PromptOptions(Section):
    """The prompt budget shared by the teacher, SFT, generation and the tuning stages (so every model
    sees prompts built the same way)."""

    # CPU defaults: prompt tokens are most of the generation cost, since each one also costs at every decoded
    # token (ml-100k, CTranslate2 int8 on 2 cores: user prompts with 6 instead of 10 items 1.45x the profiles/s;
    # item prompts without watcher profiles and with 2 instead of 3 related items 2.45x, with 1 related item
    # a further 1.4x). The paper's MIND setting (configs/mind-paper.yaml) shows more.
    max_items: int = Field(6, ge=1)  # keep the most recent N history items
    max_words: int = Field(30, ge=1)  # cut long item text (abstracts) to M words
    # user profiles shown in a TEACHER's item prompt; the item writer ignores it (a new item has no users, so no
    # item writer prompt shows an item's users: reclm.llm.item_side)
    max_profiles: int = Field(0, ge=0)
    max_neighbours: int = Field(1, ge=0)  # related items (with their profiles) shown in an item prompt
    style: Literal["paper", "compact"] = "compact"  # compact: half the tokens (reclm.llm.prompts)


class LoraOptions(Section):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


class TrainOptions(Section):
    """reclm.llm.sft.TrainSettings fields the pipeline sets (defaults: the ml-100k CPU budget)."""

    steps: int = Field(30, ge=1)
    batch_size: int = Field(4, ge=1)
    lr: float = Field(2e-4, gt=0)
    max_seq_len: int = Field(512, ge=32)
    seed: int = 0


class SFTOptions(TrainOptions):
    # 1e-3: on ml-100k, 30 steps of 4 at 2e-4 left held-out loss at 1.43 and 0/16 profiles in the format;
    # at 1e-3 held-out loss 0.33 and 32/32 held-out users' profiles in the format
    lr: float = Field(1e-3, gt=0)
    holdout: float = Field(0.1, ge=0, lt=1)  # share of teacher pairs kept for validation loss


class CollabOptions(TrainOptions):
    """Collaborative instruction tuning (reclm.llm.collab.run_collab)."""

    steps: int = Field(8, ge=1)
    batch_size: int = Field(2, ge=1)
    max_seq_len: int = Field(1536, ge=32)  # longer dialogues are skipped
    dialogues: int | None = Field(None, ge=1)  # target users (null: steps x batch size)
    neighbours: int = Field(3, ge=0)  # similar users shown in turn 1
    target_items: int = Field(10, ge=1)
    neighbour_items: int = Field(5, ge=1)
    max_words: int = Field(20, ge=1)
    max_tokens: int = Field(1024, ge=64)  # token budget of a whole dialogue
    profiles: Literal["distilled", "teacher"] = "distilled"  # turn-1 responses
    evaluate: bool = True  # held-out Yes/No accuracy before and after


class RewardOptions(TrainOptions):
    """Preference pairs and the reward model (reclm.llm.reward.run_reward)."""

    steps: int = Field(10, ge=1)
    pairs: int | None = Field(None, ge=1)  # users to build pairs for (null: every eligible one)
    eval_share: float = Field(0.2, gt=0, lt=1)  # users held out for the accuracy report
    source: Literal["teacher", "distilled"] = "teacher"  # where the chosen profiles come from


class RLOptions(TrainOptions):
    """PPO or DPO on the profile writer (reclm.llm.rl.stage.run_rl)."""

    steps: int = Field(8, ge=1)
    batch_size: int = Field(2, ge=1)
    lr: float = Field(1e-5, gt=0)
    kl_coef: float = Field(0.05, ge=0)  # PPO KL penalty against the SFT reference
    beta: float = Field(0.1, gt=0)  # DPO temperature
    eval_users: int = Field(16, ge=1)  # held-out users whose greedy profiles judge the policy


class ItemSideOptions(TrainOptions):
    """The item-profile writer (reclm.llm.item_side.train_item_writer)."""

    steps: int = Field(15, ge=1)
    lr: float = Field(1e-3, gt=0)  # a new format (5 + 5 entries) in few steps, as the SFT
    max_seq_len: int = Field(1024, ge=32)
    init: Literal["sft", "fresh"] = "sft"  # start from the user writer's adapter, or a fresh LoRA
    keep_teacher: bool = False  # items with a teacher profile keep it


class LLMOptions(Section):
    base_model: str = "smollm2-135m"
    lora: LoraOptions = LoraOptions()
    sft: SFTOptions = SFTOptions()
    collab: CollabOptions = CollabOptions()
    reward: RewardOptions = RewardOptions()
    rl: RLOptions = RLOptions()
    item_side: ItemSideOptions = ItemSideOptions()


class NeighbourOptions(Section):
    """The CF model whose embeddings give similar users / items (trained on train interactions only)."""

    source: Literal["cf", "shipped"] = "cf"  # shipped: the dataset's neighbour lists (Netflix, MIND items)
    backbone: Backbone = "lightgcn"
    k: int = Field(5, ge=1)
    epochs: int = Field(20, ge=1)


class GenerationOptions(Section):
    """Profile generation (reclm.llm.generation): cached by (model, adapter, prompt, decoding), so a
    crashed or repeated stage only generates what is missing."""

    # auto: ctranslate2 on CPU (1.75x transformers there, benchmarks/generation_speed.py), transformers on CUDA
    backend: Literal["auto", "transformers", "ctranslate2", "openai"] = "ctranslate2"
    batch_size: int | None = Field(16, ge=1)  # null: 16 on CPU (bigger batches are slower there), 256 on CUDA
    max_new_tokens: int = Field(48, ge=4)
    temperature: float = Field(0.0, ge=0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    # > 1 stops a small writer's lists from repeating entries (1.05 measured: docs/results.md); 1 = off
    repetition_penalty: float = added_later(1.0, gt=0)
    users: int | None = Field(None, ge=1)  # profile only the first N users (null = all)
    items: int | None = Field(None, ge=1)
    quantization: str | None = None  # ctranslate2; null: int8 on CPU, float32 where int8 is off (ct2.py)
    # openai: a server with the tuned model loaded, or a list of servers with the same model (spread by load,
    # failing over; reclm.llm.generation.openai)
    base_url: str | list[str] = "http://127.0.0.1:8000/v1"
    served_model: str | None = None  # openai: the served model's name
    api_key_env: str | None = "OPENAI_API_KEY"  # null: no key (sent over https, or http to loopback only)
    concurrency: int = Field(8, ge=1)  # openai: requests in flight on each server
    cooldown: float = added_later(30.0, ge=0)  # openai, several servers: seconds a failing one is left out

    @field_validator("base_url")
    @classmethod
    def base_urls(cls, value: str | list[str]) -> str | list[str]:
        urls = [value] if isinstance(value, str) else value
        if not urls:
            raise ValueError("an empty list: expected one URL or more")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r}: expected http(s)://host[:port]/v1")
        if len({url.rstrip("/") for url in urls}) != len(urls):
            raise ValueError(f"{urls}: a URL is listed twice")
        return value


class EncoderOptions(Section):
    model: str = "all-MiniLM-L6-v2"
    batch_size: int = Field(64, ge=1)


class CFOptions(Section):
    """Backbones x feature modes x seeds; ``params`` are reclm.cf.config.CFConfig fields shared by all
    runs, ``per_backbone`` overrides them for one backbone."""

    backbones: list[Backbone] = list(BACKBONES)
    features: list[FeatureMode] = ["text", "text+profiles"]
    seeds: list[int] = [2020]
    ablation_backbones: list[Backbone] = ["lightgcn"]
    side_ablation: bool = True  # also train ablation_backbones with one side's profiles (user only, item only)
    params: dict[str, Any] = {"epochs": 100, "patience": 10, "lr": 0.003}  # patience 10: docs/cold-start.md section 6
    # how profile runs use their trained text runs (CFConfig.from_text; params / per_backbone may set it too):
    # `candidate`, the text model is epoch 0 of their selection, so validation decides whether profiles are
    # used (docs/cold-start.md section 12)
    from_text: FromText = "candidate"
    per_backbone: dict[Backbone, dict[str, Any]] = {}
    # runs trained at once (null: one single-threaded run per core on CPU, one on CUDA; reclm.pipeline.cf_jobs)
    jobs: int | None = Field(None, ge=1)

    @field_validator("backbones", "features", "seeds")
    @classmethod
    def non_empty_unique(cls, value: list) -> list:
        if not value:
            raise ValueError("must list at least one value")
        if len(set(value)) != len(value):
            raise ValueError(f"{value} has duplicates")
        return value

    def run_params(self, backbone: str, features: str, seed: int) -> dict[str, Any]:
        params = {**self.params, **self.per_backbone.get(backbone, {})}
        if features.startswith("text+"):
            params["from_text"] = self.text_use(backbone)
        else:
            params.pop("from_text", None)  # the text run itself: the setting does not touch it
        return {**params, "backbone": backbone, "features": features, "seed": seed}

    def text_use(self, backbone: str) -> str:
        """How ``backbone``'s profile runs use its trained ``text`` runs: ``from_text``, unless ``params`` or
        ``per_backbone`` say otherwise; the default only where it can apply (a fusion that contains the text
        model, ``text`` among the features), else ``none``."""
        merged = {**self.params, **self.per_backbone.get(backbone, {})}
        if "from_text" in merged:  # set for this backbone: as given (CFConfig refuses a fusion that cannot)
            return str(merged["from_text"])
        if "from_text" in self.model_fields_set:  # cf.from_text given: as given (check_cf_params checks it)
            return self.from_text
        fusion = merged.get("fusion", CFConfig.model_fields["fusion"].default)
        return self.from_text if fusion in FROM_TEXT_FUSIONS and "text" in self.features else "none"


class ReportOptions(Section):
    examples: int = Field(3, ge=0)  # example profiles shown beside the user's history
    metric: str = Field("ndcg@20", pattern=r"^(recall|ndcg)@\d+$")  # per-user metric of the significance test


class RayOptions(Section):
    """Where ``executor: ray`` runs the CF grid (reclm.distributed; ``pip install 'reclm[ray]'``) and what each
    CF run asks of it. Neither this nor ``executor`` is in train-cf's cache key: a run trained either way is reused."""

    address: str | None = None  # null: RAY_ADDRESS, else a local Ray started for the run (threads caps its CPUs)
    cpus_per_run: float = Field(1, gt=0)  # Ray CPUs per CF run (its torch threads: this, rounded down, at least 1)
    gpus_per_run: float = Field(0, ge=0)  # Ray GPUs per CF run (a run sees only its GPUs: device auto uses them)


class PipelineConfig(Section):
    dataset: str = "ml-100k"
    item_text: str | None = None
    out: str | None = None  # run directory (default runs/<config or dataset name>)
    threads: int | None = Field(None, ge=1)  # torch threads (default: the cores available)
    # where the CF grid (stage 11) and profile generation (stage 9) run: this machine, or Ray (section `ray`)
    executor: Literal["local", "ray"] = "local"
    ray: RayOptions = RayOptions()
    split: SplitOptions = SplitOptions()
    stages: StageSwitches = StageSwitches()
    teacher: TeacherOptions = TeacherOptions()
    prompt: PromptOptions = PromptOptions()
    llm: LLMOptions = LLMOptions()
    neighbours: NeighbourOptions = NeighbourOptions()
    generation: GenerationOptions = GenerationOptions()
    encoder: EncoderOptions = EncoderOptions()
    cf: CFOptions = CFOptions()
    report: ReportOptions = ReportOptions()

    @model_validator(mode="after")
    def item_side_start(self) -> PipelineConfig:
        if self.stages.item_side and not self.stages.sft and self.llm.item_side.init == "sft":
            raise ValueError("stages.item_side: true with sft: false needs llm.item_side.init: fresh")
        return self

    def section(self, *keys: str) -> dict[str, Any]:
        """The named top-level sections as plain data (what a stage's cache key is built from)."""
        dumped = key_dump(self, mode="json")
        return {k: dumped[k] for k in keys}

    def default_out(self, name: str | None = None) -> Path:
        if self.out:
            return Path(self.out)
        return Path("runs") / (name or Path(str(self.dataset)).name)


# ---------------------------------------------------------------- loading and errors


def stable_hash(value: Any) -> str:
    """sha256 of canonical JSON: equal data, equal hash (key order does not matter)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def key_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the key at ``loc`` (for listing the keys it accepts)."""
    model: Any = PipelineConfig
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        annotation = field.annotation if field else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return model


def describe_error(error: dict) -> str:
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    kind, value = error["type"], error.get("input")
    if kind == "extra_forbidden":
        owner = model_at(loc)
        known = f" (expected one of: {', '.join(owner.model_fields)})" if owner else ""
        return f"{key_path(loc)}: unknown key{known}"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"{key_path(loc)}: {value!r} is not one of {expected}"
    message = error["msg"].removeprefix("Value error, ")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{key_path(loc)}: {message}{shown}" if loc else message


def validate_config(raw: Any, source: str = "config") -> PipelineConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    try:
        config = PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe_error(exc.errors()[0])}") from None
    check_cf_params(config, source)
    return config


def check_cf_params(config: PipelineConfig, source: str) -> None:
    """Validate ``cf.params`` / ``cf.per_backbone`` against the CF trainer's own CFConfig."""
    try:
        from reclm.cf.config import CFConfig
    except ImportError:  # the CF area not installed: the train-cf stage reports it
        return
    for backbone in config.cf.backbones:
        for where, params in (("cf.params", config.cf.params), (f"cf.per_backbone.{backbone}", None)):
            params = params if params is not None else config.cf.per_backbone.get(backbone, {})
            for key in ("backbone", "features", "seed"):
                if key in params:
                    raise ConfigError(f"{source}: {where}.{key}: set it with cf.{key}s, not in {where}")
        if config.cf.text_use(backbone) != "none" and "text" not in config.cf.features:
            raise ConfigError(f"{source}: cf: from_text ({backbone}) needs 'text' in cf.features (it uses that run)")
        merged = config.cf.run_params(backbone, config.cf.features[-1], config.cf.seeds[0])
        try:
            CFConfig.model_validate(merged)
        except ValidationError as exc:
            error = exc.errors()[0]
            key = error["loc"][0] if error["loc"] else ""
            where = f"cf.per_backbone.{backbone}" if key in config.cf.per_backbone.get(backbone, {}) else "cf.params"
            error = {**error, "loc": (*where.split("."), *error["loc"])}
            if error["type"] == "extra_forbidden":
                known = ", ".join(k for k in CFConfig.model_fields if k not in ("backbone", "features", "seed"))
                raise ConfigError(
                    f"{source}: {key_path(error['loc'])}: unknown key (expected one of: {known})"
                ) from None
            raise ConfigError(f"{source}: {describe_error(error)}") from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read and validate a YAML config; ``overrides`` (dotted keys) are applied before validation."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}:{where}: not valid YAML ({problem})") from None
    raw = resolve_paths(raw, path.parent)
    return validate_config(apply_overrides(raw, overrides), str(path))


PATH_KEYS = ("dataset", "item_text", "teacher.user_file", "teacher.item_file")


def resolve_paths(raw: Any, base: Path) -> Any:
    """Relative input paths in a config file are relative to the file's folder (so a config works
    from any working directory); built-in dataset names and absolute paths are kept."""
    from reclm.data.loaders import BUILTIN

    if not isinstance(raw, dict):
        return raw
    raw = dict(raw)
    for dotted in PATH_KEYS:
        *parents, last = dotted.split(".")
        node = raw
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or not isinstance(node.get(last), str):
            continue
        value = node[last]
        if value in BUILTIN or Path(value).expanduser().is_absolute():
            continue
        if parents:  # copy the nested mapping before changing it
            parent = raw
            for part in parents:
                parent[part] = dict(parent[part])
                parent = parent[part]
            node = parent
        node[last] = str((base / value).resolve())
    return raw


def apply_overrides(raw: Any, overrides: dict[str, Any] | None) -> Any:
    if not overrides:
        return raw
    raw = dict(raw or {})
    for dotted, value in overrides.items():
        node = raw
        *parents, last = dotted.split(".")
        for part in parents:
            node[part] = dict(node.get(part) or {})
            node = node[part]
        node[last] = value
    return raw


def default_config(dataset: str = "ml-100k", overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """The built-in defaults (the CPU ml-100k setting, spelled out in configs/ml-100k.yaml) for ``dataset``."""
    return validate_config(apply_overrides({"dataset": dataset}, overrides), f"--dataset {dataset}")
