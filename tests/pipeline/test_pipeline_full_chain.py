"""Every stage on, for real, on a tiny dataset and a tiny random Llama (SmolLM2's architecture and
tokenizer): teacher, SFT, neighbours, collaborative tuning, reward model, DPO, item side, profiles
(with the ablation variants), encode, train-cf, report. Then an interrupted stage resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from reclm.pipeline.config import PipelineConfig
from reclm.pipeline.engine import StageError
from reclm.pipeline.run import run

pytestmark = pytest.mark.slow
TINY_TRAIN = {"steps": 2, "batch_size": 2, "max_seq_len": 768}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from reclm.llm.model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model", layers=1, hidden=32, intermediate=64)


def chain_config(dataset: Path, model: Path, out: Path, rl: str = "dpo") -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "dataset": str(dataset / "inter.csv"),
            "item_text": str(dataset / "items.csv"),
            "out": str(out),
            "threads": 1,
            "split": {"method": "random", "zero_shot_fraction": 0.1, "seed": 1},
            "stages": {
                "teacher": "offline",
                "sft": True,
                "collab": True,
                "reward": True,
                "rl": rl,
                "item_side": True,
                "ablation": True,
            },
            "teacher": {"users": None, "items": 30},
            "prompt": {"max_items": 5, "max_words": 8},
            "llm": {
                "base_model": str(model),
                "sft": TINY_TRAIN,
                "collab": {**TINY_TRAIN, "max_tokens": 512, "evaluate": False, "max_seq_len": 1024},
                "reward": {**TINY_TRAIN, "pairs": 8},
                "rl": {"steps": 1, "batch_size": 2, "eval_users": 2},
                "item_side": TINY_TRAIN,
            },
            "neighbours": {"k": 3, "epochs": 2},
            "generation": {"backend": "transformers", "max_new_tokens": 12, "batch_size": 16},
            "cf": {
                "backbones": ["lightgcn"],
                "seeds": [1],
                "params": {"epochs": 2, "dim": 16, "batch_size": 256, "eval_batch_size": 64},
            },
        }
    )


def actions(outcomes) -> dict[str, str]:
    return {o.name: o.action for o in outcomes}


def test_every_stage_runs_and_fills_the_ablation(tmp_path, tiny_dataset, tiny_model):
    out = tmp_path / "run"
    config = chain_config(tiny_dataset, tiny_model, out)
    outcomes = run(config, out, Console(quiet=True))
    assert set(actions(outcomes).values()) == {"ran"}
    for folder in ("sft", "collab", "reward", "rl", "item_sft"):
        assert (out / folder / "adapter" / "adapter_config.json").is_file(), folder
    for variant in ("sft", "collab"):
        assert (out / "profiles" / "ablation" / variant / "users.jsonl").is_file()
        assert (out / "embeddings" / "ablation" / variant / "users.npz").is_file()
    generation = json.loads((out / "profiles" / "generation.json").read_text())
    assert generation["adapters"]["rl"].endswith("rl/adapter")
    assert generation["adapters"]["items"].endswith("item_sft/adapter")
    names = {r["name"] for r in json.loads((out / "cf" / "runs.json").read_text())}
    assert names == {
        "lightgcn-text-s1",
        "lightgcn-text+profiles-s1",
        "lightgcn-text+profiles@sft-s1",
        "lightgcn-text+profiles@collab-s1",
        "lightgcn-text+user-profiles-s1",  # cf.side_ablation
        "lightgcn-text+item-profiles-s1",
    }
    md = (out / "report" / "report.md").read_text()
    for row in ("base (item text)", "+ distilled profiles", "+ collaborative tuning", "+ RL"):
        assert f"| lightgcn | {row} |" in md
    sft = json.loads((out / "manifests" / "sft.json").read_text())
    assert sft["tokens"]["train"] > 0 and sft["units"] == 2
    profiles = json.loads((out / "manifests" / "profiles.json").read_text())
    assert profiles["tokens_total"] > 0
    assert (out / "profiles" / "quality.json").is_file()

    # the profiles stage run again (from the generation cache) writes the same files: encode and CF stay cached
    assert actions(run(config, out, Console(quiet=True), only="profiles"))["profiles"] == "ran"
    again = actions(run(config, out, Console(quiet=True)))
    assert set(again.values()) == {"cached"}

    # switch RL off: only what depends on it reruns, and its output is parked, not read
    no_rl = chain_config(tiny_dataset, tiny_model, out, rl="none")
    again = actions(run(no_rl, out, Console(quiet=True)))
    assert again["rl"] == "off" and not (out / "rl").exists()
    before_rl = ("prepare", "teacher", "sft", "neighbours", "collab", "reward", "item_side")
    assert {s: again[s] for s in before_rl} == dict.fromkeys(before_rl, "cached")
    assert again["profiles"] == "ran" and again["train_cf"] == "ran"
    generation = json.loads((out / "profiles" / "generation.json").read_text())
    assert "rl" not in generation["adapters"] and generation["adapters"]["collab"].endswith("collab/adapter")


def test_an_interrupted_stage_resumes(tmp_path, tiny_dataset, tiny_model, monkeypatch):
    """The SFT stage dies after its first checkpoint; the rerun resumes it and finishes the run."""
    import reclm.llm.sft as sft

    out = tmp_path / "run"
    config = chain_config(tiny_dataset, tiny_model, out)
    config.stages.collab = False
    config.stages.reward = False
    config.stages.item_side = False
    config.stages.ablation = False
    config.stages.rl = "none"
    config.llm.sft.steps = 4
    real = sft.train_lora

    def dies_after_a_checkpoint(*args, **kwargs):
        settings = args[4] if len(args) > 4 else kwargs["train"]
        settings.steps = 2
        settings.save_every = 1
        real(*args, **kwargs)
        raise KeyboardInterrupt("simulated crash after step 2")

    monkeypatch.setattr(sft, "train_lora", dies_after_a_checkpoint)
    with pytest.raises((KeyboardInterrupt, StageError)):
        run(config, out, Console(quiet=True))
    record = json.loads((out / "manifests" / "sft.json").read_text())
    assert record["status"] == "interrupted"
    assert not (out / "sft").exists() and (out / ".work" / "sft").is_dir()
    monkeypatch.setattr(sft, "train_lora", real)
    outcomes = actions(run(config, out, Console(quiet=True)))
    assert outcomes["prepare"] == "cached" and outcomes["teacher"] == "cached" and outcomes["sft"] == "ran"
    record = json.loads((out / "manifests" / "sft.json").read_text())
    assert record["resumed"] is True
    metrics = json.loads((out / "sft" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["resumed_from"] == 2
