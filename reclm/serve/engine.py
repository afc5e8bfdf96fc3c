"""The serving state of one run: the chosen CF model, the item catalog (the dataset's items plus items added
over HTTP), the run's profiles, on-the-fly profile writing and ``RUN/serve.sqlite``.

Reads never take a lock: item matrices only grow by appended rows (see :mod:`reclm.serve.index`) and every
list an answer reads is appended to before the rows that point into it. Adding an item takes ``self.lock``:
the id check, the SQLite insert and the appends happen as one step; a ``new-<n>`` id is chosen inside the
insert's SQLite transaction, so servers sharing a run never hand out the same one. What clients can make the
server keep is bounded: ``max_added_items`` (then 403) and ``max_stored_profiles`` (then answered, not kept).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from reclm.data.dataset import RecDataset
from reclm.rundir import RunDir
from reclm.serve.index import FAISS_MIN_ITEMS, GrowingMatrix, ItemIndex, top_from_scores
from reclm.serve.profiles import PROFILE_BACKENDS, LockedEncoder, ProfileWriter, QueueFull, Written
from reclm.serve.reps import ServingModel
from reclm.serve.runinfo import DEFAULT_METRIC, choose_model, find_adapter, run_settings
from reclm.serve.store import DuplicateItem, ServeStore, StoredItem, StoreFull

log = logging.getLogger("reclm.serve")

MAX_K = 1000
MAX_HISTORY = 500
MAX_FIELDS = 32
MAX_FIELD_CHARS = 2000
MAX_PROFILE_CHARS = 4000
MAX_ADDED_ITEMS = 10_000  # items clients may add to a run (all servers on it together)
MAX_STORED_PROFILES = 100_000  # profiles written on the fly that serve.sqlite keeps (per table)
STORE_NAME = "serve.sqlite"


class ServeError(Exception):
    """An error the client caused or should know about; ``status`` is the HTTP status."""

    status = 500


class NotFound(ServeError):
    status = 404


class InvalidInput(ServeError):
    status = 422


class Conflict(ServeError):
    status = 409


class Unsupported(ServeError):
    status = 400


class Busy(ServeError):
    status = 503


class TimedOut(ServeError):
    status = 504


class LimitReached(ServeError):
    status = 403


@dataclass
class ServeOptions:
    model: str | None = None  # cf/<name>; default: best text+profiles run by validation metric
    metric: str = DEFAULT_METRIC
    profile_backend: str = "ct2"  # ct2 | transformers | none (new users from their history only)
    base_model: str | None = None  # default: the run's llm.base_model
    adapter: str | Path | None = None  # default: rl, collab or sft adapter of the run
    item_adapter: str | Path | None = None  # default: item_sft adapter, else the user adapter
    no_adapter: bool = False  # the base model writes profiles (for comparisons)
    encoder: str | None = None  # default: the encoder the run's embeddings were made with
    faiss_min_items: int = FAISS_MIN_ITEMS
    batch_size: int = 16
    batch_wait_ms: float = 20.0
    max_pending: int = 256
    profile_timeout: float = 600.0
    threads: int | None = None
    max_added_items: int = MAX_ADDED_ITEMS  # more get 403
    max_stored_profiles: int = MAX_STORED_PROFILES  # more are answered but not stored


@dataclass
class Outcome:
    """A profile for a new user or item: text, embedding (None: a zero vector) and how it was obtained:
    ``generated``, ``cached``, ``given``, ``disabled`` (backend none), ``unused`` (the model takes none)."""

    profile: str | None
    vector: np.ndarray | None
    status: str


@dataclass
class Ranked:
    ids: list[str]
    scores: list[float]
    texts: list[str]


@dataclass
class ServeStats:
    started: float = field(default_factory=time.time)
    new_items: int = 0
    new_users: int = 0


def limit_blas_threads() -> None:
    """One BLAS thread per request: concurrency comes from requests, and oversubscribed OpenBLAS threads on a
    busy machine made a 10k-item top-k 50x slower in our measurements."""
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1, user_api="blas")
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn (sentence-transformers)
        pass
    try:
        import faiss

        faiss.omp_set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass


def existing_adapter(path: str | Path | None) -> Path | None:
    if path is None:
        return None
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path}: not a LoRA adapter folder (no adapter_config.json)")
    return path


class Recommender:
    """Everything the HTTP app answers from (see module docstring)."""

    def __init__(self, run_dir: str | Path, options: ServeOptions | None = None):
        from reclm.cf.trainer import load_model
        from reclm.llm.records import read_profiles
        from reclm.utils import torch_threads

        self.options = options = options or ServeOptions()
        if options.profile_backend not in PROFILE_BACKENDS:
            raise ValueError(f"--profile-backend {options.profile_backend!r}: expected {', '.join(PROFILE_BACKENDS)}")
        torch_threads(options.threads)
        limit_blas_threads()
        self.run = RunDir(run_dir)
        self.data, self.split = self.run.load()
        self.choice = choose_model(self.run, options.model, options.metric)
        cf_model = load_model(self.choice.folder / "model.pt")
        if (cf_model.n_users, cf_model.n_items) != (self.data.n_users, self.data.n_items):
            raise ValueError(
                f"{self.choice.folder}: the model has {cf_model.n_users} users / {cf_model.n_items} items, "
                f"the run's data {self.data.n_users} / {self.data.n_items}"
            )
        self.model = ServingModel(cf_model, self.split.train, self.data.n_users, self.data.n_items)
        self.settings = run_settings(self.run)
        self.lock = threading.RLock()
        self.stats = ServeStats()

        # catalog: dataset items first, then items added over HTTP (in the order they were added)
        self.n_base = self.data.n_items
        self.user_index = self.data.user_index()
        self.item_ids: list[str] = list(self.data.item_ids)
        self.item_index: dict[str, int] = self.data.item_index()
        self.item_texts: list[str] = self.data.item_texts()
        self.added: list[StoredItem] = []
        self.items0 = GrowingMatrix(self.model.items0)
        self.items_final = GrowingMatrix(self.model.items_final) if self.model.dot_product else self.items0
        self.index = ItemIndex(self.items_final, options.faiss_min_items) if self.model.dot_product else None
        self.seen = self.split.train_matrix()
        self.text_vectors = self.model.item_text_vectors()

        files = {kind: self.run.profiles / f"{kind}s.jsonl" for kind in ("user", "item")}
        self.user_profiles = read_profiles(files["user"], "user") if files["user"].is_file() else {}
        self.item_profiles = read_profiles(files["item"], "item") if files["item"].is_file() else {}
        # a new item's prompt follows the item side's one recipe: text-nearest pool items, teacher profiles
        self.teacher_item_profiles, self.neighbour_pool = self.item_recipe_inputs()

        self.encoder = self.make_encoder()
        self.store = ServeStore(self.run.root / STORE_NAME)
        self.writer, self.adapters = self.make_writer()
        self.restore_items()

    # ------------------------------------------------------------ construction
    def make_encoder(self) -> LockedEncoder | None:
        if not (self.model.takes_new_items or self.model.uses_profiles):
            return None
        encoder = LockedEncoder(self.options.encoder or self.settings.encoder)
        expected = {"item text": self.model.text_dim}
        if self.model.profile_dims:
            expected.update(zip(("user profile", "item profile"), self.model.profile_dims))
        for what, dim in expected.items():
            if dim is not None and dim != encoder.dim:
                raise ValueError(
                    f"text encoder {encoder.name!r} gives {encoder.dim}-d vectors but the model's {what} "
                    f"embeddings are {dim}-d (use --encoder with the run's encoder)"
                )
        return encoder

    def make_writer(self) -> tuple[ProfileWriter | None, dict[str, Path | None]]:
        options = self.options
        if options.profile_backend == "none" or not self.model.uses_profiles or self.encoder is None:
            return None, {}
        if options.no_adapter:
            user = item = None
        else:
            user = existing_adapter(options.adapter) or find_adapter(self.run, "user")
            item = existing_adapter(options.item_adapter) or find_adapter(self.run, "item") or user
        if user is None and not options.no_adapter:
            log.warning("no tuned adapter in %s (rl/collab/sft): the base model writes profiles", self.run.root)
        adapters = {"user": user, "item": item}
        writer = ProfileWriter(
            options.profile_backend,
            options.base_model or self.settings.base_model,
            adapters,
            self.settings.params,
            self.run.root / STORE_NAME,
            self.encoder,
            batch_size=options.batch_size,
            max_wait=options.batch_wait_ms / 1000.0,
            max_pending=options.max_pending,
            threads=options.threads,
            max_cached=options.max_stored_profiles,
        )
        return writer, adapters

    def restore_items(self) -> None:
        """Items added in earlier sessions, re-encoded when the encoder changed, put back in the catalog."""
        stored = self.store.items()
        if not stored:
            return
        if not self.model.takes_new_items:
            log.warning("%d added items in %s not served: the model cannot take new items", len(stored), STORE_NAME)
            return
        for item in stored:
            stale = item.encoder != self.encoder.name or len(item.text_vector) != self.encoder.dim
            unembedded = self.model.uses_profiles and item.profile and item.profile_vector is None
            if stale or unembedded:
                item.text_vector = self.encoder.encode([item.text])[0]
                item.profile_vector = self.encoder.encode_profiles([item.profile or ""])[0]
                item.encoder = self.encoder.name
                self.store.update_item_vectors(item.id, item.encoder, item.text_vector, item.profile_vector)
        items0, final = self.model.new_items(
            np.stack([s.text_vector for s in stored]), self.profile_matrix([s.profile_vector for s in stored])
        )
        with self.lock:
            self.append_items(stored, items0, final)
        log.info("restored %d added items from %s", len(stored), STORE_NAME)

    def profile_matrix(self, vectors: list[np.ndarray | None]) -> np.ndarray | None:
        """Item profile rows for new items; an item without one gets the model's learned "no profile" vector."""
        item_profile = self.model.fusion_profile("item")
        if item_profile is None:
            return None
        missing = item_profile.missing.detach().cpu().numpy().astype(np.float32)
        return np.stack([missing if v is None else v for v in vectors])

    # ------------------------------------------------------------ lookups
    def user_of(self, raw: str) -> int:
        index = self.user_index.get(raw)
        if index is None:
            raise NotFound(f"unknown user id {raw!r}")
        return index

    def item_of(self, raw: str) -> int:
        index = self.item_index.get(raw)
        if index is None:
            raise NotFound(f"unknown item id {raw!r}")
        return index

    def resolve_history(self, raw_ids: list[str]) -> np.ndarray:
        """Catalog indices of a history (oldest first; a repeated item counts once, at its first place)."""
        unknown = [raw for raw in raw_ids if raw not in self.item_index]
        if unknown:
            shown = ", ".join(repr(u) for u in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
            raise NotFound(f"unknown item ids in the history: {shown}")
        return np.fromiter(dict.fromkeys(self.item_index[raw] for raw in raw_ids), dtype=np.int64)

    def seen_items(self, user: int) -> np.ndarray:
        return self.seen.indices[self.seen.indptr[user] : self.seen.indptr[user + 1]].astype(np.int64)

    # ------------------------------------------------------------ ranking
    def top(self, user_vector: np.ndarray, k: int, exclude: np.ndarray) -> Ranked:
        if self.index is not None:
            idx, scores = self.index.search(user_vector, k, exclude)
        else:
            scores_all = self.model.ncf_scores(user_vector, self.items0.view())
            idx, scores = top_from_scores(scores_all, k, exclude)
        return Ranked([self.item_ids[i] for i in idx], [float(s) for s in scores], [self.item_texts[i] for i in idx])

    def recommend_user(self, raw_user: str, k: int) -> Ranked:
        """Top-``k`` items a known user has not interacted with in train."""
        user = self.user_of(raw_user)
        return self.top(self.model.users_final[user], k, self.seen_items(user))

    def recommend_history(
        self, history: np.ndarray, profile: np.ndarray | None, k: int, exclude_history: bool = True
    ) -> Ranked:
        """Top-``k`` items for a new user made of ``history`` (catalog indices) and a profile embedding."""
        user = self.new_user_vector(history, profile)
        return self.top(user, k, history if exclude_history else np.zeros(0, np.int64))

    def new_user_vector(self, history: np.ndarray, profile: np.ndarray | None) -> np.ndarray:
        profiles = None
        if profile is not None and self.model.uses_profiles:
            profiles = profile.reshape(1, -1)
        return self.model.new_users([history], self.items0.view(), profiles)[0]

    # ------------------------------------------------------------ prompts
    def field_value(self, item: int, name: str) -> str:
        if item < self.n_base:
            return str(self.data.item_fields[name][item])
        return self.added[item - self.n_base].fields.get(name, "")

    def prompt_dataset(self, items: list[int], new_fields: dict[str, str] | None = None) -> RecDataset:
        """The catalog's text for ``items`` as a small dataset the prompt builders can read (a not yet added
        item, ``new_fields``, comes first)."""
        names = list(self.data.item_fields)
        fields = {n: ([new_fields.get(n, "")] if new_fields is not None else []) for n in names}
        ids = (["(new)"] if new_fields is not None else []) + [self.item_ids[i] for i in items]
        for n in names:
            fields[n] += [self.field_value(i, n) for i in items]
        empty = np.zeros(0, np.int64)
        return RecDataset(self.data.name, [], ids, empty, empty, fields)

    def user_prompt(self, history: np.ndarray) -> str:
        budget = self.settings.budget
        kept = [int(i) for i in history][-budget.max_items :] if budget.max_items else [int(i) for i in history]
        return budget.user_prompt(self.prompt_dataset(kept), list(range(len(kept))))

    def item_recipe_inputs(self) -> tuple[dict[int, str], np.ndarray]:
        """The item side's teacher profiles and neighbour pool (reclm.llm.item_side), as at generation."""
        from reclm.llm.item_side import neighbour_pool, teacher_item_profiles

        teacher = teacher_item_profiles(self.run.teacher / "items.jsonl", self.data, self.split)
        return teacher, neighbour_pool(self.split, teacher)

    def item_neighbours(self, text_vector: np.ndarray) -> list[int]:
        """The pool items closest to a new item's text, as many as the run's item prompts show."""
        from reclm.llm.neighbours import cosine_top_k

        k = self.settings.budget.max_neighbours
        if self.text_vectors is None or not k:
            return []
        idx, _ = cosine_top_k(self.text_vectors, k, candidates=self.neighbour_pool, query_vectors=text_vector[None])
        return [int(i) for i in idx[0] if i >= 0]

    def item_prompt(self, fields: dict[str, str], neighbours: list[int]) -> str:
        data = self.prompt_dataset(neighbours, new_fields=fields)
        profiles = [self.teacher_item_profiles.get(i) for i in neighbours]
        return self.settings.budget.item_prompt(data, 0, list(range(1, len(neighbours) + 1)), profiles)

    def item_text(self, fields: dict[str, str]) -> str:
        """The text the CF model's item encoder reads, formatted as the dataset's ``item_text``."""
        return self.prompt_dataset([], new_fields=fields).item_text(0)

    # ------------------------------------------------------------ profiles on the fly
    async def wait(self, future: Future) -> Written:
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.options.profile_timeout)
        except asyncio.TimeoutError as exc:
            raise TimedOut(f"profile writing took more than {self.options.profile_timeout:g} s") from exc

    def submit(self, kind: str, prompt: str) -> Future:
        try:
            return self.writer.submit(kind, prompt)
        except QueueFull as exc:
            raise Busy(f"the profile writer is busy: {exc}; retry later") from exc

    async def new_user_profile(self, history: np.ndarray, raw_history: list[str]) -> Outcome:
        """The profile of a new user: from serve.sqlite when this prompt was answered before, else written."""
        from anyio import to_thread

        if not self.model.uses_profiles:
            return Outcome(None, None, "unused")
        if self.writer is None:
            return Outcome(None, None, "disabled")
        prompt = self.user_prompt(history)
        key = self.writer.key("user", prompt)
        stored = await to_thread.run_sync(self.store.user_profile, key)
        if stored is not None and stored.encoder == self.encoder.name:
            return Outcome(stored.profile, stored.vector, "cached")
        written = await self.wait(self.submit("user", prompt))
        identity = self.writer.identity("user")
        await to_thread.run_sync(
            lambda: self.store.put_user_profile(
                key,
                raw_history,
                prompt,
                written.profile,
                identity,
                self.encoder.name,
                written.vector,
                limit=self.options.max_stored_profiles,
            )
        )
        with self.lock:
            self.stats.new_users += 1
        return Outcome(written.profile, written.vector, "generated")

    # ------------------------------------------------------------ new items
    def check_fields(self, fields: dict[str, str]) -> dict[str, str]:
        names = list(self.data.item_fields)
        unknown = sorted(set(fields) - set(names))
        if unknown:
            raise InvalidInput(f"unknown item fields {unknown}: this catalog's fields are {', '.join(names)}")
        cleaned = {n: " ".join(str(fields.get(n, "")).split()) for n in names}
        if not any(cleaned.values()):
            raise InvalidInput(f"a new item needs text in at least one field ({', '.join(names)})")
        return cleaned

    async def add_item(self, item_id: str | None, fields: dict[str, str], profile: str | None) -> StoredItem:
        """Encode a new item from its text (its profile given, or written by the item writer) and add it to the
        catalog and serve.sqlite; it is recommendable when this returns."""
        from anyio import to_thread

        if not self.model.takes_new_items:
            raise Unsupported(f"model {self.choice.name} has only item ID embeddings: it cannot take new items")
        fields = self.check_fields(fields)
        if item_id is not None and item_id in self.item_index:
            raise Conflict(f"item id {item_id!r} already exists")
        if (await to_thread.run_sync(self.store.counts))["items"] >= self.options.max_added_items:
            raise self.full()
        text = self.item_text(fields)
        text_vector = (await to_thread.run_sync(self.encoder.encode, [text]))[0]
        prompt = None
        if profile is not None:
            outcome = Outcome(profile.strip(), None, "given")
        elif not self.model.uses_profiles:
            outcome = Outcome(None, None, "unused")
        elif self.writer is None:
            outcome = Outcome(None, None, "disabled")
        else:
            prompt = self.item_prompt(fields, self.item_neighbours(text_vector))
            written = await self.wait(self.submit("item", prompt))
            outcome = Outcome(written.profile, written.vector, "generated")
        if outcome.status == "given" and self.model.uses_profiles:
            outcome.vector = (await to_thread.run_sync(self.encoder.encode_profiles, [outcome.profile]))[0]
        item = StoredItem(
            id=item_id or "",
            fields=fields,
            text=text,
            profile=outcome.profile,
            profile_source=outcome.status,
            prompt=prompt,
            encoder=self.encoder.name,
            text_vector=text_vector,
            profile_vector=outcome.vector,
        )
        return await to_thread.run_sync(self.commit_item, item)

    def commit_item(self, item: StoredItem) -> StoredItem:
        items0, final = self.model.new_items(item.text_vector[None], self.profile_matrix([item.profile_vector]))
        with self.lock:
            if item.id and item.id in self.item_index:
                raise Conflict(f"item id {item.id!r} already exists")
            try:  # a new-<n> id is chosen inside the store's write transaction: servers sharing it never clash
                self.store.add_item(item, len(self.item_ids) + 1, self.item_index, self.options.max_added_items)
            except DuplicateItem as exc:
                raise Conflict(f"item id {item.id!r} already exists") from exc
            except StoreFull as exc:
                raise self.full() from exc
            self.append_items([item], items0, final)
            self.stats.new_items += 1
        return item

    def full(self) -> LimitReached:
        return LimitReached(f"this run holds the most items clients may add ({self.options.max_added_items})")

    def append_items(self, items: list[StoredItem], items0: np.ndarray, final: np.ndarray) -> None:
        """Under ``self.lock``: ids and texts first, then the rows that point at them, then the id lookup."""
        start = len(self.item_ids)
        self.added.extend(items)
        self.item_ids.extend(s.id for s in items)
        self.item_texts.extend(s.text for s in items)
        self.items0.append(items0)
        if self.items_final is not self.items0:
            self.items_final.append(final)
        for offset, item in enumerate(items):
            self.item_index[item.id] = start + offset
        if self.index is not None:
            self.index.refresh()

    # ------------------------------------------------------------ profiles of known ids
    def user_profile(self, raw: str) -> str:
        self.user_of(raw)
        profile = self.user_profiles.get(raw)
        if not profile:
            raise NotFound(f"user {raw!r} has no profile in this run (profiles/users.jsonl)")
        return profile

    def item_profile(self, raw: str) -> tuple[str, str]:
        """(profile, source): ``run`` for the dataset's items, how it was made for added ones."""
        item = self.item_of(raw)
        if item >= self.n_base:
            added = self.added[item - self.n_base]
            if not added.profile:
                raise NotFound(f"item {raw!r} was added without a profile ({added.profile_source})")
            return added.profile, added.profile_source
        profile = self.item_profiles.get(raw)
        if not profile:
            raise NotFound(f"item {raw!r} has no profile in this run (profiles/items.jsonl)")
        return profile, "run"

    # ------------------------------------------------------------ status
    def shown_path(self, path: str | Path | None) -> str | None:
        """A path as /health shows it: relative to the run, else its last folder name (no absolute paths); a
        name that is no path (a packaged encoder) as it is."""
        if path is None:
            return None
        if not Path(path).is_absolute() and len(Path(path).parts) == 1:
            return str(path)
        try:
            return Path(path).resolve().relative_to(self.run.root.resolve()).as_posix()
        except ValueError:
            return Path(path).name

    def health(self) -> dict:
        """What /health shows: no absolute path (the run by its folder name, adapters relative to it)."""
        adapters = {k: self.shown_path(v) for k, v in self.adapters.items()}
        return {
            "status": "ok",
            "run": self.run.root.resolve().name,
            "dataset": self.data.name,
            "model": {
                "name": self.choice.name,
                "backbone": self.choice.backbone,
                "features": self.choice.features,
                "valid": self.choice.valid,
            },
            "users": self.data.n_users,
            "items": len(self.item_ids),
            "added_items": len(self.item_ids) - self.n_base,
            "item_fields": list(self.data.item_fields),
            "index": self.index.backend if self.index is not None else "model (ncf)",
            "profiles": {
                "backend": self.options.profile_backend if self.writer else "none",
                "used_by_model": self.model.uses_profiles,
                "adapters": adapters,
                "writer": self.writer.stats() if self.writer else None,
                "encoder": self.shown_path(self.encoder.name) if self.encoder else None,
            },
            "limits": {
                "k": MAX_K,
                "history": MAX_HISTORY,
                "added_items": self.options.max_added_items,
                "stored_profiles": self.options.max_stored_profiles,
            },
            "uptime_s": round(time.time() - self.stats.started, 1),
        }

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.store.close()
