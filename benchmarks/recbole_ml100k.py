"""reclm vs RecBole 1.2.1 on MovieLens-100K, on the identical split (issue 2's protocol).

Protocol: per-user random 80/10/10 split, seed 2020, no zero-shot items; dim 64, lr 1e-3,
batch 2048, 2 layers, validation metric NDCG@20, patience 10, at most 300 epochs; full ranking with
train (and for test, valid) items masked. Our split is exported as RecBole atomic benchmark files
(``benchmark_filename: [train, valid, test]``), RecBole's LightGCN and BPR(-MF) are trained on them
in a subprocess, ours (LightGCN and BiasMF with ``--features none``) in this process, one after the
other with the same number of torch threads. Printed: test Recall@20 / NDCG@20, best epoch, and
mean and median train seconds per epoch with the ratios ours / RecBole (negative sampling included on both sides).

RecBole needs its own virtual environment (its pinned dependencies clash with the project's):

    python3 -m venv .venv-recbole
    .venv-recbole/bin/pip install "torch==2.13.0"
    .venv-recbole/bin/pip install "recbole==1.2.1" "numpy<2" "pandas<2.3" "scipy==1.11.4" "scikit-learn<1.6"

(numpy 2 removed ``np.float_``, scipy 1.12 removed ``dok_matrix._update``, both used by RecBole 1.2.1;
the runner avoids ``recbole.quick_start``, which imports ray.) Then:

    python benchmarks/recbole_ml100k.py            # about 5-10 minutes on 1 free core

Timings are noisy on a shared machine: compare the ratio from one run, not numbers across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from reclm.cf import CFConfig, train_cf
from reclm.data.loaders import load_dataset
from reclm.data.split import Split, SplitSpec, make_split

ROOT = Path(__file__).resolve().parent.parent
RUNNER = Path(__file__).resolve().parent / "cf_recbole_runner.py"
PAIRS = {"LightGCN": "lightgcn", "BPR": "bias-mf"}  # RecBole model -> our backbone
PROTOCOL = {"dim": 64, "lr": 1e-3, "batch_size": 2048, "layers": 2, "valid_metric": "ndcg@20", "patience": 10}


def export_atomic(split: Split, user_ids: list[str], item_ids: list[str], folder: Path, name: str) -> Path:
    """Write ``name.{train,valid,test}.inter`` with raw ids, one pair per line."""
    target = folder / name
    target.mkdir(parents=True, exist_ok=True)
    for part, pairs in (("train", split.train), ("valid", split.valid), ("test", split.test)):
        lines = ["user_id:token\titem_id:token"]
        lines += [f"{user_ids[u]}\t{item_ids[i]}" for u, i in pairs.tolist()]
        (target / f"{name}.{part}.inter").write_text("\n".join(lines) + "\n")
    return target


def run_recbole(
    python: str, data_dir: Path, name: str, model: str, threads: int, epochs: int, out: Path, seed: int
) -> dict:
    settings = {
        "embedding_size": PROTOCOL["dim"],
        "learning_rate": PROTOCOL["lr"],
        "train_batch_size": PROTOCOL["batch_size"],
        "n_layers": PROTOCOL["layers"],
        "valid_metric": "NDCG@20",
        "stopping_step": PROTOCOL["patience"],
        "topk": [10, 20, 40],
        "epochs": epochs,
        "seed": seed,
        "eval_batch_size": 4096 * 64,
        "checkpoint_dir": str(out / "recbole_saved"),
    }
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    command = [python, str(RUNNER), str(data_dir), name, model, str(threads), json.dumps(settings)]
    log = out / f"recbole_{model}_s{seed}.log"
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RECBOLE_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"RecBole {model} failed (exit {proc.returncode}); see {log}")
    result = json.loads(lines[-1].removeprefix("RECBOLE_RESULT "))
    result["wall_seconds"] = time.perf_counter() - start
    return result


def run_ours(split: Split, backbone: str, threads: int, epochs: int, out: Path, seed: int) -> dict:
    config = CFConfig(backbone=backbone, features="none", epochs=epochs, seed=seed, threads=threads, **PROTOCOL)
    start = time.perf_counter()
    result = train_cf(split, config, out_dir=out / f"reclm_{backbone}_s{seed}", show_progress=False)
    return {
        "model": backbone,
        "valid": result.valid,
        "test": result.test,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "epoch_seconds": result.epoch_seconds,
        "epoch_seconds_all": [h["train_seconds"] for h in result.history],
        "wall_seconds": time.perf_counter() - start,
    }


def mean_result(results: list[dict]) -> dict:
    """Means over seeds of the test metrics, epochs and per-epoch seconds."""
    mean = {"test": {k: float(np.mean([r["test"][k] for r in results])) for k in results[0]["test"]}}
    for key in ("best_epoch", "epochs_run", "epoch_seconds"):
        mean[key] = float(np.mean([r[key] for r in results]))
    mean["epoch_seconds_all"] = [x for r in results for x in r["epoch_seconds_all"]]
    return mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recbole-python", default=str(ROOT / ".venv-recbole" / "bin" / "python"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both (1: robust on a shared box)")
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--models", default="LightGCN,BPR", help="RecBole models (paired with ours)")
    parser.add_argument("--seeds", default="2020", help="model seeds (the split stays seed 2020); >1 adds means")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_recbole_ml100k")
    args = parser.parse_args()
    if not Path(args.recbole_python).is_file():
        raise SystemExit(f"no RecBole interpreter at {args.recbole_python}: set up .venv-recbole (see the docstring)")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    data = load_dataset("ml-100k")
    split = make_split(data, SplitSpec(method="random", ratios=(0.8, 0.1, 0.1), zero_shot_fraction=0.0, seed=2020))
    split.save(out / "split")
    name = "ml100k-reclm"
    export_atomic(split, data.user_ids, data.item_ids, out / "atomic", name)
    console = Console(width=160)  # the results table is wide; logs are not terminals
    console.print(f"split {split.stats()} exported to {out / 'atomic' / name}")

    rows = []
    seeds = [int(s) for s in args.seeds.split(",")]
    for model in args.models.split(","):
        for seed in seeds:
            console.print(f"RecBole {model} seed {seed} ...")
            theirs = run_recbole(args.recbole_python, out / "atomic", name, model, args.threads, args.epochs, out, seed)
            console.print(f"  test recall@20 {theirs['test']['recall@20']:.4f}; reclm {PAIRS[model]} seed {seed} ...")
            ours = run_ours(split, PAIRS[model], args.threads, args.epochs, out, seed)
            console.print(f"  test recall@20 {ours['test']['recall@20']:.4f}")
            rows.append((f"{model} s{seed}", theirs, ours))
            partial = [{"run": n, "recbole": t, "reclm": o} for n, t, o in rows]
            (out / "results.json").write_text(json.dumps(partial, indent=2))  # kept if a later run is cut short
        if len(seeds) > 1:
            rows.append((f"{model} mean", *(mean_result([r[i] for r in rows[-len(seeds) :]]) for i in (1, 2))))

    table = Table(title=f"ml-100k, identical split, {args.threads} thread(s): test at the best validation epoch")
    columns = ("model", "impl", "Recall@20", "NDCG@20", "Recall@40", "best ep", "epochs", "s/epoch", "median", "ratio")
    for column in columns:
        table.add_column(column, justify="right" if column not in ("model", "impl") else "left")
    summary = []
    for model, theirs, ours in rows:
        for r in (theirs, ours):
            r["epoch_seconds_median"] = float(np.median(r["epoch_seconds_all"]))
        ratio = ours["epoch_seconds"] / theirs["epoch_seconds"]
        median_ratio = ours["epoch_seconds_median"] / theirs["epoch_seconds_median"]
        summary.append({"recbole": theirs, "reclm": ours, "ratio": ratio, "median_ratio": median_ratio})
        cells = f"{ratio:.3f} (median {median_ratio:.3f})"
        for impl, r, cell in (("RecBole 1.2.1", theirs, ""), ("reclm", ours, cells)):
            table.add_row(
                model if impl.startswith("RecBole") else PAIRS[model.split()[0]],
                impl,
                f"{r['test']['recall@20']:.4f}",
                f"{r['test']['ndcg@20']:.4f}",
                f"{r['test']['recall@40']:.4f}",
                f"{r['best_epoch']:g}",
                f"{r['epochs_run']:g}",
                f"{r['epoch_seconds']:.3f}",
                f"{r['epoch_seconds_median']:.3f}",
                cell,
            )
    console.print(table)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    console.print(f"written {out / 'results.json'}")


if __name__ == "__main__":
    sys.exit(main())
