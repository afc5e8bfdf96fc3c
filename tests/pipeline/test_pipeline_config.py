"""Config loading and validation: every error is one line naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from reclm.cli.main import app
from reclm.pipeline.config import ConfigError, PipelineConfig, default_config, load_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "x.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "cf:\n  backbones: [bias-mf, ncf, lightgnc]\n",
            "x.yaml: cf.backbones[2]: 'lightgnc' is not one of 'bias-mf', 'ncf', 'lightgcn', 'sgl' or 'simgcl'",
        ),
        ("colour: red\n", "x.yaml: colour: unknown key (expected one of: dataset, item_text, out"),
        ("llm:\n  sft:\n    stepz: 3\n", "x.yaml: llm.sft.stepz: unknown key (expected one of: steps, batch_size"),
        ("llm:\n  sft:\n    steps: -1\n", "x.yaml: llm.sft.steps: Input should be greater than or equal to 1 (got -1)"),
        ("split:\n  ratios: [0.5, 0.1, 0.1]\n", "x.yaml: split.ratios: [0.5, 0.1, 0.1] must be three non-negative"),
        ("stages:\n  rl: ppo2\n", "x.yaml: stages.rl: 'ppo2' is not one of 'ppo', 'dpo' or 'none'"),
        ("stages:\n  sft: false\n", "x.yaml: stages: collab: true needs sft: true"),
        ("stages:\n  rl: ppo\n  reward: false\n", "x.yaml: stages: rl: ppo needs reward: true"),
        (
            "stages: {sft: false, collab: false, rl: none}\n",
            "x.yaml: stages.item_side: true with sft: false needs llm.item_side.init: fresh",
        ),
        ("generation:\n  batch_size: many\n", "x.yaml: generation.batch_size: Input should be a valid integer"),
        ("cf:\n  seeds: []\n", "x.yaml: cf.seeds: must list at least one value"),
        ("- just\n- a list\n", "x.yaml: expected a mapping of keys at the top level, got list"),
        ("cf: [unclosed\n", "x.yaml: line 2: not valid YAML"),
        ("split:\n  zero_shot: newest\n", "x.yaml: split.zero_shot: 'newest' is not one of 'random' or 'latest'"),
        (
            "split:\n  zero_shot_fraction: 0.5\n  cold_valid_fraction: 0.5\n",
            "x.yaml: split: zero_shot_fraction + cold_valid_fraction must be below 1",
        ),
    ],
)
def test_bad_config_is_one_line_naming_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_cf_params_are_checked_against_the_cf_trainer_config(tmp_path):
    pytest.importorskip("reclm.cf.config")
    with pytest.raises(
        ConfigError,
        match=r"x.yaml: cf.params.learning_rate: unknown key \(expected one of: fusion, profile_dropout, from_text, "
        r"dim",
    ):
        load_config(write(tmp_path, "cf:\n  params: {learning_rate: 0.1}\n"))
    with pytest.raises(ConfigError, match=r"from_text needs a fusion that adds profiles to the text model"):
        load_config(write(tmp_path, "cf:\n  params: {fusion: concat, from_text: warm}\n"))
    with pytest.raises(ConfigError, match=r"cf: from_text \(bias-mf\) needs 'text' in cf.features"):
        load_config(write(tmp_path, "cf:\n  features: [text+profiles]\n  from_text: candidate\n"))
    quiet = load_config(write(tmp_path, "cf:\n  features: [text+profiles]\n  params: {fusion: concat}\n")).cf
    assert quiet.text_use("lightgcn") == "none"  # the default applies only where it can: no error
    default = load_config(write(tmp_path, "cf: {}\n")).cf
    assert default.run_params("sgl", "text+profiles", 1)["from_text"] == "candidate"
    assert "from_text" not in default.run_params("sgl", "text", 1)  # the text run's key does not move
    with pytest.raises(ConfigError, match=r"x.yaml: cf.per_backbone.sgl.sgl_drop_ratio: Input should be less than 1"):
        load_config(write(tmp_path, "cf:\n  per_backbone: {sgl: {sgl_drop_ratio: 2}}\n"))
    with pytest.raises(ConfigError, match=r"cf.params.seed: set it with cf.seeds"):
        load_config(write(tmp_path, "cf:\n  params: {seed: 3}\n"))
    config = load_config(write(tmp_path, "cf:\n  params: {epochs: 7, dim: 32}\n  per_backbone: {ncf: {epochs: 3}}\n"))
    assert config.cf.run_params("ncf", "text", 1)["epochs"] == 3
    assert config.cf.run_params("sgl", "text", 1) == {
        "epochs": 7,
        "dim": 32,
        "backbone": "sgl",
        "features": "text",
        "seed": 1,
    }


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: no such config file"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_ml100k_config_is_the_builtin_default():
    assert load_config(CONFIGS / "ml-100k.yaml") == PipelineConfig()
    assert default_config("ml-100k") == PipelineConfig()


def test_cold_validation_is_on_in_the_pipeline_defaults_and_shipped_configs():
    spec = PipelineConfig().split.spec()
    assert (spec.cold_valid_fraction, spec.zero_shot, spec.zero_shot_fraction) == (0.05, "random", 0.1)
    for name in ("mind-paper", "mind-distill", "mind-teacher", "netflix", "mind-cpu", "netflix-cpu"):
        assert load_config(CONFIGS / f"{name}.yaml").split.spec().cold_valid_fraction == 0.05
    latest = load_config(CONFIGS / "ml-100k.yaml", {"split.zero_shot": "latest"}).split.spec()
    assert latest.zero_shot == "latest" and latest.cold_valid_fraction == 0.05


def test_shipped_configs_load(tmp_path):
    mind = load_config(CONFIGS / "mind-paper.yaml")
    assert mind.stages.teacher == "file" and mind.split.method == "snapshot"
    assert Path(mind.dataset) == (REPO.parent / "shared" / "datasets" / "mind").resolve()
    netflix = load_config(CONFIGS / "netflix.yaml")
    assert netflix.split.method == "auto" and netflix.split.ratios == (0.8, 0.1, 0.1)
    assert netflix.stages.teacher == "file"
    distill = load_config(CONFIGS / "mind-distill.yaml")
    assert distill.dataset == mind.dataset and distill.split == mind.split
    assert distill.stages.sft and not distill.stages.collab and distill.stages.rl == "none"
    teacher = load_config(CONFIGS / "mind-teacher.yaml")
    assert teacher.dataset == mind.dataset and teacher.split == mind.split and teacher.cf == mind.cf
    assert not teacher.stages.sft and not teacher.stages.generators()  # user profiles are the teacher's, copied
    assert teacher.stages.item_side and teacher.llm.item_side.keep_teacher  # the item writer writes the rest
    mind_cpu, netflix_cpu = load_config(CONFIGS / "mind-cpu.yaml"), load_config(CONFIGS / "netflix-cpu.yaml")
    assert mind_cpu.split == mind.split and netflix_cpu.split == netflix.split
    for cpu in (mind_cpu, netflix_cpu):  # the whole method, every id profiled, on CPU
        assert cpu.stages.sft and cpu.stages.collab and cpu.stages.rl == "dpo" and cpu.stages.item_side
        assert cpu.generation.users is None and cpu.generation.items is None
        assert cpu.generation.backend == "ctranslate2" and cpu.prompt.style == "compact"
    for config in (mind, netflix, teacher, mind_cpu, netflix_cpu):
        assert set(config.cf.backbones) == {"bias-mf", "ncf", "lightgcn", "sgl", "simgcl"}


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "c.yaml"
    path.write_text(
        yaml.safe_dump({"dataset": "../data/x.csv", "item_text": "items.csv", "teacher": {"user_file": "/abs.jsonl"}})
    )
    config = load_config(path)
    assert config.dataset == str(tmp_path / "data" / "x.csv")
    assert config.item_text == str(tmp_path / "sub" / "items.csv")
    assert config.teacher.user_file == "/abs.jsonl"
    assert load_config(path, {"dataset": "ml-100k"}).dataset == "ml-100k"


def test_cli_prints_the_config_error_on_one_line_and_exits_2(tmp_path):
    path = write(tmp_path, "cf:\n  backbones: [lightgnc]\n")
    result = CliRunner().invoke(app, ["run", str(path), "--dry-run"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "cf.backbones[0]: 'lightgnc' is not one of" in lines[0]


def test_cli_rejects_an_unknown_stage_name():
    result = CliRunner().invoke(app, ["run", "--dry-run", "--only", "sftt"])
    assert result.exit_code == 2
    assert "--only 'sftt': expected one of prepare, teacher, sft" in result.output


def test_auto_generation_backend_follows_the_device(monkeypatch):
    """`auto`: CTranslate2 on CPU (faster there), transformers on CUDA; the MIND and Netflix configs use it."""
    import reclm.llm.model as model
    from reclm.pipeline.stages.generation import generation_backend, writer_backend

    config = load_config(CONFIGS / "mind-paper.yaml")
    assert config.generation.backend == "auto"
    monkeypatch.setattr(model, "resolve_device", lambda device=None: "cpu")
    assert generation_backend(config) == writer_backend(config) == "ctranslate2"
    monkeypatch.setattr(model, "resolve_device", lambda device=None: "cuda")
    assert generation_backend(config) == writer_backend(config) == "transformers"
    assert generation_backend(PipelineConfig()) == "ctranslate2", "an explicit backend is kept"
    served = PipelineConfig.model_validate({"generation": {"backend": "openai"}})
    assert generation_backend(served) == "openai" and writer_backend(served) == "transformers"


def test_null_generation_batch_follows_the_device(monkeypatch):
    import reclm.llm.model as model
    from reclm.pipeline.stages.generation import generation_batch_size, writer_options

    config = load_config(CONFIGS / "mind-paper.yaml")
    assert config.generation.batch_size is None
    monkeypatch.setattr(model, "resolve_device", lambda device=None: "cpu")
    assert generation_batch_size(config) == writer_options(config)["batch_size"] == 16
    monkeypatch.setattr(model, "resolve_device", lambda device=None: "cuda")
    assert generation_batch_size(config) == writer_options(config)["batch_size"] == 256
    assert generation_batch_size(PipelineConfig()) == 16


def test_the_stage_list_runs_in_the_documented_order():
    from reclm.pipeline.config import STAGE_ORDER
    from reclm.pipeline.table import build_stages

    stages = build_stages()
    assert tuple(s.name for s in stages) == STAGE_ORDER
    assert set(stages[-1].needs) == set(STAGE_ORDER[:-1])  # the report reads every other stage


def test_where_the_generation_servers_are_does_not_change_the_profiles_key():
    from reclm.pipeline.table import build_stages

    profiles = next(s for s in build_stages() if s.name == "profiles")

    def key(generation: dict) -> dict:
        return profiles.config(PipelineConfig.model_validate({"generation": {"backend": "openai", **generation}}))

    one = key({"served_model": "writer"})
    two_replicas = key({"served_model": "writer", "base_url": ["http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1"]})
    assert two_replicas == one == key({"served_model": "writer", "concurrency": 32, "api_key_env": None})
    assert key({"served_model": "other"}) != one  # what the servers run does change it
    assert key({"served_model": "writer", "max_new_tokens": 20}) != one
