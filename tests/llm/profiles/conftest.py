"""Small real inputs for the prompts / teachers / quality / encode tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from reclm.data.loaders import load_dataset
from reclm.data.split import SplitSpec, make_split
from reclm.utils import torch_threads

MIND = Path(__file__).resolve().parents[4] / "shared" / "datasets" / "mind"
NETFLIX = Path(__file__).resolve().parents[4] / "shared" / "datasets" / "netflix"
GENRES = ["Comedy", "Drama", "Horror", "Western"]


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    torch_threads(1)


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Encoder caches go to a temporary folder, never to the shared ~/.cache."""
    monkeypatch.setenv("RECLM_CACHE", str(tmp_path_factory.getbasetemp() / "reclm-cache"))


def write_tiny(folder: Path, n_users: int = 12, n_items: int = 40, per_user: int = 10, seed: int = 0) -> Path:
    """A CSV dataset (user,item,timestamp) + item text (title, genres, year, abstract).

    Items have unique titles ``Film <id>``; item ``i`` has genre ``GENRES[i % 4]`` and year
    ``1950 + 10 * (i % 5)``. User ``u`` mostly watches genre ``GENRES[u % 4]``: 8 of its 10 items."""
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
    text = ["item,title,genres,year,abstract"]
    for i in range(n_items):
        abstract = " ".join(f"word{k}" for k in range(40))
        text.append(f'{i},Film {i},{GENRES[i % 4]},{1950 + 10 * (i % 5)},"{abstract}"')
    (folder / "items.csv").write_text("\n".join(text) + "\n")
    return folder


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny(tiny_files):
    data = load_dataset(tiny_files / "inter.csv", item_text=tiny_files / "items.csv")
    split = make_split(data, SplitSpec(method="random", ratios=(0.6, 0.2, 0.2), zero_shot_fraction=0.1, seed=1))
    return data, split


@pytest.fixture(scope="session")
def ml100k():
    data = load_dataset("ml-100k")
    return data, make_split(data)


@pytest.fixture(scope="session")
def mind():
    if not MIND.is_dir():
        pytest.skip("the shared MIND data is not here")
    data = load_dataset(MIND)
    return data, make_split(data)


@pytest.fixture(scope="session")
def netflix():
    if not NETFLIX.is_dir():
        pytest.skip("the shared Netflix data is not here")
    data = load_dataset(NETFLIX)
    return data, make_split(data)


@pytest.fixture(scope="session")
def tokenizer():
    from reclm.llm.model import load_tokenizer

    return load_tokenizer()
