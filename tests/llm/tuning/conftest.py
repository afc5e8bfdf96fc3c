"""Small real inputs for the RecLM tuning stages: a tiny CSV dataset and the tiny random Llama of
tests/llm/conftest.py briefly trained to answer "Yes" or "No" about equally often (a policy with a
real choice to make, for the RL tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from reclm.data.loaders import load_dataset
from reclm.data.split import SplitSpec, make_split
from reclm.rundir import RunDir
from reclm.utils import torch_threads

GENRES = ["Comedy", "Drama", "Horror", "Western"]
YES_NO_PROMPTS = ["Will the user like it?", "Is this a match?"]


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    torch_threads(1)


def write_tiny(folder: Path, n_users: int = 24, n_items: int = 48, per_user: int = 10, seed: int = 0) -> Path:
    """CSV interactions (user,item,timestamp) + item text. Item ``i`` is titled ``Film <i>`` with genre
    ``GENRES[i % 4]``; user ``u`` watches mostly genre ``GENRES[u % 4]`` (8 of 10 items)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["user,item,timestamp"]
    for u in range(n_users):
        own = [i for i in range(n_items) if i % 4 == u % 4]
        other = [i for i in range(n_items) if i % 4 != u % 4]
        items = list(rng.choice(own, 8, replace=False)) + list(rng.choice(other, per_user - 8, replace=False))
        times = rng.permutation(len(items)) + 1000 * u
        rows += [f"{u},{i},{t}" for i, t in zip(items, times)]
    (folder / "inter.csv").write_text("\n".join(rows) + "\n")
    text = ["item,title,genres,year"]
    for i in range(n_items):
        text.append(f"{i},Film number {i} of the {GENRES[i % 4].lower()} kind,{GENRES[i % 4]},{1950 + 10 * (i % 5)}")
    (folder / "items.csv").write_text("\n".join(text) + "\n")
    return folder


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture(scope="session")
def tiny(tiny_files):
    data = load_dataset(tiny_files / "inter.csv", item_text=tiny_files / "items.csv")
    split = make_split(data, SplitSpec(method="random", ratios=(0.6, 0.2, 0.2), zero_shot_fraction=0.1, seed=1))
    return data, split


@pytest.fixture
def tiny_run(tmp_path, tiny_files):
    """A prepared run directory of the tiny dataset."""
    run = RunDir(tmp_path / "run")
    data, split = run.prepare(
        str(tiny_files / "inter.csv"),
        SplitSpec(method="random", ratios=(0.6, 0.2, 0.2), zero_shot_fraction=0.1, seed=1),
        item_text=str(tiny_files / "items.csv"),
    )
    return run, data, split


@pytest.fixture(scope="session")
def ml100k():
    data = load_dataset("ml-100k")
    return data, make_split(data)


@pytest.fixture(scope="session")
def tokenizer():
    from reclm.llm.model import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def yes_no_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model after a few full-parameter steps on prompt -> "Yes" and prompt -> "No" (equally often):
    both answers end up likely, so a reward or a preference for one of them has something to move."""
    import torch
    from transformers import AutoModelForCausalLM

    from reclm.llm.chat import pair_conversation, training_example
    from reclm.llm.model import load_tokenizer

    folder = tmp_path_factory.mktemp("yes-no") / "model"
    tok = load_tokenizer(tiny_model)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    examples = [training_example(tok, pair_conversation(p, a)) for p in YES_NO_PROMPTS for a in ("Yes", "No")]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(25):
        loss = sum(model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss for e in examples)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
