"""Settings added after runs were made keep those runs cached (reclm.cachekeys): a stage, and a unit of a
stage (one CF run, finished or half-trained); a CF run's saved state: tests/cf/test_cf_trainer.py."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field
from rich.console import Console

from reclm.cachekeys import added_later, every_field, key_and_older, key_dump
from reclm.pipeline.config import PipelineConfig
from reclm.pipeline.engine import Pipeline, Stage, StageContext


class Inner(BaseModel):
    rate: float = 0.1
    fresh: int | None = added_later(None)


class Outer(BaseModel):
    name: str = "x"
    window: float = added_later(30.0, ge=0)
    inner: Inner = Inner()
    many: list[Inner] = Field(default_factory=lambda: [Inner(), Inner(fresh=4)])
    named: dict[str, Inner] = Field(default_factory=lambda: {"a": Inner()})


def test_a_field_added_later_leaves_the_key_only_while_it_holds_its_default():
    assert key_dump(Outer()) == {
        "name": "x",
        "inner": {"rate": 0.1},
        "many": [{"rate": 0.1}, {"rate": 0.1, "fresh": 4}],
        "named": {"a": {"rate": 0.1}},
    }
    assert key_dump(Outer(window=5))["window"] == 5
    assert key_dump(Outer(inner=Inner(fresh=0)))["inner"] == {"rate": 0.1, "fresh": 0}, "0 is not the default None"
    assert key_dump(Outer(name="y"))["name"] == "y", "ordinary fields change the key as before"
    with every_field():
        assert key_dump(Outer()) == Outer().model_dump()
    assert "window" not in key_dump(Outer()), "every_field ends with its block"
    now, older = key_and_older(lambda: {"o": key_dump(Outer())})
    assert now == {"o": key_dump(Outer())} and older == {"o": Outer().model_dump()}


def test_the_shipped_added_later_fields_are_out_of_the_default_keys():
    from reclm.cf import CFConfig
    from reclm.pipeline.stages.cf import resolved_cf_params
    from reclm.pipeline.table import generation_key

    assert "ssl_nodes" not in resolved_cf_params({})
    assert resolved_cf_params({"ssl_nodes": 512})["ssl_nodes"] == 512
    assert "cooldown" not in generation_key(PipelineConfig())["generation"]
    assert "repetition_penalty" not in generation_key(PipelineConfig())["generation"]
    penalised = PipelineConfig.model_validate({"generation": {"repetition_penalty": 1.05}})
    assert generation_key(penalised)["generation"]["repetition_penalty"] == 1.05
    from reclm.pipeline.stages.generation import decode_params

    assert decode_params(penalised).repetition_penalty == 1.05  # what the profiles stage decodes with
    from reclm.pipeline.table import build_stages

    stages = {stage.name: stage for stage in build_stages()}
    assert stages["profiles"].config(penalised) != stages["profiles"].config(PipelineConfig())
    assert stages["rl"].config(penalised) == stages["rl"].config(PipelineConfig()), "PPO samples without it"
    assert "ssl_nodes" in CFConfig().model_dump(), "the field itself is still there"


def counting_stage(calls: list[str]) -> Stage:
    def body(ctx: StageContext) -> None:
        calls.append(ctx.stage)
        (ctx.out / "value.txt").write_text(str(ctx.config.generation.cooldown))

    return Stage("profiles", "profiles", body, config=lambda c: key_dump(c.generation))


def test_a_stage_made_before_or_while_the_field_was_in_its_key_stays_cached(tmp_path: Path):
    calls: list[str] = []

    def run(config: PipelineConfig, root: Path) -> str:
        pipeline = Pipeline(config, root, [counting_stage(calls)], console=Console(quiet=True))
        return pipeline.run()[0].action

    with every_field():  # the run as the code wrote it while cooldown was in every key
        assert run(PipelineConfig(), tmp_path / "a") == "ran"
    assert run(PipelineConfig(), tmp_path / "a") == "cached"
    plan = Pipeline(PipelineConfig(), tmp_path / "a", [counting_stage(calls)], console=Console(quiet=True)).plan()
    assert plan[0].action == "cached"
    set_on = PipelineConfig.model_validate({"generation": {"cooldown": 5}})
    assert run(set_on, tmp_path / "a") == "ran", "a value other than the default is part of the key"
    assert calls == ["profiles", "profiles"]
    assert (tmp_path / "a" / "profiles" / "value.txt").read_text() == "5.0"


def test_units_committed_or_half_done_under_the_older_key_are_taken_over(tmp_path: Path):
    seen: dict[str, tuple[bool, bool]] = {}  # unit -> (done, found the half-done state)

    def body(ctx: StageContext) -> None:
        for name in ("finished", "half"):
            key, older = key_and_older(lambda name=name: {"unit": name, "settings": key_dump(Outer())})
            assert key != older
            unit = ctx.unit(name, key, older)
            if unit.done:
                seen[name] = (True, False)
                continue
            scratch = unit.scratch()
            seen[name] = (False, (scratch / "state").is_file())
            (scratch / "out").write_text(name)
            unit.commit()

    out = tmp_path / "cf"
    with every_field():  # an older attempt: "finished" committed, "half" only started
        ctx = StageContext(PipelineConfig(), tmp_path, out, None, False, Console(quiet=True), {})
        for name in ("finished", "half"):
            key = {"unit": name, "settings": key_dump(Outer())}
            scratch = ctx.unit(name, key).scratch()
            (scratch / "state").write_text("epoch 3")
            if name == "finished":
                ctx.unit(name, key).commit()
    ctx = StageContext(PipelineConfig(), tmp_path, out, None, True, Console(quiet=True), {})
    body(ctx)
    assert seen == {"finished": (True, False), "half": (False, True)}


def test_the_teacher_key_leaves_out_how_the_endpoint_is_asked_and_paid():
    """Retries, timeouts, prices and the spending cap change no teacher profile; the model does."""
    from reclm.pipeline.stages.data import teacher_key

    def key(openai: dict, **teacher) -> dict:
        return teacher_key(PipelineConfig.model_validate({"teacher": {"openai": openai, **teacher}}))

    plain = key({})
    paid = {"api_key_env": None, "concurrency": 64, "max_retries": 1, "timeout": 5, "price_in": 0.01, "price_out": 0.03}
    assert key(paid, max_cost=2.5) == plain
    assert key({"model": "gpt-4o-mini"}) != plain
    assert plain["teacher"]["openai"]["concurrency"] == 8, "transport at its defaults, not dropped"
