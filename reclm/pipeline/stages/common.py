"""What several stages share: the files a stage's key hashes, the prompt budget, LoRA and training options."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reclm.pipeline.config import PipelineConfig
from reclm.pipeline.engine import StageContext
from reclm.utils import available_cores


def dataset_files(cfg: PipelineConfig) -> list[Path]:
    """The files a dataset is read from (their content is part of the prepare stage's key)."""
    spec = str(cfg.dataset)
    files: list[Path] = []
    if spec == "ml-100k":
        from reclm.data.loaders import ml100k_folder

        files = sorted(p for p in ml100k_folder().iterdir() if p.is_file())
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            files = [path]
    if cfg.item_text:
        files.append(Path(cfg.item_text).expanduser())
    return files


def resource_files(cfg: PipelineConfig) -> list[Path]:
    """The dataset's side files (shipped teacher profiles, neighbour lists) that stages may read:
    not part of the dataset's fingerprint, so the stages that read them hash them themselves."""
    from reclm.data.loaders import PAPER_RESOURCES

    folder = Path(str(cfg.dataset)).expanduser()
    if not folder.is_dir():
        return []
    return [folder / name for name in PAPER_RESOURCES if (folder / name).is_file()]


def teacher_files(cfg: PipelineConfig) -> list[Path]:
    files = resource_files(cfg)
    if cfg.stages.teacher == "file":
        files += [Path(p).expanduser() for p in (cfg.teacher.user_file, cfg.teacher.item_file) if p]
    return files


def prompt_budget(cfg: PipelineConfig):
    """The one prompt budget of a run: teacher, SFT, generation and the tuning stages share it."""
    from reclm.llm import prompts

    p = cfg.prompt
    return prompts.PromptBudget(
        max_items=p.max_items,
        max_words=p.max_words,
        max_profiles=p.max_profiles,
        max_neighbours=p.max_neighbours,
        style=p.style,
    )


def logger(ctx: StageContext):
    """The tuning stages' ``log`` callback: indented lines under the stage."""
    return lambda text: ctx.console.print(f"    {text}", highlight=False, soft_wrap=True)


def lora_of(cfg: PipelineConfig) -> dict:
    return cfg.llm.lora.model_dump()


def train_of(opts: Any) -> dict:
    return {k: getattr(opts, k) for k in ("steps", "batch_size", "lr", "max_seq_len", "seed")}


def user_generator(cfg: PipelineConfig) -> str | None:
    """The stage whose adapter writes the final user profiles (None: teacher profiles are used)."""
    chain = cfg.stages.generators()
    return chain[-1] if chain else None


def summary_of(result: Any, unit: str, units: float) -> dict:
    """A stage result (dataclass, dict or None) as a manifest summary with tokens and units."""
    if result is None:
        info: dict = {}
    elif isinstance(result, dict):
        info = dict(result)
    elif hasattr(result, "to_dict"):
        info = result.to_dict()
    elif hasattr(result, "__dataclass_fields__"):
        from dataclasses import asdict

        info = asdict(result)
    else:
        info = {"result": str(result)}
    info.setdefault("tokens", info.get("train_tokens", 0) or 0)
    info.setdefault("units", units)
    info.setdefault("unit", unit)
    return info


def local_ray_cpus(cfg: PipelineConfig) -> int:
    """CPUs of a local Ray started for a stage (without ``ray.address`` / ``RAY_ADDRESS``): the pipeline's
    thread budget."""
    return cfg.threads or available_cores()


def offline_item_target(cfg: PipelineConfig) -> dict[str, str]:
    """Key entry for the offline teacher, whose item targets come from the item's own fields only (docs/cold-start.md)
    (no entry for the other teachers, whose output did not change: an openai teacher is not re-billed)."""
    return {"item_target": "own fields"} if cfg.stages.teacher == "offline" else {}


def generators_on(cfg: PipelineConfig) -> bool:
    return bool(cfg.stages.collab or cfg.stages.reward or cfg.stages.rl != "none" or cfg.stages.item_side)
