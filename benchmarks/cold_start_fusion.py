"""Cold-start diagnosis on a finished run: CF runs over fusion strategies, feature modes, profile inputs
and profile dropout, each row full-shot and zero-shot, selected on validation only.

    python benchmarks/cold_start_fusion.py RUN [--profiles DIR] [--backbones lightgcn] [--fusions concat,paper]
        [--modes text,text+profiles] [--inputs real,zero,missing,shuffled] [--dropouts 0,0.2] [--seeds 2020,2021]
        [--epochs 100] [--patience 5] [--lr 0.003] [--set simgcl_ssl_weight=0] [--out results.jsonl]

``--inputs`` says what the profile branch is given: ``real`` (the run's embeddings), ``zero`` (every
vector zero), ``missing`` (every id without a profile: the learned "no profile" vector) and ``shuffled``
(the real vectors permuted over ids: same distribution, no signal). ``--set`` gives every run further
CFConfig settings (``name=value``, repeatable; YAML values), recorded in each row's ``params``. Rows are
appended to ``--out`` as they finish and rows already there are skipped, so an interrupted sweep resumes.
The table at the end gives means over seeds; ``zs@cold`` is zero-shot at the epoch chosen on cold
validation when the split has cold-validation items.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
from pathlib import Path

import numpy as np
import yaml

from reclm.cf import CFConfig, SideFeatures, train_cf
from reclm.cf.features import item_text_embeddings, load_profiles, uses_item_profiles, uses_user_profiles
from reclm.rundir import RunDir

INPUTS = ("real", "zero", "missing", "shuffled")


def profile_input(vectors: np.ndarray, present: np.ndarray, kind: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The profile matrix and presence mask a run is given (see module docstring)."""
    if kind == "real":
        return vectors, present
    if kind == "zero":
        return np.zeros_like(vectors), np.ones_like(present)
    if kind == "missing":
        return np.zeros_like(vectors), np.zeros_like(present)
    order = np.random.default_rng(seed).permutation(len(vectors))
    return vectors[order], present[order]


def features_for(base: dict, mode: str, kind: str, seed: int) -> SideFeatures:
    features = SideFeatures(item_text=base["item_text"])
    if uses_user_profiles(mode):
        features.user_profiles, features.user_present = profile_input(*base["users"], kind, seed)
    if uses_item_profiles(mode):
        features.item_profiles, features.item_present = profile_input(*base["items"], kind, seed)
    return features


def load_base(run: Path, profiles: Path) -> tuple[dict, object, object]:
    data, split = RunDir(run).load()
    text_file = run / "embeddings" / "item_text.npz"
    item_text = np.load(text_file)["vectors"] if text_file.is_file() else item_text_embeddings(data)
    base = {
        "item_text": item_text,
        "users": load_profiles(profiles / "users.npz", data.user_ids),
        "items": load_profiles(profiles / "items.npz", data.item_ids),
    }
    return base, data, split


def row_key(row: dict) -> tuple:
    keys = ("backbone", "fusion", "mode", "input", "dropout", "params", "seed")
    return tuple(row.get(k, "") if k == "params" else row[k] for k in keys)


def parse_settings(pairs: list[str]) -> dict:
    """``name=value`` pairs as CFConfig settings (values read as YAML: 0, 0.1, all, [64, 32])."""
    settings = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in CFConfig.model_fields:
            raise SystemExit(f"--set {pair!r}: expected name=value with a CFConfig field name")
        settings[name] = yaml.safe_load(value)
    CFConfig(**settings)  # a bad value fails here, before any run
    return settings


def run_one(split, base: dict, combo: dict, epochs: int, patience: int, lr: float, settings: dict) -> dict:
    kind = combo["input"] if combo["mode"] != "text" else "real"
    config = CFConfig(
        backbone=combo["backbone"], features=combo["mode"], fusion=combo["fusion"], seed=combo["seed"],
        profile_dropout=combo["dropout"], epochs=epochs, patience=patience, lr=lr, threads=1, **settings,
    )  # fmt: skip
    result = train_cf(split, config, features_for(base, combo["mode"], kind, combo["seed"]), show_progress=False)
    extra = result.metrics_json()
    cold = extra.get("zero_shot_cold_selected") or {}
    return {
        **combo,
        "valid_ndcg20": result.valid.get("ndcg@20"),
        "test_recall20": result.test.get("recall@20"),
        "zs_recall20": result.zero_shot.get("recall@20"),
        "zs_cold_recall20": cold.get("recall@20"),
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
    }


def mean_of(rows: list[dict], name: str) -> float:
    values = [r[name] for r in rows if r.get(name) is not None]
    return float(np.mean(values)) if values else float("nan")


def summary(rows: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(row_key(row)[:-1], []).append(row)
    lines = [f"{'backbone':9} {'fusion':7} {'mode':19} {'input':9} {'drop':>4} {'set':20} {'n':>2} "
             f"{'valid':>7} {'test':>7} {'zs':>7} {'zs@cold':>7} {'epochs':>6}"]  # fmt: skip
    for key, group in sorted(groups.items()):
        mean = functools.partial(mean_of, group)
        lines.append(
            f"{key[0]:9} {key[1]:7} {key[2]:19} {key[3]:9} {key[4]:4.2f} {key[5] or '-':20} {len(group):2d} "
            f"{mean('valid_ndcg20'):7.4f} "
            f"{mean('test_recall20'):7.4f} {mean('zs_recall20'):7.4f} {mean('zs_cold_recall20'):7.4f} "
            f"{mean('epochs_run'):6.1f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--profiles", type=Path, help="folder with users.npz / items.npz (default RUN/embeddings)")
    parser.add_argument("--backbones", default="lightgcn")
    parser.add_argument("--fusions", default="concat,paper")
    parser.add_argument("--modes", default="text,text+profiles")
    parser.add_argument("--inputs", default="real")
    parser.add_argument("--dropouts", default="0")
    parser.add_argument("--seeds", default="2020")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a further CFConfig setting")
    parser.add_argument("--out", type=Path, default=Path("cold_start_fusion.jsonl"))
    args = parser.parse_args()
    settings = parse_settings(args.set)
    params = ",".join(f"{k}={v}" for k, v in sorted(settings.items()))
    if unknown := set(args.inputs.split(",")) - set(INPUTS):
        parser.error(f"--inputs: unknown {sorted(unknown)}; expected {', '.join(INPUTS)}")
    base, _, split = load_base(args.run, args.profiles or args.run / "embeddings")
    done = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out.is_file() else []
    seen = {row_key(r) for r in done}
    grid = itertools.product(
        args.backbones.split(","), args.fusions.split(","), args.modes.split(","), args.inputs.split(","),
        [float(d) for d in args.dropouts.split(",")], [int(s) for s in args.seeds.split(",")],
    )  # fmt: skip
    rows = []
    for backbone, fusion, mode, kind, dropout, seed in grid:
        if mode == "text" and (kind != "real" or dropout):
            continue  # the text mode has no profile branch
        combo = {"backbone": backbone, "fusion": fusion, "mode": mode, "input": kind, "dropout": dropout, "seed": seed}
        combo["params"] = params
        if row_key(combo) in seen:
            rows.append(next(r for r in done if row_key(r) == row_key(combo)))
            continue
        row = run_one(split, base, combo, args.epochs, args.patience, args.lr, settings)
        with args.out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(summary(rows))


if __name__ == "__main__":
    main()
