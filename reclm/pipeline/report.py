"""``report.md`` and a self-contained ``report.html`` from a finished run directory.

Content: the paper-style table (backbones x {base, with profiles, improvement}, full-shot and
zero-shot, Recall/NDCG@20/40; mean ± std over seeds), a paired significance test of with-profiles
against base, the ablation rows, per-stage cost from the manifests, the profile quality report,
plots (validation curves; metrics by user-activity bucket) and example profiles beside the user's
history. "Base" is the paper's base: item text features (``text``); "with profiles" adds the user
and item profile embeddings (``text+profiles``).

Zero-shot is shown twice when the split has cold-validation items: at the epoch selected on full-shot
validation (``zero_shot``) and at the epoch selected on cold validation (``zero_shot_cold_selected``,
docs/evaluation.md), with the cold-validation curves beside the validation curves. Runs whose best epoch
is near the epoch cap, or that stopped at it, are flagged; the popularity concentration of each run's
full-shot top-20 lists (written by the trainer in metrics.json) has its own table.

Significance: for each backbone and setting, the per-user metric (``report.metric``, NDCG@20 by
default) of the two models is averaged over seeds and compared with the Wilcoxon signed-rank test,
paired by user, two-sided (scipy.stats.wilcoxon). With two seeds or more, a paired t-test over
seeds (scipy.stats.ttest_rel on the per-seed means, paired by seed) is given as well.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from reclm.data.errors import DataError
from reclm.pipeline.config import STAGE_ORDER
from reclm.utils import read_json

SETTINGS = (("test", "full-shot"), ("zero_shot", "zero-shot"), ("zero_shot_cold_selected", "zero-shot cold-sel."))
SETTING_CAPTIONS = {
    "test": "full-shot test",
    "zero_shot": "zero-shot test, epoch selected on full-shot validation",
    "zero_shot_cold_selected": "zero-shot test, epoch selected on cold validation",
}
CAP_MARGIN = 3  # a best epoch this close to the epoch cap suggests more epochs would help
TABLE_METRICS = ("recall@20", "ndcg@20", "recall@40", "ndcg@40")
BUCKETS = ((0, 5, "0-5"), (6, 20, "6-20"), (21, None, "21+"))
BACKBONE_ORDER = ("bias-mf", "ncf", "lightgcn", "sgl", "simgcl")
VARIANT_LABELS = {
    "teacher": "+ teacher profiles",
    "sft": "+ distilled profiles",
    "collab": "+ collaborative tuning",
    "rl": "+ RL",
}


# ---------------------------------------------------------------- document blocks


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Image:
    name: str
    png: bytes
    caption: str = ""


@dataclass
class Text:
    text: str
    pre: bool = False  # monospace block


@dataclass
class Section:
    title: str
    blocks: list[Any] = field(default_factory=list)


# ---------------------------------------------------------------- reading the run


@dataclass
class CFRun:
    name: str
    backbone: str
    features: str
    seed: int
    variant: str | None
    final: bool
    folder: Path
    metrics: dict

    def per_user(self) -> pd.DataFrame | None:
        path = self.folder / "per_user.csv"
        return pd.read_csv(path) if path.is_file() else None

    def history(self) -> list[dict]:
        path = self.folder / "history.json"
        return json.loads(path.read_text()) if path.is_file() else []


def load_runs(root: Path) -> list[CFRun]:
    """The CF runs of a run directory: from cf/runs.json (the pipeline's list) when present, else
    every cf/*/metrics.json."""
    cf = root / "cf"
    listed = read_json(cf / "runs.json")
    runs = []
    if isinstance(listed, list):
        for run in listed:
            metrics = read_json(cf / run["name"] / "metrics.json")
            if metrics is not None:
                runs.append(
                    CFRun(
                        **{k: run[k] for k in ("name", "backbone", "features", "seed", "variant", "final")},
                        folder=cf / run["name"],
                        metrics=metrics,
                    )
                )
        return runs
    for path in sorted(cf.glob("*/metrics.json")) if cf.is_dir() else []:
        metrics = read_json(path) or {}
        config = metrics.get("config", {})
        info = metrics.get("pipeline_run", {})
        backbone = info.get("backbone", config.get("backbone", path.parent.name.split("-")[0]))
        features = info.get("features", config.get("features", "?"))
        runs.append(
            CFRun(
                name=path.parent.name,
                backbone=backbone,
                features=features,
                seed=int(info.get("seed", config.get("seed", 0))),
                variant=info.get("variant"),
                final=bool(info.get("final", True)),
                folder=path.parent,
                metrics=metrics,
            )
        )
    return runs


def train_counts(root: Path) -> np.ndarray | None:
    """Train interactions per user (index order), from the saved split."""
    try:
        from reclm.data.split import Split

        split = Split.load(root / "data")
    except (DataError, OSError, KeyError):
        return None
    return np.bincount(split.train[:, 0], minlength=split.n_users)


def bucket_of(counts: np.ndarray) -> np.ndarray:
    labels = np.empty(len(counts), dtype=object)
    for low, high, label in BUCKETS:
        mask = counts >= low if high is None else (counts >= low) & (counts <= high)
        labels[mask] = label
    return labels


# ---------------------------------------------------------------- numbers


def fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def mean_std(values: list[float]) -> tuple[float, float | None]:
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if not len(arr):
        return float("nan"), None
    return float(arr.mean()), (float(arr.std(ddof=1)) if len(arr) > 1 else None)


def fmt_ms(values: list[float]) -> str:
    mean, std = mean_std(values)
    return fmt(mean) if std is None else f"{fmt(mean)} ± {fmt(std)}"


def improvement(base: list[float], other: list[float]) -> str:
    b, _ = mean_std(base)
    o, _ = mean_std(other)
    if math.isnan(b) or math.isnan(o) or b == 0:
        return "-"
    return f"{(o - b) / b * 100:+.1f}%"


def metric_values(runs: list[CFRun], setting: str, metric: str) -> list[float]:
    return [float(r.metrics.get(setting, {}).get(metric, float("nan"))) for r in runs]


def select(runs: list[CFRun], backbone: str, features: str, final: bool | None = True, variant=...) -> list[CFRun]:
    out = [r for r in runs if r.backbone == backbone and r.features == features]
    if final is not None:
        out = [r for r in out if r.final == final]
    if variant is not ...:
        out = [r for r in out if r.variant == variant]
    return sorted(out, key=lambda r: r.seed)


def settings_of(runs: list[CFRun]) -> list[tuple[str, str]]:
    """The SETTINGS some run has results for (the cold-selected one needs a split with cold validation)."""
    present = [(s, label) for s, label in SETTINGS if any(r.metrics.get(s) for r in runs)]
    return present or list(SETTINGS[:2])


def backbones_of(runs: list[CFRun]) -> list[str]:
    present = {r.backbone for r in runs}
    return [b for b in BACKBONE_ORDER if b in present] + sorted(present - set(BACKBONE_ORDER))


def paired_tests(base: list[CFRun], other: list[CFRun], setting: str, metric: str) -> dict[str, Any]:
    """Wilcoxon signed-rank over users (per-user metric averaged over seeds), and a paired t-test
    over seeds when there are two or more."""
    from scipy import stats

    out: dict[str, Any] = {"users": 0, "wilcoxon_p": None, "seeds": 0, "ttest_p": None}
    frames = []
    for label, group in (("base", base), ("other", other)):
        parts = []
        for run in group:
            table = run.per_user()
            if table is None or metric not in table.columns:
                return out
            parts.append(table[table["task"] == setting][["user", metric]])
        if not parts:
            return out
        frames.append(pd.concat(parts).groupby("user")[metric].mean().rename(label))
    paired = pd.concat(frames, axis=1, join="inner").dropna()
    out["users"] = len(paired)
    diff = paired["other"] - paired["base"]
    if len(paired) >= 2 and (diff != 0).any():
        out["wilcoxon_p"] = float(stats.wilcoxon(paired["other"], paired["base"]).pvalue)
    elif len(paired):
        out["wilcoxon_p"] = 1.0
    seeds_b = {r.seed: r.metrics.get(setting, {}).get(metric) for r in base}
    seeds_o = {r.seed: r.metrics.get(setting, {}).get(metric) for r in other}
    common = sorted(s for s in set(seeds_b) & set(seeds_o) if seeds_b[s] is not None and seeds_o[s] is not None)
    out["seeds"] = len(common)
    if len(common) >= 2:
        a = np.array([seeds_o[s] for s in common])
        b = np.array([seeds_b[s] for s in common])
        out["ttest_p"] = float(stats.ttest_rel(a, b).pvalue) if np.any(a != b) else 1.0
    return out


def fmt_p(p: float | None) -> str:
    if p is None or math.isnan(p):
        return "-"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"


# ---------------------------------------------------------------- sections


def chance_levels(root: Path) -> dict[str, dict[str, float]]:
    """Per setting, what a uniformly random ranking scores on this run's split (empty without a split)."""
    from reclm.cf.evaluator import Evaluator
    from reclm.data.split import Split

    try:
        split = Split.load(Path(root) / "data")
    except (DataError, OSError, ValueError):
        return {}
    topks = sorted({int(m.split("@")[1]) for m in TABLE_METRICS})
    evaluator = Evaluator(split, topks)
    levels = {"test": evaluator.chance("test"), "zero_shot": evaluator.chance("zero_shot")}
    levels["zero_shot_cold_selected"] = levels["zero_shot"]
    return levels


def main_tables(
    runs: list[CFRun],
    base_mode: str = "text",
    other_mode: str = "text+profiles",
    chance: dict[str, dict[str, float]] | None = None,
) -> list[Any]:
    """The paper-style tables, one per setting, with the random-ranking level as the last row."""
    blocks: list[Any] = []
    backbones = backbones_of(runs)
    for setting, _ in settings_of(runs):
        headers = ["backbone"]
        for metric in TABLE_METRICS:
            headers += [f"{metric} base", f"{metric} +profiles", "impr."]
        rows = []
        for backbone in backbones:
            base = select(runs, backbone, base_mode)
            other = select(runs, backbone, other_mode)
            if not base and not other:
                continue
            row = [backbone]
            for metric in TABLE_METRICS:
                b, o = metric_values(base, setting, metric), metric_values(other, setting, metric)
                row += [fmt_ms(b) if base else "-", fmt_ms(o) if other else "-", improvement(b, o)]
            rows.append(row)
        if rows and (level := (chance or {}).get(setting)):
            rows.append(["random ranking"] + [v for m in TABLE_METRICS for v in (fmt(level.get(m)), "-", "")])
        if rows:
            seeds = sorted({r.seed for r in runs})
            note = f"mean ± std over {len(seeds)} seeds" if len(seeds) > 1 else f"seed {seeds[0]}"
            caption = f"{SETTING_CAPTIONS[setting]} ({note}); base = item text, +profiles = RecLM"
            blocks.append(Table(headers, rows, caption))
    return blocks


def significance_table(runs: list[CFRun], metric: str) -> list[Any]:
    rows = []
    for backbone in backbones_of(runs):
        base, other = select(runs, backbone, "text"), select(runs, backbone, "text+profiles")
        if not base or not other:
            continue
        for setting, label in settings_of(runs):
            test = paired_tests(base, other, setting, metric)
            b, o = mean_std(metric_values(base, setting, metric))[0], mean_std(metric_values(other, setting, metric))[0]
            rows.append(
                [
                    backbone,
                    label,
                    fmt(b),
                    fmt(o),
                    str(test["users"]),
                    fmt_p(test["wilcoxon_p"]),
                    str(test["seeds"]),
                    fmt_p(test["ttest_p"]),
                ]
            )
    if not rows:
        return [Text("No pair of base and with-profiles runs to compare.")]
    headers = [
        "backbone",
        "setting",
        f"{metric} base",
        f"{metric} +profiles",
        "users",
        "Wilcoxon p",
        "seeds",
        "t-test p",
    ]
    explain = (
        f"Wilcoxon signed-rank test (two-sided) on per-user {metric}, paired by user, each user's value "
        "averaged over seeds; t-test: paired t-test over seeds on the mean metric (needs >= 2 seeds)."
    )
    if max(int(row[6]) for row in rows) < 2:
        explain += (
            " One seed: the Wilcoxon test sees only the users' spread, not the training's (another seed can move "
            "a backbone's metric by a few percent), so it calls small differences significant; `--seeds 3` adds "
            "the t-test over seeds."
        )
    return [Text(explain), Table(headers, rows)]


def ablation_table(runs: list[CFRun], manifests: dict[str, dict]) -> list[Any]:
    blocks: list[Any] = []
    off = [
        name
        for name in ("sft", "collab", "reward", "rl", "item_side")
        if manifests.get(name, {}).get("status") == "off"
    ]
    if off:
        blocks.append(Text(f"Stages switched off in this run: {', '.join(off)}."))
    variants = [v for v in VARIANT_LABELS if any(r.variant == v and r.features == "text+profiles" for r in runs)]
    backbones = [b for b in backbones_of(runs) if any(r.backbone == b and r.variant in variants for r in runs)]
    if not variants:
        blocks.append(Text("No profile runs: nothing to ablate."))
        return blocks
    settings = settings_of(runs)
    headers = ["backbone", "model"] + [f"{label} {m}" for _, label in settings for m in ("recall@20", "ndcg@20")]
    rows = []
    for backbone in backbones:
        base = select(runs, backbone, "text")
        rows.append(
            [backbone, "base (item text)"]
            + [fmt_ms(metric_values(base, s, m)) for s, _ in settings for m in ("recall@20", "ndcg@20")]
        )
        for variant in variants:
            group = select(runs, backbone, "text+profiles", final=None, variant=variant)
            if group:
                rows.append(
                    [backbone, VARIANT_LABELS[variant]]
                    + [fmt_ms(metric_values(group, s, m)) for s, _ in settings for m in ("recall@20", "ndcg@20")]
                )
    blocks.append(Table(headers, rows, "each row adds one stage to the profile writer"))
    return blocks


def cost_table(manifests: dict[str, dict]) -> list[Any]:
    from reclm.pipeline.formatting import format_bytes_mb, format_seconds

    rows = []
    total = 0.0
    names = [n for n in STAGE_ORDER if n in manifests] + sorted(set(manifests) - set(STAGE_ORDER))
    for name in names:
        if name == "report":  # this document: its own cost is not known while it is written
            continue
        record = manifests[name]
        status = record.get("status", "?")
        if status == "off":
            rows.append([name, "off", "-", "-", "-", "-", "-"])
            continue
        seconds = float(record.get("seconds") or 0.0)
        total += seconds
        if len(record.get("attempts") or ()) > 1:
            status += f" ({len(record['attempts'])} attempts)"
        tokens = record.get("tokens_total")
        gpu = record.get("peak_gpu_memory_mb")
        cpu = record.get("cpu_seconds")
        rows.append(
            [
                name,
                status,
                format_seconds(seconds),
                format_seconds(float(cpu)) if cpu is not None else "-",
                f"{tokens:,}" if tokens else "-",
                format_bytes_mb(record.get("peak_memory_mb")),
                format_bytes_mb(gpu) if gpu else "-",
            ]
        )
    if not rows:
        return [Text("No manifests in this run directory.")]
    caption = (
        f"total {format_seconds(total)} of stage work (each stage's last completed run; a stage resumed after an "
        "interruption counts all its attempts)"
    )
    headers = ["stage", "status", "time", "CPU time", "tokens", "peak RAM", "peak GPU"]
    return [Table(headers, rows, caption)]


def flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(value, dict):
        out = []
        for key, sub in value.items():
            out += flatten(sub, f"{prefix}.{key}" if prefix else str(key))
        return out
    if isinstance(value, float):
        return [(prefix, f"{value:.4g}")]
    if isinstance(value, list):
        return [(prefix, ", ".join(str(v) for v in value[:10]) + (" ..." if len(value) > 10 else ""))]
    return [(prefix, str(value))]


def quality_section(root: Path) -> list[Any]:
    quality = read_json(root / "profiles" / "quality.json")
    if quality is None:
        return [Text("No profiles/quality.json in this run.")]
    return [Table(["measure", "value"], [[k, v] for k, v in flatten(quality)])]


# ---------------------------------------------------------------- plots


def figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buffer.getvalue()


CURVES = {
    "valid": ("validation_curves.png", "valid", "validation metric per epoch for every CF run"),
    "cold_valid": (
        "cold_validation_curves.png",
        "cold-valid",
        "cold-validation (zero-shot validation) metric per epoch for every CF run",
    ),
}


def validation_curves(runs: list[CFRun], task: str = "valid") -> Image | None:
    """One panel per backbone: the history's ``task`` metric (``valid`` or ``cold_valid``) per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backbones = backbones_of(runs)
    curves = []
    for backbone in backbones:
        for run in sorted(
            (r for r in runs if r.backbone == backbone), key=lambda r: (r.features, str(r.variant), r.seed)
        ):
            metric = run.metrics.get("config", {}).get("valid_metric", "ndcg@20")
            points = [(h["epoch"], h[task][metric]) for h in run.history() if metric in (h.get(task) or {})]
            if points:
                curves.append((backbone, run, metric, points))
    if not curves:
        return None
    cols = min(3, len(backbones))
    rows = math.ceil(len(backbones) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, backbone in zip(axes.flat, backbones):
        for _, run, metric, points in (c for c in curves if c[0] == backbone):
            x, y = zip(*points)
            label = run.features + (f" @{run.variant}" if not run.final else "") + f" s{run.seed}"
            ax.plot(x, y, label=label, linewidth=1.4)
            ax.set_ylabel(f"{CURVES[task][1]} {metric}")
        ax.set_title(backbone)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(backbones) :]:
        ax.axis("off")
    fig.tight_layout()
    name, _, caption = CURVES[task]
    return Image(name, figure_png(fig), caption)


def bucket_metrics(runs: list[CFRun], counts: np.ndarray, metric: str) -> pd.DataFrame:
    """Mean per-user ``metric`` by activity bucket: rows (backbone, features, setting, bucket)."""
    records = []
    labels = bucket_of(counts)
    for run in runs:
        if not run.final:
            continue
        table = run.per_user()
        if table is None or metric not in table.columns:
            continue
        table = table[table["task"].isin([s for s, _ in SETTINGS])].copy()
        table["bucket"] = labels[table["user"].to_numpy()]
        grouped = table.groupby(["task", "bucket"])[metric].agg(["mean", "count"]).reset_index()
        for row in grouped.itertuples():
            records.append(
                {
                    "backbone": run.backbone,
                    "features": run.features,
                    "seed": run.seed,
                    "setting": row.task,
                    "bucket": row.bucket,
                    "value": row.mean,
                    "users": row.count,
                }
            )
    if not records:
        return pd.DataFrame(columns=["backbone", "features", "setting", "bucket", "value", "users"])
    frame = pd.DataFrame(records)
    return frame.groupby(["backbone", "features", "setting", "bucket"], as_index=False).agg(
        value=("value", "mean"), users=("users", "max")
    )


def bucket_plot(frame: pd.DataFrame, metric: str) -> Image | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if frame.empty:
        return None
    settings = [s for s, _ in SETTINGS if s in set(frame["setting"])]
    backbones = [b for b in BACKBONE_ORDER if b in set(frame["backbone"])]
    features = [f for f in ("none", "text", "text+profiles") if f in set(frame["features"])]
    bucket_labels = [label for _, _, label in BUCKETS]
    fig, axes = plt.subplots(
        len(settings), len(backbones), figsize=(3.2 * len(backbones), 2.9 * len(settings)), squeeze=False
    )
    width = 0.8 / max(len(features), 1)
    for r, setting in enumerate(settings):
        for c, backbone in enumerate(backbones):
            ax = axes[r][c]
            for k, feature in enumerate(features):
                part = frame[(frame.setting == setting) & (frame.backbone == backbone) & (frame.features == feature)]
                values = [
                    part[part.bucket == b]["value"].mean() if (part.bucket == b).any() else 0 for b in bucket_labels
                ]
                ax.bar(np.arange(len(bucket_labels)) + k * width, values, width, label=feature)
            ax.set_xticks(np.arange(len(bucket_labels)) + width * (len(features) - 1) / 2, bucket_labels)
            ax.set_title(f"{backbone} ({dict(SETTINGS)[setting]})", fontsize=9)
            if c == 0:
                ax.set_ylabel(metric)
            ax.set_xlabel("train interactions")
            ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return Image("activity_buckets.png", figure_png(fig), f"test {metric} by user activity (train interactions)")


def bucket_table(frame: pd.DataFrame, metric: str) -> Table | None:
    if frame.empty:
        return None
    rows = []
    for (backbone, setting), part in frame.groupby(["backbone", "setting"], sort=False):
        for _, _, bucket in BUCKETS:
            cell = part[part.bucket == bucket]
            if cell.empty:
                continue
            base = cell[cell.features == "text"]["value"]
            prof = cell[cell.features == "text+profiles"]["value"]
            b = float(base.iloc[0]) if len(base) else None
            p = float(prof.iloc[0]) if len(prof) else None
            impr = f"{(p - b) / b * 100:+.1f}%" if b and p is not None else "-"
            rows.append(
                [backbone, dict(SETTINGS)[setting], bucket, str(int(cell["users"].max())), fmt(b), fmt(p), impr]
            )
    order = {b: i for i, b in enumerate(BACKBONE_ORDER)}
    rows.sort(key=lambda r: (order.get(r[0], 99), r[1] != "full-shot"))
    return Table(["backbone", "setting", "bucket", "users", f"{metric} base", f"{metric} +profiles", "impr."], rows)


# ---------------------------------------------------------------- training length and popularity


SIDES = (
    ("text", "base (item text)"),
    ("text+user-profiles", "+ user profiles only"),
    ("text+item-profiles", "+ item profiles only"),
    ("text+profiles", "+ both (RecLM)"),
)


def side_table(runs: list[CFRun]) -> list[Any]:
    """Which side's profiles help: base, one side only, both; for backbones with one-side runs."""
    one_side = {f for f, _ in SIDES[1:3]}
    backbones = [b for b in backbones_of(runs) if any(r.backbone == b and r.features in one_side for r in runs)]
    if not backbones:
        return []
    settings = settings_of(runs)
    metrics = ("recall@20", "ndcg@20")
    headers = ["backbone", "profiles"] + [f"{label} {m}" for _, label in settings for m in metrics]
    rows = []
    for backbone in backbones:
        for features, label in SIDES:
            group = select(runs, backbone, features)
            if group:
                rows.append(
                    [backbone, label] + [fmt_ms(metric_values(group, s, m)) for s, _ in settings for m in metrics]
                )
    return [Table(headers, rows, "which side's profiles help: the final writer's profiles on one side or both")]


def cap_flags(metrics: dict) -> list[str]:
    """Why a run may have wanted more epochs: it stopped at the cap, or a best epoch is near it."""
    config = metrics.get("config", {})
    epochs = config.get("epochs")
    if not epochs:
        return []
    margin = max(CAP_MARGIN, int(config.get("eval_every", 1)))
    flags = ["stopped at the cap"] if metrics.get("epochs_run", 0) >= epochs else []
    for key, label in (("best_epoch", "best epoch"), ("best_epoch_cold", "cold-selected epoch")):
        best = metrics.get(key)
        if best and best >= epochs - margin:
            flags.append(f"{label} {best} of {epochs}")
    return flags


def cap_section(runs: list[CFRun]) -> list[Any]:
    rows = [[run.name, "; ".join(flags)] for run in runs if (flags := cap_flags(run.metrics))]
    if not rows:
        return [Text(f"No run stopped at its epoch cap or had a best epoch within {CAP_MARGIN} epochs of it.")]
    note = (
        f"{len(rows)} of {len(runs)} runs stopped at the epoch cap or had a best epoch within {CAP_MARGIN} epochs "
        "(or one validation) of it: they may be undertrained (raise cf.params.epochs)."
    )
    return [Text(note), Table(["run", "epoch cap"], rows)]


def text_model_section(runs: list[CFRun]) -> list[Any]:
    """Profile runs given their ``text`` run as epoch 0 (``cf.from_text``): which kept the ``text`` model (no
    epoch with the profiles beat it on validation) and which did not."""
    given = [r for r in runs if r.features.startswith("text+") and text_use(r) != "none"]
    if not given:
        return [Text("No profile run had its text run as a candidate (cf.from_text: none).")]
    rows = [
        [r.name, text_use(r), str(r.metrics.get("best_epoch", "-")), fmt_selection(r.metrics.get("best_epoch_cold"))]
        for r in given
    ]
    kept = sum(r.metrics.get("best_epoch") == 0 for r in given)
    note = (
        "Each profile run had its text run's model as epoch 0 of its selection (candidate: trained from scratch "
        "beside it; warm: trained on from it), so validation decides whether the profiles are used: "
        f"{kept} of {len(given)} kept the text model (best epoch 0: no epoch with profiles beat it on validation, "
        "and the run's numbers are the text run's)."
    )
    return [Text(note), Table(["run", "from text", "best epoch", "cold-selected epoch"], rows)]


def text_use(run: CFRun) -> str:
    return str((run.metrics.get("config") or {}).get("from_text", "none"))


def fmt_selection(epoch: int | None) -> str:
    return "-" if epoch is None else str(epoch)


def popularity_section(runs: list[CFRun]) -> list[Any]:
    """Mean over seeds of each backbone x features' top-20 popularity share and catalogue coverage."""
    rows = []
    for backbone in backbones_of(runs):
        for features in sorted({r.features for r in runs if r.backbone == backbone}):
            group = [r for r in select(runs, backbone, features) if r.metrics.get("popularity")]
            if group:
                share = [float(r.metrics["popularity"]["popular_share"]) for r in group]
                coverage = [float(r.metrics["popularity"]["coverage"]) for r in group]
                rows.append([backbone, features, fmt_ms(share), fmt_ms(coverage), str(len(group))])
    if not rows:
        return [Text("No run recorded the popularity of its top-20 lists (metrics.json 'popularity').")]
    caption = (
        "full-shot top-20 lists of every user with a full-shot test item: share of the slots taken by the 20 most "
        "popular train items, and coverage = distinct items in all lists / candidate items"
    )
    return [Table(["backbone", "features", "top-20 popular share", "coverage", "seeds"], rows, caption)]


# ---------------------------------------------------------------- example profiles


def example_profiles(root: Path, counts: np.ndarray | None, n: int) -> list[Any]:
    from reclm.llm.records import read_records  # the profile record format

    path = root / "profiles" / "users.jsonl"
    if n <= 0 or not path.is_file():
        return [Text("No generated user profiles in this run.")]
    records = {r.id: r for r in read_records(path, "user")}
    teacher_path = root / "teacher" / "users.jsonl"
    teacher = {r.id: r.profile for r in read_records(teacher_path, "user")} if teacher_path.is_file() else {}
    try:
        from reclm.rundir import RunDir

        data, split = RunDir(root).load()
        histories = split.train_histories()
    except (DataError, OSError, ValueError):
        data = histories = None
    chosen = pick_examples(list(records), data, counts, n)
    blocks: list[Any] = []
    for raw in chosen:
        record = records[raw]
        lines = []
        if data is not None:
            u = data.user_index()[raw]
            items = histories[u]
            feature = data.user_feature_text(u)
            lines.append(f"user {raw}: {len(items)} train interactions" + (f"; {feature}" if feature else ""))
            for item in items[-8:]:
                lines.append(f"  - {data.item_text(int(item))[:140]}")
            if len(items) > 8:
                lines.append(f"  ... and {len(items) - 8} earlier")
        else:
            lines.append(f"user {raw}; prompt:\n{record.prompt[:800]}")
        lines.append(f"profile: {record.profile}")
        if raw in teacher:
            lines.append(f"teacher: {teacher[raw]}")
        blocks.append(Text("\n".join(lines), pre=True))
    return blocks


def pick_examples(ids: list[str], data, counts: np.ndarray | None, n: int) -> list[str]:
    """Up to ``n`` users, one per activity bucket in turn (sparse users first), deterministic."""
    if data is None or counts is None:
        return sorted(ids)[:n]
    index = data.user_index()
    labels = bucket_of(counts)
    by_bucket: dict[str, list[str]] = {label: [] for _, _, label in BUCKETS}
    for raw in sorted(ids, key=lambda r: (len(r), r)):
        if raw in index:
            by_bucket[labels[index[raw]]].append(raw)
    chosen: list[str] = []
    while len(chosen) < n and any(by_bucket.values()):
        for label in list(by_bucket):
            if by_bucket[label] and len(chosen) < n:
                chosen.append(by_bucket[label].pop(0))
    return chosen


# ---------------------------------------------------------------- assembling


def build_sections(root: Path) -> tuple[str, list[Section]]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such run directory")
    config = read_config(root)
    report_opts = config.get("report", {}) if isinstance(config, dict) else {}
    metric = report_opts.get("metric", "ndcg@20")
    manifests = {p.stem: m for p in sorted((root / "manifests").glob("*.json")) if (m := read_json(p))}
    runs = load_runs(root)
    counts = train_counts(root)
    dataset = (read_json(root / "data" / "split.json") or {}).get("meta", {}).get("dataset", "?")
    title = f"RecLM report: {dataset} ({root.name})"

    sections = [Section("Setup", [Text(setup_text(root, config, runs))])]
    tables = main_tables(runs, chance=chance_levels(root) if runs else None)
    sections.append(Section("Results", tables or [Text("No CF results in this run (cf/*/metrics.json).")]))
    sections.append(Section("Significance: with profiles vs base", significance_table(runs, metric)))
    sections.append(Section("Ablation", side_table(runs) + ablation_table(runs, manifests)))
    sections.append(Section("Training length", cap_section(runs)))
    sections.append(Section("Text model as epoch 0", text_model_section(runs)))
    sections.append(Section("Popularity concentration", popularity_section(runs)))
    plots = Section("Plots")
    plots.blocks += [c for task in CURVES if (c := validation_curves(runs, task)) is not None]
    if counts is not None:
        frame = bucket_metrics(runs, counts, metric)
        image, table = bucket_plot(frame, metric), bucket_table(frame, metric)
        plots.blocks += [b for b in (image, table) if b is not None]
    if not plots.blocks:
        plots.blocks.append(Text("No training histories or per-user results to plot."))
    sections.append(plots)
    sections.append(Section("Cost per stage", cost_table(manifests)))
    sections.append(Section("Profile quality", quality_section(root)))
    sections.append(Section("Example profiles", example_profiles(root, counts, int(report_opts.get("examples", 3)))))
    sections.append(Section("All CF runs", [all_runs_table(runs)]))
    return title, sections


def read_config(root: Path) -> dict:
    import yaml

    path = root / "config.yaml"
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def setup_text(root: Path, config: dict, runs: list[CFRun]) -> str:
    split = read_json(root / "data" / "split.json") or {}
    stats = split.get("stats", {})
    meta = split.get("meta", {})
    stages = config.get("stages", {}) if config else {}
    parts = [
        f"Dataset {meta.get('dataset', '?')}: {split.get('n_users', '?')} users, {split.get('n_items', '?')} items; "
        f"split {meta.get('method', '?')} (seed {meta.get('seed', '?')}): {stats.get('train', '?')} train, "
        f"{stats.get('valid', '?')} valid, {stats.get('test_full_shot', '?')} full-shot test and "
        f"{stats.get('test_zero_shot', '?')} zero-shot test pairs on {stats.get('zero_shot_items', '?')} new items "
        f"({meta.get('zero_shot', 'random')}); {stats.get('cold_valid', 0)} cold-validation pairs of "
        f"{stats.get('cold_valid_users', 0)} users on {stats.get('cold_valid_items', 0)} held-out items.",
    ]
    if stages:
        parts.append(
            f"Stages: teacher {stages.get('teacher')}, sft {stages.get('sft')}, collab {stages.get('collab')}, "
            f"reward {stages.get('reward')}, rl {stages.get('rl')}, item side {stages.get('item_side')}."
        )
    seeds = sorted({r.seed for r in runs})
    if seeds:
        parts.append(
            f"CF seeds: {', '.join(map(str, seeds))}. Models selected on validation; test at the best validation "
            "epoch; zero-shot also at the best cold-validation epoch (never on test)."
        )
    return " ".join(parts)


def all_runs_table(runs: list[CFRun]) -> Table:
    rows = []
    for run in sorted(
        runs, key=lambda r: (BACKBONE_ORDER.index(r.backbone) if r.backbone in BACKBONE_ORDER else 99, r.name)
    ):
        m = run.metrics
        popularity = m.get("popularity") or {}
        rows.append(
            [run.name, str(m.get("best_epoch", "-")), fmt_selection(m.get("best_epoch_cold"))]
            + [str(m.get("epochs_run", "-")), fmt(m.get("epoch_seconds"), 2)]
            + [fmt((m.get(s) or {}).get(k)) for s, _ in SETTINGS for k in ("recall@20", "ndcg@20")]
            + [fmt((m.get(s) or {}).get("ndcg@20")) for s in ("valid", "cold_valid")]
            + [fmt(popularity.get("popular_share"), 3), fmt(popularity.get("coverage"), 3)]
            + ["yes" if cap_flags(m) else ""]
        )
    headers = ["run", "best epoch", "cold-sel. epoch", "epochs", "s/epoch", "full R@20", "full N@20"]
    headers += ["zero R@20", "zero N@20", "zero R@20 cold-sel.", "zero N@20 cold-sel.", "valid N@20"]
    headers += ["cold-valid N@20", "top-20 popular", "coverage", "at cap"]
    return Table(headers, rows)


# ---------------------------------------------------------------- rendering


def render_markdown(title: str, sections: list[Section], image_dir: str = "plots") -> str:
    out = [f"# {title}", ""]
    for section in sections:
        out += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Text):
                out += (["```", block.text, "```"] if block.pre else [block.text]) + [""]
            elif isinstance(block, Table):
                if block.caption:
                    out += [f"*{block.caption}*", ""]
                out.append("| " + " | ".join(block.headers) + " |")
                out.append("|" + "|".join("---" for _ in block.headers) + "|")
                out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in block.rows]
                out.append("")
            elif isinstance(block, Image):
                out += [f"![{block.caption}]({image_dir}/{block.name})", ""]
    return "\n".join(out)


CSS = """
body{font-family:Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.4em;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}
caption{caption-side:top;text-align:left;font-style:italic;padding-bottom:4px}
pre{background:#f7f7f7;padding:.7em;overflow-x:auto;font-size:12px;white-space:pre-wrap}
img{max-width:100%}figure{margin:1em 0}figcaption{font-size:13px;color:#555}
"""


def render_html(title: str, sections: list[Section]) -> str:
    esc = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    for section in sections:
        out.append(f"<h2>{esc(section.title)}</h2>")
        for block in section.blocks:
            if isinstance(block, Text):
                out.append(f"<pre>{esc(block.text)}</pre>" if block.pre else f"<p>{esc(block.text)}</p>")
            elif isinstance(block, Table):
                out.append("<table>")
                if block.caption:
                    out.append(f"<caption>{esc(block.caption)}</caption>")
                out.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in block.headers) + "</tr>")
                out += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in block.rows]
                out.append("</table>")
            elif isinstance(block, Image):
                data = base64.b64encode(block.png).decode()
                out.append(
                    f'<figure><img alt="{esc(block.caption)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{esc(block.caption)}</figcaption></figure>"
                )
    out.append("</body></html>")
    return "\n".join(out)


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write report.md (+ plots/*.png) and the self-contained report.html; returns their paths."""
    root = Path(run_dir)
    out = Path(out_dir) if out_dir else root / "report"
    title, sections = build_sections(root)
    out.mkdir(parents=True, exist_ok=True)
    plots = out / "plots"
    images = [b for s in sections for b in s.blocks if isinstance(b, Image)]
    if images:
        plots.mkdir(exist_ok=True)
    for image in images:
        (plots / image.name).write_bytes(image.png)
    md, page = out / "report.md", out / "report.html"
    md.write_text(render_markdown(title, sections))
    page.write_text(render_html(title, sections))
    results = out / "results.json"
    results.write_text(json.dumps(results_json(load_runs(root)), indent=2))
    return [md, page, results]


def results_json(runs: list[CFRun]) -> list[dict]:
    """Every run's test metrics, machine-readable (what the tables are made of)."""
    return [
        {
            "run": r.name,
            "backbone": r.backbone,
            "features": r.features,
            "variant": r.variant,
            "seed": r.seed,
            "valid": r.metrics.get("valid", {}),
            "test": r.metrics.get("test", {}),
            "zero_shot": r.metrics.get("zero_shot", {}),
            "best_epoch": r.metrics.get("best_epoch"),
            "cold_valid": r.metrics.get("cold_valid", {}),
            "zero_shot_cold_selected": r.metrics.get("zero_shot_cold_selected", {}),
            "best_epoch_cold": r.metrics.get("best_epoch_cold"),
            "epochs_run": r.metrics.get("epochs_run"),
            "epoch_cap": cap_flags(r.metrics),
            "popularity": r.metrics.get("popularity", {}),
        }
        for r in runs
    ]
