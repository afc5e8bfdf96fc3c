"""A tiny real run directory to serve, and the real server in a subprocess (``reclm serve``) on loopback.

The run: a synthetic movie dataset with taste groups (CSV), its split, profiles written as files, embedded
with the real text encoder, CF models trained briefly with ``train_cf`` (LightGCN text+profiles, LightGCN
text, NCF text+profiles, BiasMF text+profiles), and a tiny random Llama (SmolLM2's tokenizer) with a LoRA
adapter tuned for a few steps on the profiles, as ``RUN/sft/adapter``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

GENRES = ("Comedy", "Drama", "Horror", "Western")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    import torch

    torch.set_num_threads(1)


def write_dataset(folder: Path, users: int = 40, items: int = 60, per_user: int = 10, seed: int = 0) -> Path:
    """User ``u`` prefers genre ``u % 4`` (8 of its 10 items); item ``i`` is of genre ``i % 4``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    genre_of = np.arange(items) % len(GENRES)
    rows = ["user,item,timestamp"]
    for u in range(users):
        liked = np.flatnonzero(genre_of == u % len(GENRES))
        other = np.flatnonzero(genre_of != u % len(GENRES))
        chosen = np.concatenate([rng.choice(liked, 8, replace=False), rng.choice(other, per_user - 8, replace=False)])
        rows += [f"{u + 1},{i + 1},{1000 + t}" for t, i in enumerate(rng.permutation(chosen))]
    (folder / "inter.csv").write_text("\n".join(rows) + "\n")
    lines = ["item,title,year,genres"]
    for i in range(items):
        genre = GENRES[genre_of[i]]
        lines.append(f"{i + 1},The {genre.lower()} film number {i + 1},{1960 + (i * 7) % 50},{genre}")
    (folder / "items.csv").write_text("\n".join(lines) + "\n")
    return folder


def user_profile_text(genre: str) -> str:
    return f"User identity: {genre.lower()} fan, film lover, student; User interests: {genre} films, cinema, stories."


def write_profiles(run, data, split, missing_user: str) -> None:
    """Profiles as the pipeline writes them: users by their train history's main genre, items by genre."""
    from reclm.llm.records import ProfileRecord, write_records

    genres = data.item_fields["genres"]
    users = []
    for u, items in enumerate(split.train_histories()):
        if data.user_ids[u] == missing_user or not len(items):
            continue
        genre = Counter(genres[i] for i in items).most_common(1)[0][0]
        users.append(ProfileRecord("user", data.user_ids[u], "prompt", user_profile_text(genre)))
    items = [
        ProfileRecord("item", data.item_ids[i], "prompt", f"User identity: {g.lower()} fans; User interests: {g}.")
        for i, g in enumerate(genres)
    ]
    write_records(run.profiles / "users.jsonl", users)
    write_records(run.profiles / "items.jsonl", items)


def tune_tiny_writer(run, data, split, base: Path) -> Path:
    """A few LoRA steps of the tiny LM on (user prompt -> profile): a real, if small, tuned writer."""
    from reclm.llm.chat import pair_conversation
    from reclm.llm.prompts import PromptBudget, user_prompts
    from reclm.llm.records import read_profiles
    from reclm.llm.sft import LoraSettings, TrainSettings, train_lora

    profiles = read_profiles(run.profiles / "users.jsonl", "user")
    prompts = user_prompts(data, split, budget=PromptBudget(max_items=10, max_words=20))
    conversations = [
        pair_conversation(p, profiles[data.user_ids[u]]) for u, p in prompts.items() if data.user_ids[u] in profiles
    ]
    train = TrainSettings(steps=4, batch_size=8, lr=5e-3, holdout=0.0, eval_every=0, save_every=0, threads=1)
    result = train_lora(conversations, run.stage("sft"), base, LoraSettings(r=4, alpha=8), train, progress=False)
    return Path(result.adapter)


def train(run, data, split, features, backbone: str, mode: str, epochs: int = 40):
    from reclm.cf.config import CFConfig
    from reclm.cf.features import SideFeatures
    from reclm.cf.trainer import train_cf

    side = SideFeatures(item_text=features.item_text)
    if mode == "text+profiles":
        side.user_profiles, side.item_profiles = features.user_profiles, features.item_profiles
    config = CFConfig(
        backbone=backbone, features=mode, dim=32, lr=0.01, batch_size=256, epochs=epochs, patience=100,
        eval_every=5, device="cpu", threads=1, seed=2020, ncf_mlp=[32, 16], feature_hidden=[64],
    )  # fmt: skip
    return train_cf(split, config, side, run.cf / config.run_name(), show_progress=False, user_ids=data.user_ids)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reclm-cache")


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    from reclm.llm.model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-lm") / "model")


@pytest.fixture(scope="session")
def served_run(tmp_path_factory, cache_dir, tiny_lm):
    """``(run folder, info)``: the tiny run, ready to serve (see module docstring)."""
    from reclm.cf.features import SideFeatures, item_text_embeddings, load_profile_embeddings
    from reclm.data.split import SplitSpec
    from reclm.llm.encode import encode_run
    from reclm.rundir import RunDir
    from reclm.text.encoder import TextEncoder

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RECLM_CACHE", str(cache_dir))
        files = write_dataset(tmp_path_factory.mktemp("tiny-data"))
        run = RunDir(tmp_path_factory.mktemp("served") / "run")
        spec = SplitSpec(method="random", ratios=(0.7, 0.15, 0.15), zero_shot_fraction=0.1, seed=1)
        data, split = run.prepare(str(files / "inter.csv"), spec, item_text=str(files / "items.csv"))
        missing_user = data.user_ids[-1]
        write_profiles(run, data, split, missing_user)
        encoder = TextEncoder(show_progress=False)
        encode_run(run, "profiles", encoder)
        features = SideFeatures(item_text=item_text_embeddings(data, encoder))
        features.user_profiles, _ = load_profile_embeddings(run.embeddings / "users.npz", data.user_ids)
        features.item_profiles, _ = load_profile_embeddings(run.embeddings / "items.npz", data.item_ids)
        config = {"llm": {"base_model": str(tiny_lm)}, "prompt": {"max_items": 10, "max_words": 20}}
        config["generation"] = {"max_new_tokens": 12, "temperature": 0.0}
        (run.root / "config.yaml").write_text(yaml.safe_dump(config))
        results = {
            "lightgcn-text+profiles": train(run, data, split, features, "lightgcn", "text+profiles"),
            "lightgcn-text": train(run, data, split, features, "lightgcn", "text", epochs=10),
            "ncf-text+profiles": train(run, data, split, features, "ncf", "text+profiles", epochs=30),
            "bias-mf-text+profiles": train(run, data, split, features, "bias-mf", "text+profiles", epochs=10),
        }
        adapter = tune_tiny_writer(run, data, split, tiny_lm)
    info = {"data": data, "split": split, "missing_user": missing_user, "results": results, "adapter": adapter}
    return run.root, info


# ---------------------------------------------------------------- the real server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``reclm serve`` in a subprocess on 127.0.0.1, with an httpx client."""

    def __init__(self, run: Path, cache_dir: Path, *args: str, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "RECLM_CACHE": str(cache_dir), "RECLM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        command = [sys.executable, "-m", "reclm.cli.main", "serve", str(run), "--port", str(self.port), *args]
        self.log_path = log
        self.log = log.open("ab")
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=self.url, timeout=120)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            try:
                if self.client.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()


@pytest.fixture
def start_server(cache_dir, tmp_path):
    """``start_server(run, *args) -> Server`` (ready); every server is stopped at the end of the test."""
    servers: list[Server] = []

    def start(run: Path, *args: str) -> Server:
        server = Server(run, cache_dir, *args, log=tmp_path / f"server-{len(servers)}.log")
        servers.append(server)
        server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


LIGHTGCN = "cf/lightgcn-text+profiles-s2020"


@pytest.fixture(scope="module")
def lightgcn_server(served_run, cache_dir, tmp_path_factory):
    """One server for a module's tests: LightGCN text+profiles, the tiny tuned writer (transformers backend),
    a 300 ms batching window so that concurrent profile requests share batches."""
    root, _ = served_run
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    args = ("--model", LIGHTGCN, "--profile-backend", "transformers", "--batch-wait-ms", "300", "--threads", "1")
    server = Server(root, cache_dir, *args, log=log)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def offline_ranking(run_root: Path, model_name: str, data, split, raw_user: str) -> tuple[list[str], np.ndarray]:
    """The user's ranking of the dataset's items it did not see in train, straight from the saved model."""
    model = load_cf_model(run_root / model_name / "model.pt")
    user = data.user_ids.index(raw_user)
    scores = model.user_item_scores([user])[0].numpy().astype(np.float64)
    seen = split.train[split.train[:, 0] == user, 1]
    scores[seen] = -np.inf
    order = np.lexsort((np.arange(len(scores)), -scores))
    order = order[np.isfinite(scores[order])]
    return [data.item_ids[i] for i in order], scores[order]


def load_cf_model(path: Path):
    from reclm.cf.trainer import load_model

    return load_model(path)


@pytest.fixture(scope="session")
def ranking(served_run):
    """``ranking(model_name, raw_user) -> (item ids, scores)``: see :func:`offline_ranking`."""
    root, info = served_run
    return lambda name, user: offline_ranking(root, name, info["data"], info["split"], user)


# ---------------------------------------------------------------- in-process servers over a copy of the run


@pytest.fixture
def run_copy(served_run, cache_dir, tmp_path, monkeypatch):
    """``run_copy() -> folder``: a fresh copy of the tiny run (no serve.sqlite yet), for tests whose engines
    write to it; RECLM_CACHE points at the shared test cache."""
    import shutil

    monkeypatch.setenv("RECLM_CACHE", str(cache_dir))
    copies: list[Path] = []

    def copy() -> Path:
        target = tmp_path / f"run-{len(copies)}"
        shutil.copytree(served_run[0], target, ignore=shutil.ignore_patterns("serve.sqlite*"))
        copies.append(target)
        return target

    return copy


class LiveServer:
    """A real uvicorn server on 127.0.0.1 (a free port) in a thread of the test process, over an app."""

    def __init__(self, app):
        import uvicorn

        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="live-server", daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the live server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.url, timeout=60)
        return self

    def __exit__(self, *exc) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture
def live_server():
    """``live_server(app) -> LiveServer`` (started); every one is stopped at the end of the test."""
    started: list[LiveServer] = []

    def start(app) -> LiveServer:
        server = LiveServer(app).__enter__()
        started.append(server)
        return server

    yield start
    for server in started:
        server.__exit__(None, None, None)
