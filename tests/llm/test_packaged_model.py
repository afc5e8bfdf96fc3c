"""The packaged SmolLM2-135M-Instruct (slow: converted once into the cache, then reloaded)."""

from __future__ import annotations

import pytest

from reclm.llm.generation import DecodeParams
from reclm.llm.generation.ct2 import CT2Generator
from reclm.llm.generation.hf import TransformersGenerator
from reclm.llm.model import DEFAULT_MODEL, load_base, model_identity, resolve_model_dir

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is 2+2?",
    "List three colours, one per line.",
    "Movies the user watched: Heat (1995, Action); Alien (1979, Sci-Fi). Write the user's profile as: "
    "User identity: A, B, C; User interests: X, Y, Z.",
]


def test_packaged_model_loads_offline_as_a_plain_folder():
    folder = resolve_model_dir(DEFAULT_MODEL)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    model, tokenizer = load_base(DEFAULT_MODEL, device="cpu")
    assert model.config.num_hidden_layers == 30 and tokenizer.eos_token == "<|im_end|>"
    assert model_identity(DEFAULT_MODEL) == model_identity(folder.as_posix()).replace(folder.name, DEFAULT_MODEL)


def test_ct2_and_transformers_agree_on_smollm2():
    reference = TransformersGenerator(DEFAULT_MODEL, batch_size=3, device="cpu")
    fast = CT2Generator(DEFAULT_MODEL, quantization="float32", batch_size=3, device="cpu")
    free = DecodeParams(max_new_tokens=16, single_line=False)
    expected = reference.generate(PROMPTS, free)
    assert fast.generate(PROMPTS, free) == expected
    assert "4" in expected[0]

    one_line = DecodeParams(max_new_tokens=16)
    short = reference.generate(PROMPTS, one_line)
    assert fast.generate(PROMPTS, one_line) == short
    assert all("\n" not in t for t in short)
    assert any("\n" in t for t in expected)  # the chatty answer really was cut at its first line
    assert [s == e.split("\n")[0].strip() for s, e in zip(short, expected)] == [True] * 3
