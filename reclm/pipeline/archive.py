"""``reclm export`` / ``reclm import``: a run's finished stages in one tar archive, resumed elsewhere.

An archive holds ``SHA256SUMS`` (``sha256sum -c`` format, first member), ``reclm-export.json`` (what was
exported), ``RUN/config.yaml``, the manifest of every complete stage and that stage's output folder, files
only. Output hashes are the manifests' recorded ones, checked again while the files are packed. Nothing
else leaves the run: no ``.work/`` (stages in progress), no ``.off/`` (parked outputs), no lock file, no
generation cache (it lives outside the run) and no dataset copy: ``data/`` holds the split and names the
dataset, which must exist on the target machine (import checks its fingerprint).

Import unpacks into a temporary folder beside the target (``tarfile``'s ``data`` filter, after refusing
absolute names, ``..``, links and devices itself), verifies every checksum and that each file belongs to a
finished stage, restores the recorded modification times (so the cache trusts the files without hashing
them again), points the manifests' input-file paths at this machine's copies of the same files (an
installed dataset such as ml-100k sits under a different virtual environment) and renames the folder into
place: an import that fails leaves nothing behind.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import secrets
import shutil
import tarfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from reclm import __version__
from reclm.data.errors import DataError
from reclm.pipeline.config import load_config, stable_hash
from reclm.pipeline.engine import Stage
from reclm.pipeline.formatting import now
from reclm.pipeline.hashing import outputs_intact, path_hash
from reclm.rundir import RunDir
from reclm.utils import fsync_path, read_json

SUMS = "SHA256SUMS"
INFO = "reclm-export.json"
CONFIG = "config.yaml"
FORMAT = 1
CHUNK = 1 << 20


class ArchiveError(ValueError):
    """An archive cannot be written or imported; the message is one line for the user."""


@dataclass
class FinishedStage:
    """A complete stage of a run: its manifest (as bytes, exported unchanged) and its output files."""

    name: str
    folder: str
    manifest: bytes
    outputs: dict[str, dict[str, Any]]


@dataclass
class ExportSummary:
    archive: Path
    stages: list[str]
    skipped: dict[str, str]  # stage -> why it was left out
    files: int
    bytes: int


@dataclass
class ImportSummary:
    run: Path
    stages: list[str]
    files: int
    rebased: list[str] = field(default_factory=list)  # stages whose input-file paths now name this machine's
    dataset: str | None = None


# ---------------------------------------------------------------- shared helpers


def archive_mode(path: Path, writing: bool) -> str:
    """``w`` / ``w:gz`` from the archive's suffix when writing; any supported compression when reading."""
    if not writing:
        return "r:*"
    name = path.name.lower()
    if name.endswith((".tar.gz", ".tgz")):
        return "w:gz"
    if name.endswith(".tar"):
        return "w"
    raise ArchiveError(f"{path}: expected an archive name ending in .tar, .tar.gz or .tgz")


def stage_folders(stages: Sequence[Stage]) -> dict[str, str]:
    return {s.name: s.folder for s in stages}


def default_stages() -> list[Stage]:
    from reclm.pipeline.table import STAGES

    return STAGES


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def safe_name(name: str) -> bool:
    """A relative POSIX path with no ``..``, no empty or ``.`` parts, no backslash and no line break."""
    return not any(c in name for c in "\\\n\r") and all(part not in ("", ".", "..") for part in name.split("/"))


# ---------------------------------------------------------------- export


def finished_stages(root: Path, stages: Sequence[Stage]) -> tuple[list[FinishedStage], dict[str, str]]:
    """Complete stages whose output folder still holds exactly what their manifest recorded, in run order,
    and why any other recorded stage is left out."""
    found: list[FinishedStage] = []
    skipped: dict[str, str] = {}
    for name, folder in stage_folders(stages).items():
        path = root / "manifests" / f"{name}.json"
        if not path.is_file():
            continue
        raw = path.read_bytes()
        record = read_json(path) or {}
        status = record.get("status", "unreadable")
        if status != "complete":
            if status != "off":
                skipped[name] = f"not finished ({status})"
            continue
        outputs = record.get("outputs") or {}
        if record.get("folder", folder) != folder or not all(safe_name(n) for n in outputs):
            skipped[name] = "manifest names an unexpected folder"
        elif not outputs_intact(root / folder, outputs):
            skipped[name] = "outputs changed since its manifest"
        else:
            found.append(FinishedStage(name, folder, raw, outputs))
    return found, skipped


class HashingReader:
    """A file read through sha256, so packing a file also checks it."""

    def __init__(self, handle: IO[bytes]):
        self.handle = handle
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.digest.update(data)
        return data


def tar_info(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, int(mtime), 0o644
    return info


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    tar.addfile(tar_info(name, len(data), mtime), io.BytesIO(data))


def add_output(tar: tarfile.TarFile, root: Path, name: str, expected: str) -> int:
    """Pack ``root/name``, failing when its content is not the recorded ``expected`` hash."""
    path = root / name
    stat = path.stat()
    with path.open("rb") as handle:
        reader = HashingReader(handle)
        tar.addfile(tar_info(name, stat.st_size, stat.st_mtime), reader)
    if reader.digest.hexdigest() != expected:
        raise ArchiveError(f"{name}: changed since its manifest recorded it (is a run writing it?); export again")
    return stat.st_size


def export_run(root: Path, archive: Path, stages: Sequence[Stage] | None = None) -> ExportSummary:
    """Pack the finished stages of ``root`` into ``archive`` (written beside, then renamed into place)."""
    root, archive = Path(root), Path(archive)
    mode = archive_mode(archive, writing=True)
    if not (root / "manifests").is_dir():
        raise ArchiveError(f"{root}: not a run directory (no manifests/); run `reclm run` first")
    found, skipped = finished_stages(root, stages or default_stages())
    if not found:
        raise ArchiveError(f"{root}: no finished stage to export")
    meta = export_meta(root, found, skipped)
    sums = {name: hashlib.sha256(data).hexdigest() for name, data in meta.items()}
    for stage in found:
        sums.update({f"{stage.folder}/{n}": info["sha256"] for n, info in stage.outputs.items()})
    tmp = archive.with_name(f".{archive.name}.{secrets.token_hex(4)}.tmp")
    archive.parent.mkdir(parents=True, exist_ok=True)
    total, stamp = 0, (root / "manifests").stat().st_mtime
    try:
        options = {"compresslevel": 6} if mode == "w:gz" else {}  # gzip's own default: 9 takes twice as long
        with tarfile.open(tmp, mode, format=tarfile.PAX_FORMAT, **options) as tar:
            add_bytes(tar, SUMS, "".join(f"{h}  {n}\n" for n, h in sums.items()).encode(), stamp)
            for name, data in meta.items():
                add_bytes(tar, name, data, stamp)
            for stage in found:
                for name, info in stage.outputs.items():
                    total += add_output(tar, root, f"{stage.folder}/{name}", info["sha256"])
        fsync_path(tmp)
        tmp.replace(archive)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ExportSummary(archive, [s.name for s in found], skipped, len(sums), total)


def export_meta(root: Path, found: list[FinishedStage], skipped: dict[str, str]) -> dict[str, bytes]:
    """The small members: what was exported, the run's config and the finished stages' manifests."""
    info = {
        "format": FORMAT,
        "reclm": __version__,
        "created": now(),
        "source": str(root.resolve()),
        "stages": [s.name for s in found],
        "skipped": skipped,
    }
    meta = {INFO: json.dumps(info, indent=2).encode()}
    if (root / CONFIG).is_file():
        meta[CONFIG] = (root / CONFIG).read_bytes()
    meta.update({f"manifests/{s.name}.json": s.manifest for s in found})
    return meta


# ---------------------------------------------------------------- import: unpacking and checking


def check_member(member: tarfile.TarInfo) -> None:
    """Refuse what could write outside the target or is not a plain file or folder."""
    if not safe_name(member.name.rstrip("/")):
        raise ArchiveError(f"archive member {member.name!r}: absolute path or '..' (refused)")
    if not (member.isfile() or member.isdir()):
        raise ArchiveError(f"archive member {member.name!r}: a link or device (refused)")


def unpack(archive: Path, target: Path) -> list[str]:
    """Extract every member of ``archive`` into ``target`` (one pass); the regular files' names in order."""
    names: list[str] = []
    try:
        with tarfile.open(archive, archive_mode(archive, writing=False)) as tar:
            for member in tar:
                check_member(member)
                tar.extract(member, target, filter="data")
                if member.isfile():
                    names.append(member.name)
    except tarfile.FilterError as exc:
        raise ArchiveError(f"archive member refused: {exc}") from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        detail = (str(exc).splitlines() or [type(exc).__name__])[0].rstrip(":")
        raise ArchiveError(f"{archive}: not a readable tar archive ({detail})") from None
    except OSError as exc:
        raise ArchiveError(f"{archive}: cannot unpack ({exc})") from None
    return names


def read_sums(folder: Path) -> dict[str, str]:
    """``SHA256SUMS`` as {name: sha256}, in its order."""
    path = folder / SUMS
    if not path.is_file():
        raise ArchiveError(f"the archive has no {SUMS}: not made by `reclm export`")
    sums: dict[str, str] = {}
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not safe_name(name):
            raise ArchiveError(f"{SUMS} line {number}: not '<sha256>  <file>'")
        sums[name] = digest
    return sums


def verify_sums(folder: Path, sums: dict[str, str], names: list[str]) -> None:
    """Every file listed, present and with its listed content; the first bad one is named."""
    unlisted = [n for n in names if n != SUMS and n not in sums]
    if unlisted:
        raise ArchiveError(f"archive member {unlisted[0]!r} is not in {SUMS} (refused)")
    present = set(names)
    for name, digest in sums.items():
        if name not in present:
            raise ArchiveError(f"{name}: listed in {SUMS} but missing from the archive")
        if sha256_file(folder / name) != digest:
            raise ArchiveError(f"checksum mismatch: {name} (the archive is damaged or was altered)")


def imported_manifests(folder: Path, sums: dict[str, str], stages: Sequence[Stage]) -> dict[str, dict[str, Any]]:
    """The archive's manifests, each complete, agreeing with ``SHA256SUMS`` on every output; every file
    belongs to one of them (or is the config or the export record)."""
    folders = stage_folders(stages)
    records: dict[str, dict[str, Any]] = {}
    owned = {SUMS, INFO, CONFIG}
    for name in sums:
        if not (name.startswith("manifests/") and name.endswith(".json")):
            continue
        stage = name.removeprefix("manifests/").removesuffix(".json")
        record = read_json(folder / name) or {}
        if stage not in folders or record.get("status") != "complete" or record.get("folder") != folders[stage]:
            raise ArchiveError(f"{name}: not the manifest of a finished stage of this reclm")
        for output, info in (record.get("outputs") or {}).items():
            member = f"{folders[stage]}/{output}"
            if sums.get(member) != info.get("sha256"):
                raise ArchiveError(f"{name} and {SUMS} disagree on {member}")
            owned.add(member)
        owned.add(name)
        records[stage] = record
    stray = [n for n in sums if n not in owned]
    if stray:
        raise ArchiveError(f"{stray[0]}: not an output of a finished stage (refused)")
    return records


def restore_mtimes(folder: Path, records: dict[str, dict[str, Any]]) -> None:
    """The recorded modification times on the verified outputs: the cache then trusts them unhashed."""
    for record in records.values():
        for output, info in record["outputs"].items():
            if isinstance(info.get("mtime_ns"), int):
                os.utime(folder / record["folder"] / output, ns=(info["mtime_ns"], info["mtime_ns"]))


# ---------------------------------------------------------------- import: paths of this machine


def rebased_files(recorded: dict[str, str], local: list[Path]) -> dict[str, str] | None:
    """``local`` paths standing for the ``recorded`` input files {path: content hash} when they are the same
    files elsewhere (same names, same contents, same order); None when they are not."""
    if len(local) != len(recorded):
        return None
    mapped = {str(p): path_hash(p) for p in local}
    pairs = zip(recorded.items(), mapped.items(), strict=True)
    if all(Path(old).name == Path(new).name and h == g for (old, h), (new, g) in pairs):
        return mapped
    return None


def rebase_manifests(folder: Path, records: dict[str, dict[str, Any]], stages: Sequence[Stage]) -> list[str]:
    """Point each manifest's input files at this machine's copies (an installed dataset lives under another
    virtual environment elsewhere) and update its input hash; only where the old hash is reproduced from
    the recorded inputs and every file has the same content. The stages rewritten."""
    config = local_config(folder)
    if config is None:
        return []
    by_name = {s.name: s for s in stages}
    changed = []
    for name, record in records.items():
        inputs = record.get("inputs") or {}
        recorded = inputs.get("files") or {}
        if not recorded or stable_hash(inputs) != record.get("input_hash"):
            continue
        try:
            local = by_name[name].files(config)
        except (DataError, OSError):
            continue
        mapped = rebased_files(recorded, local)
        if mapped is None or mapped == recorded:
            continue
        record["inputs"] = {**inputs, "files": mapped}
        record["input_hash"] = stable_hash(record["inputs"])
        path = folder / "manifests" / f"{name}.json"
        path.write_text(json.dumps(record, indent=2, default=str))
        changed.append(name)
    return changed


def local_config(folder: Path) -> Any:
    """The run's effective config read on this machine; None when it cannot be (its data is elsewhere)."""
    try:
        return load_config(folder / CONFIG)
    except (ValueError, DataError, OSError):
        return None


def rewrite_out(folder: Path, run: Path) -> None:
    """``out`` in the run's config names the folder it now lives in (``reclm run RUN/config.yaml``)."""
    path = folder / CONFIG
    if not path.is_file():
        return
    raw = yaml.safe_load(path.read_text())
    if isinstance(raw, dict) and raw.get("out"):
        raw["out"] = str(run.resolve())
        path.write_text(yaml.safe_dump(raw, sort_keys=False))


def check_dataset(folder: Path) -> str | None:
    """The run's dataset as ``data/dataset.json`` names it, loaded and fingerprinted on this machine."""
    if not (folder / "data" / "dataset.json").is_file():
        return None
    spec = RunDir(folder).dataset_spec()
    try:
        RunDir(folder).load()
    except (DataError, OSError) as exc:
        message = str(exc).replace(str(folder), "RUN")
        raise ArchiveError(
            f"the run needs its dataset {spec['dataset']!r} (fingerprint {spec['fingerprint']}) on this machine, "
            f"at the same path or name: {message}"
        ) from None
    return str(spec["dataset"])


# ---------------------------------------------------------------- import


def check_target(run: Path) -> None:
    if run.exists() and (not run.is_dir() or any(run.iterdir())):
        raise ArchiveError(f"{run}: exists and is not empty; import into a new or empty folder")


@dataclass
class Scratch:
    """A temporary folder beside the target, removed unless moved into place."""

    path: Path

    @classmethod
    def beside(cls, run: Path) -> Scratch:
        run.parent.mkdir(parents=True, exist_ok=True)
        path = run.parent / f".{run.name}.import-{secrets.token_hex(4)}"
        path.mkdir()
        return cls(path)

    def move_to(self, run: Path) -> None:
        if run.is_dir():
            run.rmdir()  # empty (checked); fails, and keeps it, if something appeared there since
        self.path.rename(run)
        fsync_path(run.parent)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def import_run(archive: Path, run: Path, stages: Sequence[Stage] | None = None) -> ImportSummary:
    """Unpack ``archive`` into the new or empty folder ``run``, verified, or leave nothing behind."""
    archive, run = Path(archive), Path(run)
    stages = stages or default_stages()
    check_target(run)
    if not archive.is_file():
        raise ArchiveError(f"{archive}: no such archive")
    scratch = Scratch.beside(run)
    try:
        summary = unpack_verified(archive, scratch.path, run, stages)
        scratch.move_to(run)
    except BaseException:
        scratch.discard()
        raise
    return summary


def unpack_verified(archive: Path, folder: Path, run: Path, stages: Sequence[Stage]) -> ImportSummary:
    names = unpack(archive, folder)
    sums = read_sums(folder)
    verify_sums(folder, sums, names)
    records = imported_manifests(folder, sums, stages)
    restore_mtimes(folder, records)
    rebased = rebase_manifests(folder, records, stages)
    rewrite_out(folder, run)
    dataset = check_dataset(folder)
    (folder / SUMS).unlink()  # checked; the manifests now hold the hashes (and this machine's paths)
    ordered = [s.name for s in stages if s.name in records]
    return ImportSummary(run, ordered, len(sums), rebased, dataset)


__all__ = [
    "ArchiveError",
    "ExportSummary",
    "ImportSummary",
    "export_run",
    "import_run",
]
