"""Each stage's defaults are defined once: every option of a stage command defaults to what ``reclm run`` uses
(its built-in config, or the library's own default where the pipeline passes none), and each library settings
dataclass agrees with the config section it mirrors."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import pytest
import typer.main

from reclm.cf.config import CFConfig
from reclm.cli.main import app
from reclm.llm.collab import CollabBudget
from reclm.llm.generation.base import DecodeParams
from reclm.llm.reward import RewardConfig
from reclm.llm.rl.dpo import DPOConfig
from reclm.llm.rl.ppo import PPOConfig
from reclm.llm.sft import LoraSettings, TrainSettings
from reclm.llm.teachers.openai_compat import EndpointConfig
from reclm.pipeline.config import PipelineConfig
from reclm.text.encoder import TextEncoder

RUN = PipelineConfig()
COMMANDS = typer.main.get_command(app).commands


def config(path: str) -> tuple[str, Any]:
    """(where, value) of the built-in config at a dotted path."""
    value: Any = RUN
    for part in path.split("."):
        value = value[int(part)] if part.isdigit() else getattr(value, part)
    return path, value


def cf_param(name: str) -> tuple[str, Any]:
    """A CF setting as ``reclm run`` trains with it: ``cf.params``, else CFConfig's default."""
    return f"cf.params.{name}", {**CFConfig().model_dump(), **RUN.cf.params}[name]


def library(cls: type, name: str) -> tuple[str, Any]:
    """A library default that ``reclm run`` leaves as it is (its config has no such key)."""
    return f"{cls.__name__}.{name}", getattr(cls(), name)


def fields_of(section: str, *names: str) -> dict[str, tuple[str, Any]]:
    return {name: config(f"{section}.{name}") for name in names}


PROMPT = {
    "max_history": config("prompt.max_items"),
    "max_words": config("prompt.max_words"),
    "prompt_style": config("prompt.style"),
}
SPLIT = {
    "split": config("split.method"),
    "ratios": config("split.ratios"),
    "zero_shot": config("split.zero_shot_fraction"),
    "zero_shot_items": config("split.zero_shot"),
    "cold_valid": config("split.cold_valid_fraction"),
}
OPENAI = ("base_url", "model", "api_key_env", "concurrency", "max_retries", "timeout", "temperature", "max_tokens")

# option -> (where reclm run takes it from, its value), per stage command
SOURCES: dict[str, dict[str, tuple[str, Any]]] = {
    "prepare": {**SPLIT, "dataset": config("dataset"), "seed": config("split.seed"), "item_text": config("item_text")},
    "teacher": {
        "kind": config("stages.teacher"),
        "max_users": config("teacher.users"),
        "max_items": config("teacher.items"),
        **fields_of("teacher", "seed", "user_file", "item_file", "prompt_from", "max_cost"),
        **fields_of("teacher.openai", *OPENAI, "price_in", "price_out"),
        **PROMPT,
    },
    "sft": {
        "model": config("llm.base_model"),
        "max_steps": config("llm.sft.steps"),
        **fields_of("llm.sft", "lr", "batch_size", "max_seq_len", "holdout", "seed"),
        **{f"lora_{name}": config(f"llm.lora.{name}") for name in ("r", "alpha", "dropout")},
        "target_modules": config("llm.lora.target_modules"),
        **{name: library(TrainSettings, name) for name in ("epochs", "grad_accum", "eval_every", "save_every")},
        "gradient_checkpointing": library(TrainSettings, "gradient_checkpointing"),
        "threads": config("threads"),
    },
    "neighbours": fields_of("neighbours", "k", "source", "backbone", "epochs"),
    "collab": {
        "base_model": config("llm.base_model"),
        **fields_of("llm.collab", "dialogues", "neighbours", "target_items", "neighbour_items", "max_tokens"),
        **fields_of("llm.collab", "max_words", "profiles", "steps", "batch_size", "lr", "max_seq_len", "seed"),
        "evaluate": config("llm.collab.evaluate"),
        "lora_r": config("llm.lora.r"),
        "backend": config("generation.backend"),
    },
    "reward": {
        "base_model": config("llm.base_model"),
        **fields_of("llm.reward", "source", "pairs", "eval_share", "steps", "batch_size", "lr", "max_seq_len", "seed"),
        **PROMPT,
        "lora_layers": library(RewardConfig, "lora_layers"),
    },
    "rl": {
        "method": config("stages.rl"),
        "base_model": config("llm.base_model"),
        **fields_of("llm.rl", "steps", "batch_size", "lr", "kl_coef", "beta", "eval_users", "seed"),
        "max_new_tokens": config("generation.max_new_tokens"),
        **PROMPT,
    },
    "item-side": {
        "base_model": config("llm.base_model"),
        **fields_of("llm.item_side", "steps", "batch_size", "lr", "max_seq_len", "init", "keep_teacher"),
        "limit": config("generation.items"),
        "max_words": config("prompt.max_words"),
        "prompt_style": config("prompt.style"),
        "max_neighbours": config("prompt.max_neighbours"),
        "backend": config("generation.backend"),
    },
    "profile": {
        "model": config("llm.base_model"),
        **fields_of(
            "generation",
            "backend",
            "max_new_tokens",
            "temperature",
            "top_p",
            "seed",
            "batch_size",
            "repetition_penalty",
        ),
        **fields_of("generation", "quantization", "base_url", "api_key_env", "concurrency"),
        "limit": config("generation.users"),
        **PROMPT,
        "threads": config("threads"),
    },
    "encode": {"encoder": config("encoder.model"), "batch_size": config("encoder.batch_size")},
    "quality": {"encoder": config("encoder.model")},
    "train-cf": {
        **SPLIT,
        "split_seed": config("split.seed"),
        "seed": config("cf.seeds.0"),
        "item_text": config("item_text"),
        **{name: cf_param(name) for name in ("fusion", "profile_dropout", "epochs", "dim", "lr", "batch_size")},
        **{name: cf_param(name) for name in ("layers", "reg_weight", "patience", "eval_every", "valid_metric")},
        **{name: cf_param(name) for name in ("topks", "device", "threads")},
    },
}
# options with no counterpart in reclm run (what to read or write, switches of the command itself)
CLI_ONLY: dict[str, set[str]] = {
    "prepare": {"out"},
    "teacher": {"run", "dataset", "only", "fresh", "quiet"},
    "sft": {"run", "source", "kind", "fresh", "quiet"},
    "neighbours": {"run", "embeddings", "items"},
    "collab": {"run"},
    "reward": {"run"},
    "rl": {"run"},
    "item-side": {"run", "generate"},
    "profile": {"run", "users", "items", "adapter", "item_adapter", "no_adapter", "quiet"},
    "encode": {"run", "source"},
    "quality": {"run", "source", "reference", "heldout"},
    # reclm run trains lists of backbones and feature modes
    "train-cf": {"dataset", "run", "backbone", "features", "profiles", "config", "out", "quiet"}
    # reclm run links each profile run to its own text run; --from-text defaults to candidate with --text-run
    | {"text_run", "from_text"},
}
CASES = [(command, option) for command, options in SOURCES.items() for option in options]


def as_value(default: Any, like: Any) -> Any:
    """A flag's default as the config holds it (comma-separated text for a list)."""
    if isinstance(like, list | tuple) and isinstance(default, str):
        kind = type(like[0]) if like else str
        return [kind(v) for v in default.split(",")]
    return list(default) if isinstance(default, tuple) else default


def plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("command", sorted(SOURCES))
def test_every_option_of_a_stage_command_is_classified(command):
    params = {p.name for p in COMMANDS[command].params}
    mapped, own = set(SOURCES[command]), CLI_ONLY[command]
    assert not mapped & own
    assert params == mapped | own, f"not classified: {params - mapped - own}; no such option: {(mapped | own) - params}"


@pytest.mark.parametrize(("command", "option"), CASES, ids=[f"{c}:{o}" for c, o in CASES])
def test_option_defaults_to_what_reclm_run_uses(command, option):
    where, expected = SOURCES[command][option]
    default = next(p.default for p in COMMANDS[command].params if p.name == option)
    flag = option.replace("_", "-")
    assert as_value(default, expected) == plain(expected), (
        f"reclm {command} --{flag} {default!r}, {where}: {expected!r}"
    )


# library settings dataclass -> the config section whose same-named fields it shares
MIRRORS = [
    (LoraSettings, "llm.lora"),
    (RewardConfig, "llm.reward"),
    (DPOConfig, "llm.rl"),
    (PPOConfig, "llm.rl"),
    (CollabBudget, "llm.collab"),
    (EndpointConfig, "teacher.openai"),
    (DecodeParams, "generation"),
]
# kept apart on purpose: 0 is "unpriced", which GenerationEndpoint (a served model) inherits; the teacher
# command and the pipeline always pass teacher.openai's prices
APART = {(EndpointConfig, "price_in"), (EndpointConfig, "price_out")}


@pytest.mark.parametrize(("cls", "path"), MIRRORS, ids=[c.__name__ for c, _ in MIRRORS])
def test_library_settings_agree_with_their_config_section(cls, path):
    section, library_defaults = config(path)[1], cls()
    shared = [f.name for f in dataclasses.fields(cls) if f.name in type(section).model_fields]
    shared = [name for name in shared if (cls, name) not in APART]
    assert shared
    wrong = {
        name: (getattr(library_defaults, name), getattr(section, name))
        for name in shared
        if plain(getattr(library_defaults, name)) != plain(getattr(section, name))
    }
    assert not wrong, f"{cls.__name__} (library, {path}): {wrong}"


def test_other_library_defaults_agree_with_the_config():
    lora = RUN.llm.lora.model_dump()
    assert RewardConfig().lora == {k: lora[k] for k in RewardConfig().lora}
    assert EndpointConfig().max_cost == RUN.teacher.max_cost
    assert PPOConfig().max_new_tokens == RUN.generation.max_new_tokens
    encoder = inspect.signature(TextEncoder).parameters
    assert (encoder["model"].default, encoder["batch_size"].default) == (RUN.encoder.model, RUN.encoder.batch_size)


def test_the_trainer_settings_are_built_from_the_sections():
    """TrainSettings is shared by SFT, collaborative tuning and the item writer: the pipeline builds it from
    each section (its own defaults are the trainer's; the sft command's options for the rest are checked above)."""
    for section in (RUN.llm.sft, RUN.llm.collab, RUN.llm.item_side):
        train = {k: getattr(section, k) for k in ("steps", "batch_size", "lr", "max_seq_len", "seed")}
        assert dataclasses.asdict(TrainSettings(**train)).items() >= train.items()
    assert TrainSettings(**RUN.llm.sft.model_dump()).holdout == RUN.llm.sft.holdout


def test_the_commands_build_the_pipelines_prompt_budget():
    """PromptBudget's own defaults are the paper's (a run without a config is served with them); the commands
    build it from the config's ``prompt``, every field included, as the pipeline does."""
    from reclm.cli.defaults import prompt_budget
    from reclm.pipeline.stages.common import prompt_budget as pipeline_budget

    assert prompt_budget() == pipeline_budget(RUN)
    assert prompt_budget(max_items=3).max_items == 3


def test_a_train_cf_config_file_sits_between_the_defaults_and_the_flags_given(tmp_path):
    from reclm.cli.cf import cf_settings

    flags = {name: value for name, (_, value) in SOURCES["train-cf"].items() if name in CFConfig.model_fields}
    (tmp_path / "cf.yaml").write_text("epochs: 7\nlr: 0.01\n")
    settings = cf_settings({**flags, "lr": 0.02}, {"lr"}, tmp_path / "cf.yaml")
    assert (settings.epochs, settings.lr, settings.patience) == (7, 0.02, RUN.cf.params["patience"])
    assert cf_settings(flags, set(), None).model_dump() == CFConfig(**flags).model_dump()
