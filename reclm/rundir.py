"""The run directory: one folder holds every stage's inputs and outputs, so each CLI step and the
pipeline read and write the same places."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from reclm.data.dataset import RecDataset
from reclm.data.errors import DataError
from reclm.data.loaders import load_dataset
from reclm.data.split import Split, SplitSpec, make_split


@dataclass(frozen=True)
class RunDir:
    """``redirect`` maps a top-level folder name to another place: the pipeline points the folder
    a stage is writing at its work folder, so code written against RunDir writes crash-safely."""

    root: Path
    redirect: tuple[tuple[str, Path], ...] = ()

    def __init__(self, root: str | Path, redirect: dict[str, str | Path] | None = None):
        object.__setattr__(self, "root", Path(root))
        object.__setattr__(self, "redirect", tuple((k, Path(v)) for k, v in (redirect or {}).items()))

    def path(self, name: str) -> Path:
        return dict(self.redirect).get(name, self.root / name)

    # ------------------------------------------------------------ well-known paths
    @property
    def data(self) -> Path:
        return self.path("data")

    @property
    def teacher(self) -> Path:
        return self.path("teacher")

    @property
    def profiles(self) -> Path:
        return self.path("profiles")

    @property
    def embeddings(self) -> Path:
        return self.path("embeddings")

    @property
    def cf(self) -> Path:
        return self.path("cf")

    @property
    def manifests(self) -> Path:
        return self.path("manifests")

    @property
    def report(self) -> Path:
        return self.path("report")

    def stage(self, name: str) -> Path:
        """Folder of a training stage (sft, collab, reward, rl, item_sft, neighbours...)."""
        return self.path(name)

    # ------------------------------------------------------------ what stages left for later ones
    def stage_adapter(self, name: str) -> Path | None:
        """``<name>/adapter`` when stage ``name`` left a LoRA adapter there, else None."""
        path = self.stage(name) / "adapter"
        return path if (path / "adapter_config.json").is_file() else None

    def collab_start_adapter(self) -> Path:
        """``sft/adapter``: the distillation adapter collaborative tuning continues."""
        found = self.stage_adapter("sft")
        if found is None:
            raise FileNotFoundError(f"{self.root}: no sft/adapter to start collaborative tuning from (run `reclm sft`)")
        return found

    def rl_start_adapter(self) -> Path:
        """The adapter RL starts from: ``collab/adapter`` if collaborative tuning ran, else ``sft/adapter``."""
        for name in ("collab", "sft"):
            found = self.stage_adapter(name)
            if found is not None:
                return found
        raise FileNotFoundError(
            f"{self.root}: no sft/adapter or collab/adapter to start RL from (run `reclm sft` first)"
        )

    def sft_heldout(self, kind: str = "user") -> set[str] | None:
        """Raw ids of ``kind`` whose teacher profiles SFT held out (``sft/heldout.json``); None before SFT ran."""
        path = self.stage("sft") / "heldout.json"
        if not path.is_file():
            return None
        return {str(i) for i in json.loads(path.read_text()).get(kind, [])}

    def user_profiles(self, source: str) -> Path:
        """The user profiles of ``source``: ``teacher`` (``teacher/users.jsonl``) or ``distilled`` (the
        writer's, ``profiles/users.jsonl``)."""
        folders = {"teacher": self.teacher, "distilled": self.profiles}
        if source not in folders:
            raise ValueError(f"chosen profile source {source!r}: expected teacher or distilled")
        return folders[source] / "users.jsonl"

    # ------------------------------------------------------------ dataset and split
    def prepare(self, dataset: str, spec: SplitSpec, item_text: str | None = None) -> tuple[RecDataset, Split]:
        """Load the dataset, split it and record both in ``data/`` (the split is saved, not recomputed)."""
        data = load_dataset(dataset, item_text=item_text)
        split = make_split(data, spec)
        self.data.mkdir(parents=True, exist_ok=True)
        source = {"dataset": dataset, "item_text": item_text, "fingerprint": data.fingerprint()}
        (self.data / "dataset.json").write_text(json.dumps(source, indent=2))
        split.save(self.data)
        return data, split

    def dataset_spec(self) -> dict:
        path = self.data / "dataset.json"
        if not path.is_file():
            raise DataError("not a prepared run directory (run `reclm prepare` or `reclm run` first)", path)
        return json.loads(path.read_text())

    def load(self) -> tuple[RecDataset, Split]:
        """The dataset and the split saved in this run; fails if the data changed since."""
        source = self.dataset_spec()
        data = load_dataset(source["dataset"], item_text=source.get("item_text"))
        if data.fingerprint() != source["fingerprint"]:
            raise DataError(
                f"dataset {source['dataset']!r} changed since this run was prepared "
                f"(fingerprint {data.fingerprint()} != {source['fingerprint']}); prepare a new run",
                self.data / "dataset.json",
            )
        return data, Split.load(self.data)
