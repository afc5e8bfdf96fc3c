"""Issue 21, items 19 and 20, as a new user with a CSV would meet them (a 150-user cut of ml-100k): `reclm run`
takes the dataset flags of `prepare`, and checks the whole config against the data before stage 1, so a run
that could not finish stops at once with one line and exit code 2 (the dry run shows the same line)."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from reclm.cli.main import app
from reclm.data.loaders import load_dataset, ml100k_folder
from reclm.data.split import SplitSpec, make_split


@pytest.fixture(scope="module")
def own_data(tmp_path_factory) -> tuple[Path, Path]:
    """``clicks.csv`` (user,item,timestamp of ml-100k's first 150 users) and ``items.csv`` (item,title,year,genres)."""
    folder = tmp_path_factory.mktemp("own")
    inter = pd.read_csv(ml100k_folder() / "ml-100k.inter", sep="\t")
    inter.columns = ["user", "item", "rating", "timestamp"]
    inter[inter.user <= 150][["user", "item", "timestamp"]].to_csv(folder / "clicks.csv", index=False)
    items = pd.read_csv(
        ml100k_folder() / "ml-100k.item", sep="\t", dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE
    )
    items.columns = ["item", "title", "year", "genres"]
    items.to_csv(folder / "items.csv", index=False)
    return folder / "clicks.csv", folder / "items.csv"


def one_error_line(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
def test_data_without_item_text_stops_before_stage_1(own_data, tmp_path, dry_run):
    clicks, _ = own_data
    out = tmp_path / "run"
    line = one_error_line(["run", "--dataset", str(clicks), "--out", str(out)] + (["--dry-run"] if dry_run else []))
    assert f"{clicks}: no item text" in line and "--item-text" in line
    assert not out.exists(), "nothing was started"


def test_run_takes_the_dataset_flags_of_prepare(own_data, tmp_path):
    """--item-text and the split flags reach the run's config: the plan counts the split they make and one
    distinct prompt per user (item text present), with no config file."""
    clicks, items = own_data
    flags = ["--split", "temporal", "--ratios", "0.7,0.15,0.15", "--zero-shot", "0.2", "--zero-shot-items", "latest"]
    flags += ["--cold-valid", "0.1", "--split-seed", "7"]
    result = CliRunner().invoke(
        app,
        ["run", "--dataset", str(clicks), "--item-text", str(items), *flags, "--out", str(tmp_path / "r"), "--dry-run"],
    )
    assert result.exit_code == 0, result.output
    data = load_dataset(clicks, item_text=items)
    spec = SplitSpec("temporal", (0.7, 0.15, 0.15), 0.2, 7, cold_valid_fraction=0.1, zero_shot="latest")
    train = make_split(data, spec).stats()["train"]
    assert train != make_split(data, SplitSpec(cold_valid_fraction=0.05)).stats()["train"]
    assert f"150 users, {data.n_items:,} items, {train:,} train pairs, 150 distinct user prompts" in result.output
    assert not (tmp_path / "r").exists()


def test_flags_override_a_config_file(own_data, tmp_path):
    """A config file's split and item text give way to the flags (as --dataset already did)."""
    from reclm.cli.pipeline import dataset_overrides
    from reclm.pipeline.config import load_config

    clicks, items = own_data
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"dataset": str(clicks), "split": {"method": "random", "seed": 1}}))
    overrides = dataset_overrides(None, str(items), "temporal", "0.6,0.2,0.2", 0.0, None, None, 3)
    config = load_config(path, overrides)
    assert config.item_text == str(items) and config.dataset == str(clicks)
    assert (config.split.method, config.split.ratios, config.split.seed) == ("temporal", (0.6, 0.2, 0.2), 3)
    assert config.split.zero_shot_fraction == 0.0 and config.split.cold_valid_fraction == 0.05


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--ratios", "0.9,0,0.1"], "leaves no valid pairs"),
        (["--split", "temporal", "--ratios", "1,0,0"], "leaves no valid pairs"),
        (["--zero-shot", "0.0001"], "split.zero_shot_fraction 0.0001 of 1,296 items holds out no item"),
        (["--split", "snapshot"], "has no train/test snapshot column"),
        (["--split", "weekly"], "--split 'weekly': expected one of auto, random, temporal, snapshot"),
        (["--ratios", "0.8,0.2"], "--ratios '0.8,0.2': expected three numbers"),
        (["--zero-shot-items", "oldest"], "--zero-shot-items 'oldest': expected one of random, latest"),
    ],
    ids=["no valid", "temporal no valid", "no zero-shot item", "no snapshot", "bad split", "bad ratios", "bad items"],
)
def test_a_config_the_data_cannot_run_is_one_line(own_data, tmp_path, flags, words):
    clicks, items = own_data
    args = [
        "run",
        "--dataset",
        str(clicks),
        "--item-text",
        str(items),
        *flags,
        "--out",
        str(tmp_path / "r"),
        "--dry-run",
    ]
    line = one_error_line(args)
    assert words in line.replace("1296", "1,296")


def test_file_teacher_without_profiles_is_one_line(own_data, tmp_path):
    clicks, items = own_data
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"dataset": str(clicks), "item_text": str(items), "stages": {"teacher": "file"}}))
    line = one_error_line(["run", str(path), "--out", str(tmp_path / "r")])
    assert "stages.teacher: file needs user profiles: the dataset ships no teacher_user_profiles.jsonl" in line
    assert not (tmp_path / "r").exists()


def test_a_dry_run_reads_the_dataset_once(own_data, tmp_path, monkeypatch):
    """The preflight check's dataset and split are the ones the estimates count (a full-size dataset takes
    seconds to load and split)."""
    import reclm.data.loaders as loaders

    clicks, items = own_data
    reads = []
    real = loaders.load_dataset

    def counted(*args, **kwargs):
        reads.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(loaders, "load_dataset", counted)
    result = CliRunner().invoke(
        app, ["run", "--dataset", str(clicks), "--item-text", str(items), "--out", str(tmp_path / "r"), "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    assert reads == [str(clicks)]
    assert "150 users" in result.output
