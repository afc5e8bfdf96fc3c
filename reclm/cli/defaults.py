"""The defaults of the stage commands: ``reclm run``'s built-in settings (reclm.pipeline.config), so that a
stage run alone gets what it gets inside ``reclm run`` unless a flag says otherwise
(tests/test_settings_agree.py checks every option)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from reclm.pipeline.config import PipelineConfig

if TYPE_CHECKING:
    from reclm.llm.prompts import PromptBudget

RUN = PipelineConfig()  # the settings of `reclm run --dataset ml-100k` (configs/ml-100k.yaml spells them out)


def prompt_budget(**flags: Any) -> PromptBudget:
    """The config's prompt budget (every ``prompt`` field, also those without a flag) with ``flags`` set."""
    from reclm.llm.prompts import PromptBudget

    return PromptBudget(**{**RUN.prompt.model_dump(), **flags})


def writer_options() -> dict[str, Any]:
    """Batch size and token limit of a local profile writer, as the config's ``generation``."""
    options = {"batch_size": RUN.generation.batch_size, "max_new_tokens": RUN.generation.max_new_tokens}
    return {k: v for k, v in options.items() if v is not None}


def comma(values: Iterable[object]) -> str:
    """A list default as the comma-separated text a flag takes."""
    return ",".join(str(v) for v in values)
