"""MIND ablation of RecLM's user-profile writer on a documented USER SUBSET (CPU-sized), LightGCN:

| row          | user features                                                        |
|--------------|----------------------------------------------------------------------|
| base         | none (items = text, users = ID embeddings: the paper's "base")       |
| distill      | profiles written by the SFT (distilled) adapter                      |
| +CF          | profiles written by the collaborative-tuning adapter                 |
| +CF+RL       | profiles written by the RL adapter (``--rl dpo`` or ``ppo``)          |

Items get the SAME profile embeddings in every profile row: the shipped GPT-3.5 item profiles where an item
has one (zero-shot items never do: theirs come from test clicks), or with ``--item-profiles FILE`` every item's
(e.g. a ``configs/mind-teacher.yaml`` run's ``profiles/items.jsonl``: shipped + the item writer's; delete
``WORK/run/embeddings/items`` when switching); an item without one gets the fusion's "no profile" vector. So
the rows differ only by who wrote the user profiles. Full-shot and zero-shot test metrics, each read at the
best validation epoch.

The subset: ``--teacher-users`` users drawn (seeded) among the MIND users that have a shipped teacher profile,
plus ``--other-users`` drawn among the rest, with ALL their clicks (train and test snapshots) and every item.
The SFT stage sees ``--sft-users`` of the teacher users; the reward model / DPO pairs use the teacher users SFT
did not train on. The subset dataset is written under ``--work`` (outside the repository), as paper-layout files.

    nice -n 10 python benchmarks/llm_ablation_mind.py --work /tmp/reclm-ablation-mind
    python benchmarks/llm_ablation_mind.py --teacher-users 200 --other-users 100 --sft-steps 20   # smoke size
    python benchmarks/llm_ablation_mind.py ... --cf-seeds 2020,2021,2022,2023,2024   # CF rows over five seeds

The table gives mean (std) over the CF seeds and the exact metrics of a random ranking on the same split.

Every stage writes into ``WORK/run`` and is skipped when its output exists (delete a folder to redo it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
MIND = ROOT.parent / "shared" / "datasets" / "mind"
ROWS = ("base", "distill", "+CF", "+CF+RL")


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def write_subset(source: Path, target: Path, n_teacher: int, n_other: int, seed: int) -> dict:
    """A paper-layout MIND folder with the sampled users' clicks, every item and the shipped side files
    (teacher user profiles restricted to the sampled users)."""
    if (target / "subset.json").is_file():
        return json.loads((target / "subset.json").read_text())
    target.mkdir(parents=True, exist_ok=True)
    inter = pd.read_csv(source / "interactions.csv")
    teacher = [json.loads(line) for line in (source / "teacher_user_profiles.jsonl").open()]
    teacher_users = sorted({int(r["user"]) for r in teacher})
    others = sorted(set(inter["user"].unique().tolist()) - set(teacher_users))
    rng = np.random.default_rng(seed)
    chosen_teacher = set(rng.choice(teacher_users, size=min(n_teacher, len(teacher_users)), replace=False).tolist())
    chosen_other = set(rng.choice(others, size=min(n_other, len(others)), replace=False).tolist())
    users = chosen_teacher | chosen_other
    inter[inter["user"].isin(users)].to_csv(target / "interactions.csv", index=False)
    with (target / "teacher_user_profiles.jsonl").open("w") as handle:
        for record in teacher:
            if int(record["user"]) in chosen_teacher:
                handle.write(json.dumps(record) + "\n")
    for name in ("items.jsonl", "teacher_item_profiles.jsonl", "item_neighbours.jsonl"):
        shutil.copyfile(source / name, target / name)
    info = {
        "source": str(source),
        "seed": seed,
        "teacher_users": len(chosen_teacher),
        "other_users": len(chosen_other),
        "interactions": int(inter["user"].isin(users).sum()),
    }
    (target / "subset.json").write_text(json.dumps(info, indent=2))
    return info


METRICS = ("recall@20", "ndcg@20", "recall@40", "ndcg@40")


def seed_summary(per_seed: list[dict]) -> dict:
    """Mean and standard deviation over seeds of each test / zero-shot metric, and the best epochs."""
    out: dict = {"best_epochs": [m.get("best_epoch") for m in per_seed]}
    for task in ("test", "zero_shot"):
        values = {k: [m[task][k] for m in per_seed] for k in METRICS}
        out[task] = {k: float(np.mean(v)) for k, v in values.items()}
        out[task + "_std"] = {k: float(np.std(v)) for k, v in values.items()}
    return out


def cell(result: dict, task: str, metric: str) -> str:
    std = result.get(task + "_std", {}).get(metric)
    return f"{result[task][metric]:.4f}" + ("" if not std else f" ({std:.4f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=MIND)
    parser.add_argument("--work", type=Path, default=Path("/tmp/reclm-ablation-mind"))
    parser.add_argument("--teacher-users", type=int, default=700)
    parser.add_argument("--other-users", type=int, default=300)
    parser.add_argument("--sft-users", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-model", default="smollm2-135m")
    parser.add_argument("--backend", default="ct2", help="generation backend (ct2 | transformers)")
    parser.add_argument("--max-history", type=int, default=10)
    parser.add_argument("--max-words", type=int, default=20)
    parser.add_argument("--prompt-style", default="compact", choices=["compact", "paper"])
    parser.add_argument("--sft-steps", type=int, default=80)
    parser.add_argument("--sft-lr", type=float, default=1e-3, help="(2e-4 left ml-100k profiles out of format)")
    parser.add_argument("--collab-steps", type=int, default=30)
    parser.add_argument("--reward-steps", type=int, default=60)
    parser.add_argument("--rl", choices=("dpo", "ppo"), default="dpo")
    parser.add_argument("--rl-steps", type=int, default=20)
    parser.add_argument("--rl-lr", type=float, default=5e-5)
    parser.add_argument("--cf-epochs", type=int, default=100)
    parser.add_argument(
        "--cf-seeds", default="2020", help="CF seeds, comma-separated: each row is trained once per seed (mean, std)"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--item-profiles", type=Path, default=None,
        help="item profiles (records JSONL) for every item, e.g. a mind-teacher run's profiles/items.jsonl "
        "(default: the shipped ones only; items without one get the fusion's 'no profile' vector)",
    )  # fmt: skip
    args = parser.parse_args(argv)

    from reclm.cf import CFConfig, SideFeatures, train_cf
    from reclm.cf.evaluator import Evaluator
    from reclm.cf.features import item_text_embeddings, load_profiles
    from reclm.data.split import SplitSpec
    from reclm.llm.collab import CollabBudget, run_collab
    from reclm.llm.encode import encode_file
    from reclm.llm.generation import DecodeParams, GenerationCache, Job, generate_records, make_generator
    from reclm.llm.neighbours import build_neighbours
    from reclm.llm.prompts import PromptBudget, user_prompts
    from reclm.llm.records import ProfileRecord, read_records, write_records
    from reclm.llm.reward import RewardConfig, run_reward
    from reclm.llm.rl.stage import run_rl
    from reclm.llm.sft import train_sft
    from reclm.llm.teachers.file import FileTeacher
    from reclm.pipeline.inputs import collab_inputs, reward_inputs, rl_inputs
    from reclm.rundir import RunDir
    from reclm.text.encoder import TextEncoder
    from reclm.utils import torch_threads

    torch_threads(args.threads)
    started = time.perf_counter()
    subset = write_subset(args.data, args.work / "dataset", args.teacher_users, args.other_users, args.seed)
    log(f"subset: {subset}")
    run = RunDir(args.work / "run")
    if (run.data / "dataset.json").is_file():
        data, split = run.load()
    else:
        data, split = run.prepare(str(args.work / "dataset"), SplitSpec(method="snapshot", ratios=(0.9, 0.1, 0.0)))
    log(f"split: {split.stats()}")
    budget = PromptBudget(max_items=args.max_history, max_words=args.max_words, style=args.prompt_style)
    timings: dict[str, float] = {}

    def timed(name: str, done: bool, body) -> None:
        if done:
            log(f"{name}: cached")
            return
        t = time.perf_counter()
        body()
        timings[name] = round(time.perf_counter() - t, 1)
        log(f"{name}: {timings[name]} s")

    timed(
        "teacher",
        (run.teacher / "users.jsonl").is_file(),
        lambda: FileTeacher(budget=budget, max_users=args.sft_users, seed=args.seed, progress=False).run(
            data, split, run, sides=["user"]
        ),
    )
    timed(
        "sft",
        (run.stage("sft") / "adapter").is_dir(),
        lambda: train_sft(
            run.teacher,
            run.stage("sft"),
            args.base_model,
            lora={"r": 8, "alpha": 16},
            steps=args.sft_steps,
            batch_size=8,
            lr=args.sft_lr,
            max_seq_len=768,
            holdout=0.1,
            eval_every=0,
            save_every=20,
        ),
    )
    timed(
        "neighbours",
        (run.stage("neighbours") / "users.npz").is_file(),
        lambda: build_neighbours(run, data, split, k=5, source="cf", epochs=50),
    )

    # every user's profile with each adapter (the SFT one first: collaborative tuning reuses them from cache)
    prompts = user_prompts(data, split, None, budget)
    jobs = [Job("user", data.user_ids[u], p) for u, p in prompts.items()]
    params = DecodeParams(max_new_tokens=64)

    def profiles_with(stage: str) -> Path:
        out = run.root / "ablation" / stage / "users.jsonl"
        if not out.is_file():
            with _closing(GenerationCache()) as cache:
                generator = make_generator(args.backend, args.base_model, run.stage(stage) / "adapter", 16)
                stats = generate_records(generator, jobs, params, out, cache, desc=f"users ({stage})")
                generator.close()
            log(f"profiles ({stage}): {stats.to_dict()}")
        return out

    timed("profiles sft", (run.root / "ablation" / "sft" / "users.jsonl").is_file(), lambda: profiles_with("sft"))
    timed(
        "collab",
        (run.stage("collab") / "adapter").is_dir(),
        lambda: run_collab(
            data,
            split,
            args.base_model,
            run.stage("collab"),
            **collab_inputs(run, data),
            budget=CollabBudget(8, 4, args.max_words, 3, 1024),
            prompt_budget=budget,
            train={"steps": args.collab_steps, "batch_size": 4, "lr": 2e-4, "eval_every": 0, "save_every": 10},
            backend=args.backend,
            seed=args.seed,
            log=log,
        ),
    )
    timed(
        "reward",
        (run.stage("reward") / "adapter").is_dir(),
        lambda: run_reward(
            data,
            split,
            args.base_model,
            run.stage("reward"),
            **reward_inputs(run, data, split, "teacher"),
            config=RewardConfig(steps=args.reward_steps, batch_size=8, max_seq_len=384, seed=args.seed),
            budget=budget,
            log=log,
        ),
    )
    timed(
        "rl",
        (run.stage("rl") / "adapter").is_dir(),
        lambda: run_rl(
            data,
            split,
            args.base_model,
            args.rl,
            run.stage("rl"),
            **rl_inputs(run, data, args.rl),
            options={"steps": args.rl_steps, "batch_size": 4, "lr": args.rl_lr, "seed": args.seed},
            budget=budget,
            log=log,
        ),
    )
    for stage in ("collab", "rl"):
        timed(
            f"profiles {stage}",
            (run.root / "ablation" / stage / "users.jsonl").is_file(),
            lambda stage=stage: profiles_with(stage),
        )

    # the same item profiles for every profile row: shipped ones of items seen in train
    items_file = run.root / "ablation" / "items.jsonl"
    if args.item_profiles is not None:
        items_file = args.item_profiles
    if not items_file.is_file():
        shipped = [json.loads(line) for line in (args.work / "dataset" / "teacher_item_profiles.jsonl").open()]
        index, zero_shot = data.item_index(), set(split.zero_shot_items.tolist())
        keep = [
            ProfileRecord("item", str(r["item"]), "", str(r["profile"]))
            for r in shipped
            if str(r["item"]) in index and index[str(r["item"])] not in zero_shot
        ]
        write_records(items_file, keep)
    encoder = TextEncoder()
    item_text = item_text_embeddings(data, encoder)
    for stage in ("sft", "collab", "rl", "items"):
        target = run.embeddings / stage
        source = items_file if stage == "items" else run.root / "ablation" / stage / "users.jsonl"
        kind = "item" if stage == "items" else "user"
        if not (target / f"{'items' if kind == 'item' else 'users'}.npz").is_file():
            encode_file(source, kind, encoder, target, str(source))
    item_profiles, item_present = load_profiles(run.embeddings / "items" / "items.npz", data.item_ids)
    item_cover = float(item_present.mean())

    seeds = [int(seed) for seed in args.cf_seeds.split(",")]
    results = {}
    for row, stage in zip(ROWS, (None, "sft", "collab", "rl")):
        features, mode = SideFeatures(item_text=item_text), "text"
        if stage is not None:
            users, present = load_profiles(run.embeddings / stage / "users.npz", data.user_ids)
            features.user_profiles, features.user_present = users, present
            features.item_profiles, features.item_present, mode = item_profiles, item_present, "text+profiles"
        per_seed = []
        for seed in seeds:
            name = f"lightgcn-{row.replace('+', 'plus-')}" + ("" if seed == 2020 else f"-s{seed}")
            out = run.cf / name
            if not (out / "metrics.json").is_file():
                config = CFConfig(
                    backbone="lightgcn", features=mode, epochs=args.cf_epochs, seed=seed, threads=args.threads
                )
                t = time.perf_counter()
                train_cf(split, config, features, out, show_progress=False, user_ids=data.user_ids)
                timings[f"cf {name}"] = round(time.perf_counter() - t, 1)
            per_seed.append(json.loads((out / "metrics.json").read_text()))
        results[row] = seed_summary(per_seed)
        log(f"{row}: {results[row]}")
    evaluator = Evaluator(split, [20, 40])
    results["random ranking"] = {task: evaluator.chance(task) for task in ("test", "zero_shot")}

    quality = {}
    for stage in ("sft", "collab", "rl"):
        from reclm.llm.prompts import parse_profile

        records = read_records(run.root / "ablation" / stage / "users.jsonl", "user")
        quality[stage] = {
            "profiles": len(records),
            "parsed": round(float(np.mean([bool(parse_profile(r.profile)) for r in records])), 4),
        }
    reward = json.loads((run.stage("reward") / "metrics.json").read_text())
    rl = json.loads((run.stage("rl") / "metrics.json").read_text())
    summary = {
        "subset": subset,
        "split": split.stats(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "rows": results,
        "profile_format": quality,
        "item_profile_coverage": item_cover,
        "reward_heldout": reward["after"],
        "rl": {"method": rl["method"], "before": rl["before"], "after": rl["after"]},
        "timings_s": timings,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (args.work / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"LightGCN, mean (std) over CF seeds {args.cf_seeds}")
    print(f"{'row':15} {'full R@20':>16} {'full N@20':>16} {'zero R@20':>16} {'zero N@20':>16}")
    for row in (*ROWS, "random ranking"):
        cells = [
            cell(results[row], task, metric) for task in ("test", "zero_shot") for metric in ("recall@20", "ndcg@20")
        ]
        print(f"{row:15} " + " ".join(f"{c:>16}" for c in cells))
    log(f"results in {args.work / 'results.json'}")
    return 0


class _closing:
    def __init__(self, thing):
        self.thing = thing

    def __enter__(self):
        return self.thing

    def __exit__(self, *exc):
        self.thing.close()


if __name__ == "__main__":
    sys.exit(main())
