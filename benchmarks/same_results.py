"""Do two runs of ``reclm run`` give the same results? The check behind a "behaviour unchanged" refactor.

    python benchmarks/same_results.py RUN_A RUN_B

Compares, file by file, what each stage leaves that later stages read (teacher and generated profiles,
the embeddings, the adapters' weights) by content hash, and every metric of every CF run in
``report/results.json`` to the last digit. Prints the differences and exits 1 if there is any.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

COMPARED = (
    "teacher/users.jsonl",
    "teacher/items.jsonl",
    "sft/adapter/adapter_model.safetensors",
    "collab/adapter/adapter_model.safetensors",
    "rl/adapter/adapter_model.safetensors",
    "item_sft/adapter/adapter_model.safetensors",
    "profiles/users.jsonl",
    "profiles/items.jsonl",
    "embeddings/users.npz",
    "embeddings/items.npz",
)
SECTIONS = ("valid", "test", "zero_shot", "cold_valid", "zero_shot_cold_selected")


def digest(path: Path) -> str | None:
    """A file's content hash (an ``.npz``'s arrays, not its zip headers); None when it is missing."""
    if not path.is_file():
        return None
    if path.suffix != ".npz":
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    h = hashlib.sha256()
    with np.load(path) as arrays:
        for name in sorted(arrays.files):
            h.update(name.encode() + np.ascontiguousarray(arrays[name]).tobytes())
    return h.hexdigest()[:16]


def file_differences(a: Path, b: Path) -> tuple[int, list[str]]:
    """How many of the compared files run ``a`` has, and the ones whose content differs (each hashed once)."""
    pairs = {name: (digest(a / name), digest(b / name)) for name in COMPARED}
    present = sum(left is not None for left, _ in pairs.values())
    return present, [f"{name}: {left} != {right}" for name, (left, right) in pairs.items() if left != right]


def metrics(run: Path) -> dict[tuple[str, str, str], float]:
    path = run / "report" / "results.json"
    if not path.is_file():
        sys.exit(f"{run}: no report/results.json (has the run finished?)")
    rows = json.loads(path.read_text())
    return {(r["run"], section, name): value for r in rows for section in SECTIONS
            for name, value in (r.get(section) or {}).items()}  # fmt: skip


def metric_differences(a: Path, b: Path) -> tuple[int, list[str]]:
    left, right = metrics(a), metrics(b)
    keys = sorted(set(left) | set(right))
    return len(keys), [f"{k}: {left.get(k)!r} != {right.get(k)!r}" for k in keys if left.get(k) != right.get(k)]


def main(a: Path, b: Path) -> int:
    present, files = file_differences(a, b)
    compared, values = metric_differences(a, b)
    print(f"{present} stage files compared by content, {len(files)} differ")
    print(f"{compared} metric values compared, {len(values)} differ")
    for line in files + values:
        print("  " + line)
    return 1 if files or values else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python benchmarks/same_results.py RUN_A RUN_B")
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
