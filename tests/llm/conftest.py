"""Real small models for the LLM tests: a tiny random Llama with SmolLM2's tokenizer, and a LoRA adapter
trained on it for a few steps (so that merging it changes the outputs)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from reclm.llm.chat import pair_conversation
from reclm.utils import torch_threads

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Western"]


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tests share 2 cores with other jobs: one torch thread, one CTranslate2 thread."""
    os.environ["RECLM_THREADS"] = "1"
    torch_threads(1)


def make_toy_conversations(n_per_genre: int = 4) -> list:
    """Prompt -> profile pairs whose answer is fully determined by the genre named in the prompt."""
    return [
        pair_conversation(
            f"Movies watched: {g} film {k}, {g} story {k + 1}. Write the profile.",
            f"User identity: {g} fan, viewer; User interests: {g}, cinema.",
        )
        for k in range(n_per_genre)
        for g in GENRES
    ]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from reclm.llm.model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model, tmp_path_factory) -> Path:
    from reclm.llm.sft import TrainSettings, train_lora

    out = tmp_path_factory.mktemp("tiny-sft")
    settings = TrainSettings(steps=12, batch_size=6, lr=2e-2, holdout=0.0, eval_every=0, save_every=0, threads=1)
    result = train_lora(make_toy_conversations(), out, tiny_model, train=settings, progress=False)
    return Path(result.adapter)


@pytest.fixture
def toy_conversations() -> list:
    return make_toy_conversations()


@pytest.fixture
def prompts() -> list:
    return [
        "Movies watched: Action film 1, Action story 2. Write the profile.",
        "Movies watched: Drama film 3. Write the profile.",
        "Hello there, who are you?",
        "Movies watched: Western film 0, Western story 1, Western film 9, Comedy film 2. Write the profile.",
        [{"role": "user", "content": "First turn."}, {"role": "assistant", "content": "Ok."},
         {"role": "user", "content": "Second turn: Horror film 5."}],
    ]  # fmt: skip
