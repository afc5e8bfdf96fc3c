"""A tiny real dataset (CSV interactions + item text) with structure a text model can use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

GENRES = ("Comedy", "Drama", "Horror", "Sci-Fi")


def write_tiny_dataset(folder: Path, users: int = 40, items: int = 60, per_user: int = 9, seed: int = 0) -> Path:
    """Users prefer one genre (80% of their items); items have a title, a year and a genre."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    genre_of = np.arange(items) % len(GENRES)
    rows = ["user,item,timestamp"]
    for u in range(users):
        taste = u % len(GENRES)
        liked = np.flatnonzero(genre_of == taste)
        other = np.flatnonzero(genre_of != taste)
        n = per_user + int(rng.integers(0, 12)) if u % 5 == 0 else per_user
        k_liked = min(len(liked), int(round(n * 0.8)))
        chosen = np.concatenate(
            [rng.choice(liked, k_liked, replace=False), rng.choice(other, n - k_liked, replace=False)]
        )
        for t, i in enumerate(rng.permutation(chosen)):
            rows.append(f"{u + 1},{i + 1},{1000 + t}")
    (folder / "inter.csv").write_text("\n".join(rows) + "\n")
    lines = ["item,title,year,genres"]
    for i in range(items):
        lines.append(
            f"{i + 1},Movie {i + 1} {GENRES[genre_of[i]].lower()} story,{1970 + (i * 7) % 50},{GENRES[genre_of[i]]}"
        )
    (folder / "items.csv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(autouse=True)
def reference_speeds(monkeypatch):
    """Estimates at the reference machine's speeds, so that tests can state them exactly (the factor
    for this CPU is tested in test_pipeline_cache.py)."""
    monkeypatch.setenv("RECLM_SPEED_FACTOR", "1")


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Measured stage speeds and caches of these tests stay out of the user's reclm cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RECLM_CACHE", str(tmp_path_factory.mktemp("reclm-cache")))
        yield


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    import torch

    monkeypatch.setenv("RECLM_THREADS", "1")
    torch.set_num_threads(1)
