"""``reclm export`` / ``reclm import``: a real tiny run exported, imported into another folder (a fresh clone
elsewhere) and resumed there with every finished stage from cache; damaged and malicious archives refused."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from test_pipeline_end_to_end import stage_lines, tiny_config
from typer.testing import CliRunner

from reclm.cli.main import app
from reclm.pipeline.archive import SUMS, rebase_manifests, rebased_files
from reclm.pipeline.config import stable_hash
from reclm.pipeline.engine import Stage
from reclm.pipeline.hashing import path_hash, walk_files

FASTEST_CF = {"epochs": 2, "patience": 2, "dim": 8, "batch_size": 128, "eval_batch_size": 64, "feature_hidden": [16]}
EXPORTED = ["prepare", "teacher", "profiles", "encode", "train_cf", "report"]


def invoke(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, result.output
    return result.output


def one_line_error(*args: str) -> str:
    output = invoke(*args, code=2).strip()
    assert output.startswith("error:") and "\n" not in output, output
    return output


def stage_files(run: Path) -> dict[str, bytes]:
    """Every output file of the finished stages, by path inside the run."""
    folders = [json.loads(p.read_text()).get("folder") for p in (run / "manifests").glob("*.json")]
    return {str(f.relative_to(run)): f.read_bytes() for d in folders if d for f in walk_files(run / d)}


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_dataset):
    """A finished tiny run (one backbone), with a stage attempt in progress in ``.work/``, and its archive."""
    base = tmp_path_factory.mktemp("archive")
    source, config = base / "source", base / "tiny.yaml"
    data = tiny_config(tiny_dataset, source, backbones=["bias-mf"], side_ablation=False, params=FASTEST_CF)
    config.write_text(yaml.safe_dump({**data, "report": {"examples": 1}}))
    invoke("run", str(config))
    (source / ".work" / "profiles").mkdir(parents=True)
    (source / ".work" / "profiles" / "users.jsonl").write_text("half written\n")
    archive = base / "run.tar"
    output = invoke("export", str(source), str(archive))
    return SimpleNamespace(base=base, source=source, config=config, archive=archive, output=output)


def test_export_packs_only_the_finished_stages_with_a_checksum_list(exported):
    source = exported.source
    assert (source / ".lock").exists() and (source / ".work").is_dir()
    with tarfile.open(exported.archive) as tar:
        members = tar.getmembers()
        sums = dict(line.split("  ")[::-1] for line in tar.extractfile(SUMS).read().decode().splitlines())
    names = [m.name for m in members]
    assert names[0] == SUMS and all(m.isfile() for m in members)
    assert {n.split("/")[0] for n in names} == {
        *(SUMS, "reclm-export.json", "config.yaml", "manifests"),
        *("data", "teacher", "profiles", "embeddings", "cf", "report"),
    }
    assert sorted(n for n in names if n.startswith("manifests/")) == sorted(f"manifests/{s}.json" for s in EXPORTED)
    assert set(names) - {SUMS} == set(sums)
    for stage in EXPORTED:
        manifest = json.loads((source / "manifests" / f"{stage}.json").read_text())
        for name, info in manifest["outputs"].items():
            assert sums[f"{manifest['folder']}/{name}"] == info["sha256"]
    assert "exported 6 finished stages" in exported.output


def test_an_import_elsewhere_resumes_with_every_finished_stage_cached(exported):
    clone = exported.base / "elsewhere" / "run"
    clone.mkdir(parents=True)  # an empty folder will do
    output = invoke("import", str(exported.archive), str(clone))
    assert "imported 6 finished stages" in output and "fingerprint matches" in output
    assert yaml.safe_load((clone / "config.yaml").read_text())["out"] == str(clone.resolve())
    assert not (clone / ".work").exists() and not (clone / ".lock").exists() and leftovers(clone.parent) == []
    before = {s: (clone / "manifests" / f"{s}.json").read_bytes() for s in EXPORTED}

    output = invoke("run", str(exported.config), "--out", str(clone))
    actions = stage_lines(output)
    assert {s for s, a in actions.items() if a == "cached"} == set(EXPORTED)
    assert set(actions.values()) == {"cached", "off"} and "(6 stages from cache)" in output
    assert {s: (clone / "manifests" / f"{s}.json").read_bytes() for s in EXPORTED} == before, "no stage reran"
    assert stage_files(clone) == stage_files(exported.source)


def test_a_gzip_archive_round_trips(exported):
    archive = exported.base / "run.tar.gz"
    invoke("export", str(exported.source), str(archive))
    with tarfile.open(archive, "r:gz") as tar:
        assert tar.getnames()[0] == SUMS
    invoke("import", str(archive), str(exported.base / "from-gz"))
    assert stage_files(exported.base / "from-gz") == stage_files(exported.source)
    assert "expected an archive name ending in .tar" in one_line_error("export", str(exported.source), "x.zip")


def test_an_unfinished_stage_is_left_out_and_is_all_that_runs_after_import(exported):
    """The report stage was interrupted: its manifest says so and its attempt sits in ``.work/report``."""
    partial = exported.base / "partial"
    shutil.copytree(exported.source, partial)
    manifest = partial / "manifests" / "report.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "status": "interrupted"}))
    shutil.move(partial / "report", partial / ".work" / "report")
    archive = exported.base / "partial.tar"
    assert "left out report: not finished (interrupted)" in invoke("export", str(partial), str(archive))

    clone = exported.base / "partial-clone"
    assert "imported 5 finished stages" in invoke("import", str(archive), str(clone))
    actions = stage_lines(invoke("run", str(exported.config), "--out", str(clone)))
    assert actions["report"] == "done" and {s for s, a in actions.items() if a == "cached"} == set(EXPORTED[:-1])
    results = "report/results.json"
    assert (clone / results).read_text() == (exported.source / results).read_text()


def flip_byte(archive: Path, member: str, copy: Path) -> Path:
    """``archive`` with one byte of ``member``'s content changed, as ``copy``."""
    with tarfile.open(archive) as tar:
        offset = tar.getmember(member).offset_data + 3
    data = bytearray(archive.read_bytes())
    data[offset] ^= 0x01
    copy.write_bytes(bytes(data))
    return copy


@pytest.mark.parametrize("member", ["profiles/users.jsonl", "manifests/encode.json", SUMS])
def test_a_tampered_archive_is_refused_with_one_line(exported, member, tmp_path):
    bad = flip_byte(exported.archive, member, tmp_path / "bad.tar")
    message = one_line_error("import", str(bad), str(tmp_path / "run"))
    if member != SUMS:
        assert f"checksum mismatch: {member}" in message
    assert not (tmp_path / "run").exists() and leftovers(tmp_path) == []


def evil_archive(path: Path, member: tarfile.TarInfo) -> Path:
    with tarfile.open(path, "w") as tar:
        tar.addfile(tarfile.TarInfo(SUMS))
        tar.addfile(member, io.BytesIO(b"x" * member.size) if member.isfile() else None)
    return path


def evil_member(kind: str) -> tarfile.TarInfo:
    names = {"parent": "../escaped", "absolute": "/tmp/reclm-escaped", "symlink": "data/link", "device": "data/dev"}
    member = tarfile.TarInfo(names[kind])
    if kind in ("parent", "absolute"):
        member.size = 1
    elif kind == "symlink":
        member.type, member.linkname = tarfile.SYMTYPE, "/etc/passwd"
    else:
        member.type, member.devmajor, member.devminor = tarfile.CHRTYPE, 1, 3
    return member


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink", "device"])
def test_a_member_outside_the_folder_or_not_a_plain_file_is_refused(kind, tmp_path):
    archive = evil_archive(tmp_path / "evil.tar", evil_member(kind))
    target = tmp_path / "deep" / "run"
    message = one_line_error("import", str(archive), str(target))
    assert "(refused)" in message and evil_member(kind).name in message
    assert not target.exists() and leftovers(target.parent) == []
    assert not (tmp_path / "deep" / "escaped").exists() and not Path("/tmp/reclm-escaped").exists()


def test_a_member_no_finished_stage_owns_is_refused(exported, tmp_path):
    archive = tmp_path / "extra.tar"
    shutil.copy(exported.archive, archive)
    with tarfile.open(archive, "a") as tar:
        member = tarfile.TarInfo(".work/profiles/users.jsonl")
        member.size = 4
        tar.addfile(member, io.BytesIO(b"half"))
    assert "not in SHA256SUMS (refused)" in one_line_error("import", str(archive), str(tmp_path / "run"))


def test_import_needs_an_empty_target_and_the_dataset(exported, tiny_dataset, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert "not empty" in one_line_error("import", str(exported.archive), str(busy))
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    assert "no such archive" in one_line_error("import", str(tmp_path / "none.tar"), str(tmp_path / "run"))
    moved = tiny_dataset.with_name(tiny_dataset.name + "-moved")
    tiny_dataset.rename(moved)
    try:
        message = one_line_error("import", str(exported.archive), str(tmp_path / "run"))
    finally:
        moved.rename(tiny_dataset)
    assert f"needs its dataset '{tiny_dataset / 'inter.csv'}'" in message and "fingerprint" in message
    assert not (tmp_path / "run").exists() and leftovers(tmp_path) == []


def test_input_files_of_an_installed_dataset_are_found_where_this_machine_has_them(exported, tmp_path):
    """ml-100k is read from the recbole wheel: on another machine its files sit under another venv."""
    here = tmp_path / "venv" / "ml-100k.inter"
    here.parent.mkdir()
    here.write_text("user,item\n1,2\n")
    other = tmp_path / "other.inter"
    other.write_text("user,item\n1,3\n")
    shutil.copy(exported.source / "config.yaml", tmp_path / "config.yaml")
    (tmp_path / "manifests").mkdir()
    inputs = {"stage": "prepare", "files": {"/elsewhere/.venv/recbole/ml-100k.inter": path_hash(here)}}
    records = {"prepare": {"status": "complete", "inputs": inputs, "input_hash": stable_hash(inputs)}}
    stages = [Stage("prepare", "data", lambda ctx: None, files=lambda cfg: [here])]

    assert rebase_manifests(tmp_path, records, stages) == ["prepare"]
    written = json.loads((tmp_path / "manifests" / "prepare.json").read_text())
    assert written["inputs"]["files"] == {str(here): path_hash(here)}
    assert written["input_hash"] == stable_hash({**inputs, "files": {str(here): path_hash(here)}})
    assert rebased_files(inputs["files"], [other]) is None  # another file's content is never taken for it
    assert rebased_files(inputs["files"], [here, other]) is None
