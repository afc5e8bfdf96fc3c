"""Profile quality report over a profiles JSONL (generated or teacher).

Per kind (users, items):
- ``format_rate``: share of records whose profile parses (:func:`parse_profile`) with 1-5 identities
  and 1-5 interests; ``strict_rate``: share that is exactly one profile line and nothing else;
- ``empty_rate``: share with an empty profile;
- ``duplicate_rate``: share of non-empty profiles that repeat an earlier record's text
  (``1 - distinct / non-empty``); a collapsed generator scores high;
- ``mean_words`` / ``mean_chars``, ``mean_identities`` / ``mean_interests`` (over parsed profiles);
- ``similarity``: mean cosine similarity (TextEncoder embeddings) between each profile and the
  reference profile of the SAME id (held-out teacher profiles), with ``shuffled``: the same mean
  against the reference of another id, the level a profile unrelated to its user reaches.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from reclm.data.errors import DataError
from reclm.llm.prompts import parse_profile
from reclm.llm.records import KINDS, ProfileRecord, read_profiles, read_records
from reclm.rundir import RunDir

MIN_ENTRIES, MAX_ENTRIES = 1, 5
STRICT_LINE = re.compile(r"\s*User identity:[^;\n]+;\s*User interests:[^;\n]+?\.?\s*", re.I)
KIND_FILES = {"user": "users.jsonl", "item": "items.jsonl"}


def compliant(profile: str) -> bool:
    parsed = parse_profile(profile)
    if parsed is None:
        return False
    identities, interests = parsed
    return MIN_ENTRIES <= len(identities) <= MAX_ENTRIES and MIN_ENTRIES <= len(interests) <= MAX_ENTRIES


def repeats_an_entry(profile: str) -> bool:
    """Whether a part of the profile lists one entry twice ("Drama, Drama"; case-insensitive)."""
    parsed = parse_profile(profile)
    return parsed is not None and any(len({e.lower() for e in part}) < len(part) for part in parsed)


def text_stats(profiles: list[str]) -> dict:
    """Format, empty, duplicate and length statistics of a list of profile texts."""
    n = len(profiles)
    if n == 0:
        return {"count": 0}
    texts = [p.strip() for p in profiles]
    nonempty = [t for t in texts if t]
    parsed = [p for p in (parse_profile(t) for t in nonempty) if p is not None]
    return {
        "count": n,
        "format_rate": round(sum(compliant(t) for t in texts) / n, 4),
        "strict_rate": round(sum(bool(STRICT_LINE.fullmatch(t)) for t in texts) / n, 4),
        "empty_rate": round((n - len(nonempty)) / n, 4),
        "duplicate_rate": round(1 - len(set(nonempty)) / len(nonempty), 4) if nonempty else 0.0,
        "mean_words": round(float(np.mean([len(t.split()) for t in texts])), 2),
        "mean_chars": round(float(np.mean([len(t) for t in texts])), 2),
        "mean_identities": round(float(np.mean([len(p[0]) for p in parsed])), 2) if parsed else 0.0,
        "mean_interests": round(float(np.mean([len(p[1]) for p in parsed])), 2) if parsed else 0.0,
    }


def similarity(profiles: Mapping[str, str], reference: Mapping[str, str], encoder, ids: Iterable[str] | None = None):
    """Mean cosine between each profile and the reference of the same id (ids in both, non-empty),
    and the shuffled baseline (each profile against the next id's reference)."""
    wanted = set(reference) & set(profiles) if ids is None else set(ids) & set(reference) & set(profiles)
    common = sorted(i for i in wanted if profiles[i].strip() and reference[i].strip())
    if not common:
        return {"compared": 0}
    a = encoder.encode([profiles[i] for i in common], desc="profiles")
    b = encoder.encode([reference[i] for i in common], desc="reference")
    same = np.sum(a * b, axis=1)
    out = {"compared": len(common), "mean_cosine": round(float(same.mean()), 4), "encoder": encoder.name}
    if len(common) > 1:
        out["shuffled"] = round(float(np.sum(a * np.roll(b, 1, axis=0), axis=1).mean()), 4)
    return out


def kind_report(
    records: list[ProfileRecord],
    reference: Mapping[str, str] | None = None,
    encoder=None,
    ids: Iterable[str] | None = None,
) -> dict:
    out = text_stats([r.profile for r in records])
    if reference is not None and encoder is not None:
        out["similarity"] = similarity({r.id: r.profile for r in records}, reference, encoder, ids)
    return out


def read_heldout(path: str | Path) -> dict[str, set[str]]:
    """Held-out ids by kind from JSON (``{"user": [...], "item": [...]}``, ``{"users": ..., "items":
    ...}`` or a plain list, taken as user ids) or from a records JSONL (ids by record kind)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("no held-out id file here", path)
    if path.suffix == ".jsonl":
        out: dict[str, set[str]] = {k: set() for k in KINDS}
        for record in read_records(path):
            out[record.kind].add(record.id)
        return out
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON ({exc.msg}); expected held-out ids", path) from exc
    if isinstance(data, list):
        return {"user": {str(x) for x in data}, "item": set()}
    if isinstance(data, dict):
        return {k: {str(x) for x in data.get(k, data.get(k + "s", []))} for k in KINDS}
    raise DataError("expected a list of ids or {'user': [...], 'item': [...]}", path)


def quality_report(
    folder: str | Path,
    reference: str | Path | None = None,
    heldout: Mapping[str, Iterable[str]] | None = None,
    encoder=None,
) -> dict:
    """The report for ``folder/{users,items}.jsonl``; ``reference`` is a folder with the teacher's
    files of the same names, ``heldout`` limits the similarity to those ids per kind."""
    folder = Path(folder)
    found = {k: folder / f for k, f in KIND_FILES.items() if (folder / f).is_file()}
    if not found:
        raise DataError("no profiles here (expected users.jsonl and/or items.jsonl)", folder)
    report: dict = {"source": str(folder)}
    if reference is not None:
        report["reference"] = str(reference)
        report["heldout"] = heldout is not None
    for kind, path in found.items():
        ref = None
        if reference is not None and (Path(reference) / KIND_FILES[kind]).is_file():
            ref = read_profiles(Path(reference) / KIND_FILES[kind], kind)  # type: ignore[arg-type]
        ids = None if heldout is None else heldout.get(kind, ())
        report[kind + "s"] = kind_report(read_records(path, kind), ref, encoder if ref else None, ids)  # type: ignore[arg-type]
    return report


def run_quality(
    run: str | Path | RunDir,
    source: str = "profiles",
    reference: str | None = "teacher",
    heldout: str | Path | None = None,
    encoder=None,
    write: bool = True,
) -> dict:
    """Quality of ``RUN/<source>`` against ``RUN/<reference>``; held-out ids from ``heldout`` or, when
    present, ``RUN/sft/heldout.json``. Writes ``RUN/<source>/quality.json``."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    folder = run.root / source
    ref = run.root / reference if reference and reference != source else None
    if heldout is None and (run.stage("sft") / "heldout.json").is_file():
        heldout = run.stage("sft") / "heldout.json"
    ids = read_heldout(heldout) if heldout is not None else None
    if ref is not None and encoder is None:
        from reclm.text.encoder import TextEncoder

        encoder = TextEncoder()
    report = quality_report(folder, ref if ref is not None and ref.is_dir() else None, ids, encoder)
    # names relative to the run, so a rerun elsewhere (or a moved run) writes the same bytes
    report["source"] = source
    if "reference" in report:
        report["reference"] = reference
    if heldout is not None:
        report["heldout_file"] = relative_to_run(Path(heldout), run.root)
    if write:
        (folder / "quality.json").write_text(json.dumps(report, indent=2))
    return report


def relative_to_run(path: Path, root: Path) -> str:
    """``path`` relative to the run folder when it lies inside it (any stage's work folder counts), else as is."""
    for base in (root, root / ".work"):
        try:
            return str(path.resolve().relative_to(base.resolve()))
        except ValueError:
            continue
    return str(path)
