"""The stage cache itself, with small stages defined here: what reruns, what is skipped, resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from rich.console import Console

from reclm.llm.generation import DecodeParams
from reclm.pipeline.config import PipelineConfig
from reclm.pipeline.engine import Pipeline, Stage, StageContext, StageError


class Calls:
    """Counts stage executions and lets a test make one stage fail."""

    def __init__(self) -> None:
        self.count: dict[str, int] = {}
        self.fail_once: set[str] = set()
        self.resumed: dict[str, list[bool]] = {}

    def hit(self, ctx: StageContext) -> None:
        self.count[ctx.stage] = self.count.get(ctx.stage, 0) + 1
        self.resumed.setdefault(ctx.stage, []).append(ctx.resumed)


def read(root: Path, folder: str) -> str:
    return (root / folder / "value.txt").read_text()


def make_stages(calls: Calls, source: Path) -> list[Stage]:
    """prepare <- teacher <- sft <- report, and neighbours <- prepare; values flow through files."""

    def prepare(ctx: StageContext) -> dict:
        calls.hit(ctx)
        (ctx.out / "value.txt").write_text(f"data({source.read_text()},{ctx.config.split.seed})")
        return {"units": 10, "unit": "row"}

    def teacher(ctx: StageContext) -> dict:
        calls.hit(ctx)
        # only the parity of teacher.users matters: equal outputs for 2 and 4
        (ctx.out / "value.txt").write_text(f"teacher({read(ctx.root, 'data')},{(ctx.config.teacher.users or 0) % 2})")
        return {"tokens": 7}

    def sft(ctx: StageContext) -> None:
        calls.hit(ctx)
        (ctx.out / "partial.txt").write_text("half")
        if ctx.stage in calls.fail_once:
            calls.fail_once.discard(ctx.stage)
            raise RuntimeError("simulated crash")
        (ctx.out / "value.txt").write_text(f"sft({read(ctx.root, 'teacher')},{ctx.config.llm.sft.steps})")

    def neighbours(ctx: StageContext) -> None:
        calls.hit(ctx)
        (ctx.out / "value.txt").write_text(f"nb({read(ctx.root, 'data')},{ctx.config.neighbours.k})")

    def report(ctx: StageContext) -> None:
        calls.hit(ctx)
        parts = [read(ctx.root, f) for f in ("sft", "neighbours") if (ctx.root / f).is_dir()]
        (ctx.out / "value.txt").write_text("report(" + ",".join(parts) + ")")

    return [
        Stage("prepare", "data", prepare, config=lambda c: c.section("split"), files=lambda c: [source]),
        Stage("teacher", "teacher", teacher, needs=("prepare",), config=lambda c: c.section("teacher")),
        Stage(
            "sft",
            "sft",
            sft,
            needs=("teacher",),
            config=lambda c: c.llm.sft.model_dump(),
            enabled=lambda c: c.stages.sft,
        ),
        Stage("neighbours", "neighbours", neighbours, needs=("prepare",), config=lambda c: c.section("neighbours")),
        Stage("report", "report", report, needs=("sft", "neighbours")),
    ]


@pytest.fixture
def setup(tmp_path: Path):
    source = tmp_path / "source.txt"
    source.write_text("v1")
    calls = Calls()
    stages = make_stages(calls, source)

    def run(config: PipelineConfig | None = None, **kwargs):
        pipeline = Pipeline(config or PipelineConfig(), tmp_path / "run", stages, console=Console(quiet=True))
        return {o.name: o.action for o in pipeline.run(**kwargs)}

    return run, calls, tmp_path / "run", source


def test_first_run_runs_everything_and_rerun_skips_everything(setup):
    run, calls, root, _ = setup
    assert set(run().values()) == {"ran"}
    assert calls.count == {"prepare": 1, "teacher": 1, "sft": 1, "neighbours": 1, "report": 1}
    assert read(root, "report") == "report(sft(teacher(data(v1,2020),0),30),nb(data(v1,2020),5))"
    assert set(run().values()) == {"cached"}
    assert calls.count == {"prepare": 1, "teacher": 1, "sft": 1, "neighbours": 1, "report": 1}
    manifest = json.loads((root / "manifests" / "teacher.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["tokens_total"] == 7
    assert manifest["peak_memory_mb"] > 0
    assert manifest["packages"]["torch"]
    assert manifest["config_hash"] and manifest["input_hash"] and manifest["output_hash"]
    assert (
        manifest["inputs"]["upstream"]["prepare"]
        == json.loads((root / "manifests" / "prepare.json").read_text())["output_hash"]
    )


def test_changing_one_input_reruns_exactly_the_dependent_stages(setup):
    run, calls, root, _ = setup
    run()
    config = PipelineConfig()
    config.llm.sft.steps = 61
    actions = run(config)
    assert actions == {"prepare": "cached", "teacher": "cached", "sft": "ran", "neighbours": "cached", "report": "ran"}
    assert read(root, "report").startswith("report(sft(teacher(data(v1,2020),0),61)")

    config.neighbours.k = 9
    actions = run(config)
    assert actions == {"prepare": "cached", "teacher": "cached", "sft": "cached", "neighbours": "ran", "report": "ran"}


def test_changed_file_reruns_its_stage_and_everything_after(setup):
    run, calls, root, source = setup
    run()
    source.write_text("v2")
    assert set(run().values()) == {"ran"}
    assert "data(v2,2020)" in read(root, "report")


def test_upstream_rerun_with_identical_output_does_not_invalidate_downstream(setup):
    run, calls, root, _ = setup
    config = PipelineConfig()
    config.teacher.users = 2
    run(config)
    config.teacher.users = 4  # a different config, but the teacher writes the same bytes
    actions = run(config)
    assert actions["teacher"] == "ran"
    assert actions["sft"] == "cached" and actions["report"] == "cached"


def test_interrupted_stage_resumes_and_loses_nothing(setup):
    run, calls, root, _ = setup
    calls.fail_once.add("sft")
    with pytest.raises(StageError, match="simulated crash"):
        run()
    manifest = json.loads((root / "manifests" / "sft.json").read_text())
    assert manifest["status"] == "failed" and "simulated crash" in manifest["error"]
    assert not (root / "sft").exists(), "a failed stage must not leave an output that looks finished"
    assert (root / ".work" / "sft" / "partial.txt").read_text() == "half"  # kept for resume
    assert calls.count == {"prepare": 1, "teacher": 1, "sft": 1}

    actions = run()
    assert actions == {"prepare": "cached", "teacher": "cached", "sft": "ran", "neighbours": "ran", "report": "ran"}
    assert calls.resumed["sft"] == [False, True]
    assert read(root, "sft") == "sft(teacher(data(v1,2020),0),30)"
    assert not (root / ".work" / "sft").exists()
    # the cost of the stage counts both attempts: a stage resumed across sessions reports its whole time
    finished = json.loads((root / "manifests" / "sft.json").read_text())
    assert [a["status"] for a in finished["attempts"]] == ["failed", "complete"]
    assert finished["attempts"][0]["seconds"] == pytest.approx(manifest["seconds"], abs=1e-3)
    assert finished["seconds"] == pytest.approx(sum(a["seconds"] for a in finished["attempts"]), abs=1e-3)
    assert finished["peak_memory_mb"] == max(a["peak_memory_mb"] for a in finished["attempts"])
    assert finished["cpu_seconds"] == pytest.approx(sum(a["cpu_seconds"] for a in finished["attempts"]), abs=1e-3)

    from reclm.pipeline.report import cost_table

    (table,) = cost_table({"sft": finished})
    assert table.rows[0][1] == "complete (2 attempts)"


def test_a_new_attempt_with_other_inputs_does_not_inherit_the_old_time(setup):
    run, calls, root, _ = setup
    calls.fail_once.add("sft")
    with pytest.raises(StageError):
        run()
    config = PipelineConfig.model_validate({"llm": {"sft": {"steps": 31}}})
    run(config)
    finished = json.loads((root / "manifests" / "sft.json").read_text())
    assert calls.resumed["sft"] == [False, False]
    assert [a["status"] for a in finished["attempts"]] == ["complete"]


def test_stage_without_completed_manifest_is_rerun(setup):
    run, calls, root, _ = setup
    run()
    # a crash after the output was moved into place but before the manifest was committed
    manifest = root / "manifests" / "neighbours.json"
    record = json.loads(manifest.read_text())
    record["status"] = "running"
    manifest.write_text(json.dumps(record))
    actions = run()
    assert actions["neighbours"] == "ran" and actions["sft"] == "cached"


def test_modified_or_missing_output_is_rebuilt(setup):
    run, calls, root, _ = setup
    run()
    (root / "teacher" / "value.txt").write_text("tampered")
    actions = run()
    assert actions["teacher"] == "ran"
    assert read(root, "teacher") == "teacher(data(v1,2020),0)"
    assert actions["sft"] == "cached"  # the rebuilt output equals the recorded one
    (root / "neighbours" / "extra.txt").write_text("x")
    assert run()["neighbours"] == "ran"


def test_switched_off_stage_is_parked_and_restored_when_switched_back_on(setup):
    run, calls, root, _ = setup
    run()
    config = PipelineConfig.model_validate(
        {"stages": {"sft": False, "collab": False, "reward": False, "rl": "none", "item_side": False}}
    )
    actions = run(config)
    assert actions["sft"] == "off" and actions["report"] == "ran"
    assert json.loads((root / "manifests" / "sft.json").read_text()) == {"stage": "sft", "status": "off"}
    assert not (root / "sft").exists(), "no later stage may read the output of a stage that is off"
    assert (root / ".off" / "sft" / "value.txt").is_file()
    assert read(root, "report") == "report(nb(data(v1,2020),5))"
    actions = run()
    assert actions == {
        "prepare": "cached",
        "teacher": "cached",
        "sft": "cached",
        "neighbours": "cached",
        "report": "ran",
    }
    assert calls.count["sft"] == 1, "the parked output came back instead of a rerun"
    assert read(root, "report") == "report(sft(teacher(data(v1,2020),0),30),nb(data(v1,2020),5))"
    assert json.loads((root / "manifests" / "sft.json").read_text())["status"] == "complete"
    assert not (root / ".off" / "sft").exists()


def test_from_and_only(setup):
    run, calls, root, _ = setup
    run()
    actions = run(from_stage="sft")
    assert actions == {"prepare": "cached", "teacher": "cached", "sft": "ran", "neighbours": "ran", "report": "ran"}
    actions = run(only="teacher")
    assert actions == {"prepare": "skip", "teacher": "ran", "sft": "skip", "neighbours": "skip", "report": "skip"}
    with pytest.raises(StageError, match="unknown stage 'nope'"):
        run(only="nope")


def test_only_runs_a_stage_while_later_stages_are_not_ready(setup):
    run, calls, root, _ = setup
    assert run(only="prepare")["prepare"] == "ran"
    actions = run(only="neighbours")  # teacher never ran: sft's and report's inputs are unknown
    assert actions == {"prepare": "skip", "teacher": "skip", "sft": "skip", "neighbours": "ran", "report": "skip"}
    assert read(root, "neighbours") == "nb(data(v1,2020),5)"


def test_only_needs_complete_inputs(setup):
    run, calls, root, _ = setup
    with pytest.raises(StageError, match="stage 'prepare' is not complete"):
        run(only="teacher")


def test_plan_matches_what_run_does(setup, tmp_path):
    run, calls, root, _ = setup
    pipeline = Pipeline(PipelineConfig(), root, make_stages(Calls(), tmp_path / "source.txt"), Console(quiet=True))
    assert [p.action for p in pipeline.plan()] == ["run"] * 5
    run()
    assert [p.action for p in pipeline.plan()] == ["cached"] * 5
    config = PipelineConfig()
    config.neighbours.k = 3
    pipeline.config = config
    plan = {p.stage.name: (p.action, p.reason) for p in pipeline.plan()}
    assert plan["neighbours"] == ("run", "changed: config")
    assert plan["report"][0] == "run" and plan["sft"][0] == "cached"


def test_units_are_committed_alone_and_reused_from_the_previous_output(tmp_path):
    runs: list[str] = []
    kept: list[bool] = []  # whether a unit found what an interrupted attempt of it had saved
    fail = {"b"}

    def body(ctx: StageContext) -> None:
        for name in ("a", "b", "c"):
            unit = ctx.unit(name, {"name": name, "value": ctx.config.cf.seeds[0] if name == "c" else 0})
            if unit.done:
                continue
            scratch = unit.scratch()
            runs.append(name)
            kept.append((scratch / "saved-state").is_file())
            if name in fail:
                fail.discard(name)
                (scratch / "saved-state").write_text("what b had done")
                raise RuntimeError("crash in unit b")
            (scratch / "out.txt").write_text(name)
            unit.commit()

    stage = Stage("train_cf", "cf", body, config=lambda c: c.cf.seeds)
    pipeline = Pipeline(PipelineConfig(), tmp_path, [stage], Console(quiet=True))
    with pytest.raises(StageError):
        pipeline.run()
    pipeline.run()
    assert runs == ["a", "b", "b", "c"], "after the crash only the unfinished units run"
    assert kept == [False, False, True, False], "the retried unit b finds the state its first attempt saved"
    assert not list((tmp_path / "cf").glob("*.partial")) and not list((tmp_path / "cf").rglob(".unit-partial.json"))
    pipeline.config = PipelineConfig.model_validate({"cf": {"seeds": [7]}})
    pipeline.run()
    assert runs[4:] == ["c"], "units whose key did not change are taken from the previous output"
    assert kept[4:] == [False]
    assert sorted(p.name for p in (tmp_path / "cf").iterdir()) == ["a", "b", "c"]
    assert (tmp_path / "cf" / "a" / "out.txt").read_text() == "a"


def test_a_second_run_on_the_same_directory_is_refused(setup, tmp_path):
    import fcntl

    run, calls, root, _ = setup
    root.mkdir()
    with (root / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        with pytest.raises(StageError, match="another `reclm run`"):
            run()


def test_dry_run_estimates_use_speeds_measured_on_this_machine(tmp_path):
    from reclm.pipeline import estimate
    from reclm.pipeline.speed import SpeedBook

    book = SpeedBook(tmp_path / "speeds.json")
    size = estimate.DataSize(users=100, items=50, interactions=10_000, train=8_000, measured=True)
    config = PipelineConfig()
    default = estimate.prepare(config, size, book)
    assert default.basis == "default"
    assert default.seconds == pytest.approx(10_000 * estimate.PREPARE_PER_INTERACTION)
    book.record("prepare", {"units": 1000, "unit": "interaction", "seconds": 5.0, "host": {"cores": 2}})
    assert estimate.prepare(config, size, book).basis == "default", "short stages are not recorded"
    cores = len(os.sched_getaffinity(0))
    book.record("prepare", {"units": 1000, "unit": "interaction", "seconds": 40.0, "host": {"cores": cores}})
    measured = estimate.prepare(config, size, book)
    assert measured.basis == "measured" and measured.seconds == pytest.approx(400.0)
    sft = estimate.sft(config, size, book)
    assert sft.units == config.llm.sft.steps and sft.tokens > 0


def test_a_paused_or_starved_stage_does_not_teach_the_speed_book(tmp_path):
    """A stage that used under half a core over its wall time (paused, or the machine busy elsewhere) keeps
    the older entry; work that ran elsewhere (an endpoint, Ray workers) is recorded whatever this CPU did."""
    from reclm.pipeline import estimate
    from reclm.pipeline.speed import SpeedBook

    book, cores = SpeedBook(tmp_path / "speeds.json"), len(os.sched_getaffinity(0))
    size = estimate.DataSize(users=100, items=50, interactions=10_000, train=8_000, measured=True)
    fair = {"units": 1000, "unit": "interaction", "seconds": 40.0, "cpu_seconds": 70.0, "host": {"cores": cores}}
    book.record("prepare", fair)
    paused = fair | {"seconds": 4000.0, "cpu_seconds": 70.0}  # the same work, with hours asleep in between
    book.record("prepare", paused)
    assert estimate.prepare(PipelineConfig(), size, book).seconds == pytest.approx(400.0)
    book.record("prepare", paused, local=False)
    assert estimate.prepare(PipelineConfig(), size, book).seconds == pytest.approx(40_000.0)

    local, endpoint = PipelineConfig(), PipelineConfig.model_validate({"generation": {"backend": "openai"}})
    ray = PipelineConfig.model_validate({"executor": "ray"})
    assert estimate.runs_here("profiles", local) and estimate.runs_here("train_cf", local)
    assert not estimate.runs_here("profiles", endpoint) and not estimate.runs_here("profiles", ray)
    assert not estimate.runs_here("train_cf", ray) and estimate.runs_here("train_cf", endpoint)
    assert not estimate.runs_here("teacher", PipelineConfig.model_validate({"stages": {"teacher": "openai"}}))


def test_default_speeds_scale_with_this_cpus_matmul_speed(tmp_path, monkeypatch):
    """The reference machine's speeds times (reference GFLOPS / this CPU's) ** SPEED_EXPONENT; measured
    speeds and an endpoint's are not scaled (conftest pins RECLM_SPEED_FACTOR=1 for the other tests)."""
    from reclm.pipeline import estimate
    from reclm.pipeline.run import speed_note
    from reclm.pipeline.speed import SpeedBook

    assert estimate.speed_factor_for(estimate.REFERENCE_MATMUL_GFLOPS) == pytest.approx(1.0)
    assert estimate.speed_factor_for(59.0) == pytest.approx(2.72, abs=0.01)  # a Zen 1: 2.5-3.3x the Xeon's time
    assert estimate.speed_factor_for(184.0) == pytest.approx(1.2, abs=0.01)  # the Zen 4: about 1.2x
    assert estimate.speed_factor_for(1e9) == estimate.SPEED_FACTOR_BOUNDS[0]
    monkeypatch.delenv("RECLM_SPEED_FACTOR")
    assert estimate.matmul_gflops() > 1.0
    assert estimate.speed_factor() == estimate.speed_factor_for(estimate.matmul_gflops())
    assert "GFLOPS here" in speed_note()

    size = estimate.DataSize(users=100, items=50, interactions=10_000, train=8_000, measured=True)
    config, book = PipelineConfig(), SpeedBook(tmp_path / "speeds.json")
    monkeypatch.setenv("RECLM_SPEED_FACTOR", "2.5")
    scaled = estimate.prepare(config, size, book).seconds
    assert scaled == pytest.approx(2.5 * 10_000 * estimate.PREPARE_PER_INTERACTION)
    cf = estimate.train_cf(config, size)
    monkeypatch.setenv("RECLM_SPEED_FACTOR", "1")
    assert cf.seconds == pytest.approx(2.5 * estimate.train_cf(config, size).seconds)
    endpoint = config.model_copy(update={"stages": config.stages.model_copy(update={"teacher": "openai"})})
    remote = estimate.teacher(endpoint, size).seconds
    monkeypatch.setenv("RECLM_SPEED_FACTOR", "2.5")
    assert estimate.teacher(endpoint, size).seconds == remote, "an endpoint's speed is not this CPU's"
    cores = len(os.sched_getaffinity(0))
    book.record("prepare", {"units": 1000, "unit": "interaction", "seconds": 40.0, "host": {"cores": cores}})
    assert estimate.prepare(config, size, book).seconds == pytest.approx(400.0), "a measured speed stays"
    assert speed_note().startswith("default speeds: the reference machine's x2.50 (RECLM_SPEED_FACTOR)")
    monkeypatch.setenv("RECLM_SPEED_FACTOR", "fast")
    with pytest.raises(ValueError, match="RECLM_SPEED_FACTOR='fast'"):
        estimate.speed_factor()


def two_history_config(tmp_path: Path) -> PipelineConfig:
    rows = ["user,item,timestamp"]
    for u in range(1, 7):  # users 1-3 clicked items 1-4, users 4-6 items 3-6: two distinct histories
        items = (1, 2, 3, 4) if u <= 3 else (3, 4, 5, 6)
        rows += [f"{u},{i},{t}" for t, i in enumerate(items)]
    (tmp_path / "inter.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "items.csv").write_text("item,title\n" + "".join(f"{i},Item number {i}\n" for i in range(1, 7)))
    return PipelineConfig.model_validate(
        {
            "dataset": str(tmp_path / "inter.csv"),
            "item_text": str(tmp_path / "items.csv"),
            "split": {"method": "temporal", "ratios": [0.5, 0.25, 0.25], "zero_shot_fraction": 0},
            "stages": {"ablation": True, "teacher": "offline"},
        }
    )


def test_dry_run_sizes_sft_by_the_pairs_the_teacher_writes(tmp_path):
    """SFT trains on the teacher's pairs, not on every user's prompt: the dry-run runs a free teacher into
    a temporary folder and measures them, and writes nothing into the run directory."""
    from reclm.llm.records import read_records
    from reclm.pipeline import estimate
    from reclm.pipeline.stages.data import make_teacher
    from reclm.rundir import RunDir

    config = two_history_config(tmp_path)
    size = estimate.data_size(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    data, split, _ = estimate.split_of(config, tmp_path / "run")
    make_teacher(config, progress=False).run(data, split, RunDir(tmp_path / "written"), sides=["user"])
    records = read_records(tmp_path / "written" / "teacher" / "users.jsonl")
    counter = estimate.token_counter(config.llm.base_model)
    expected = estimate.mean_tokens([r.prompt + "\n" + r.profile for r in records], counter)
    assert size.teacher_pair_tokens == pytest.approx(expected)
    assert size.teacher_pair_tokens != pytest.approx(size.prompt_tokens + estimate.PROFILE_TOKENS)
    opts = config.llm.sft
    plan = estimate.sft(config, size)
    assert plan.tokens == int(opts.steps * opts.batch_size * (expected + estimate.TEMPLATE_TOKENS))
    openai = config.model_copy(update={"stages": config.stages.model_copy(update={"teacher": "openai"})})
    assert estimate.data_size(openai, tmp_path / "run").teacher_pair_tokens is None  # would cost money


def test_dry_run_counts_distinct_user_prompts_and_measures_their_length(tmp_path):
    """Users with the same history (and no user features) share one prompt, generated once per writer:
    the estimate counts profiles as the profiles stage will generate them."""
    from reclm.pipeline import estimate

    config = two_history_config(tmp_path)
    size = estimate.data_size(config, tmp_path / "run")
    assert size.users == 6 and size.measured is False
    data, split, _ = estimate.split_of(config, tmp_path / "run")
    histories = {tuple(split.train[split.train[:, 0] == u, 1]) for u in range(6)}
    assert size.user_prompts == len(histories) == 2
    assert 10 < size.prompt_tokens < 400  # measured on the prompts, not the max_items formula
    writers = len(config.stages.generators())
    assert writers > 1
    plan = estimate.profiles(config, size)
    assert plan.units == 2 * writers + 6
    assert plan.tokens == int(plan.units * (size.prompt_tokens + estimate.TEMPLATE_TOKENS + 48))


def save_lora(model: Path, folder: Path, seed: int) -> Path:
    """A real (untrained) LoRA adapter of ``model``: what a writer stage leaves in ``<stage>/adapter``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(folder)
    return folder


def test_dry_run_prices_only_the_user_profiles_the_generation_cache_lacks(tmp_path):
    """An interrupted profiles stage resumes from the generation cache (MIND: hours of profiles): the dry
    run counts, per writer whose adapter is in the run directory, the run's prompts cached under that
    adapter's identity and these decoding parameters, and leaves them out of the estimate."""
    from reclm.llm.generation import GenerationCache, cache_identity
    from reclm.llm.model import build_tiny_model
    from reclm.pipeline import estimate
    from reclm.pipeline.stages.generation import decode_params, generation_backend, user_writers

    model = build_tiny_model(tmp_path / "model")
    base = two_history_config(tmp_path)
    config = PipelineConfig.model_validate(
        {**base.model_dump(), "llm": {**base.llm.model_dump(), "base_model": str(model)}}
    )
    root = tmp_path / "run"
    assert user_writers(config) == ["rl", "sft", "collab"]  # the last writer first, then the ablation's
    adapters = {stage: save_lora(model, root / stage / "adapter", seed) for seed, stage in enumerate(("sft", "rl"))}
    size = estimate.data_size(config, root)
    first, second = size.user_prompt_keys
    assert estimate.cached_user_profiles(config, root, size) == 0, "no generation cache yet"

    identity = {s: cache_identity(generation_backend(config), str(model), a) for s, a in adapters.items()}
    params = decode_params(config).key()
    cache = GenerationCache()
    cache.put(identity["rl"], params, [(first, "User identity: a; User interests: b.")])
    cache.put(identity["sft"], params, [(first, "x"), (second, "y")])
    cache.put(identity["rl"], DecodeParams(max_new_tokens=7).key(), [(second, "other decoding")])
    cache.put(identity["rl"], params, [("another run's prompt", "z")])
    cache.close()

    assert estimate.cached_user_profiles(config, root, size) == 3  # collab has no adapter: nothing of it
    assert estimate.cached_user_profiles(config, root, size, rerun={"sft"}) == 1, "a retrained sft is new"
    whole, left = estimate.profiles(config, size), estimate.profiles(config, size, cached=3)
    assert whole.units == 2 * 3 + 6 and left.units == whole.units - 3
    assert left.seconds < whole.seconds


def test_measured_speeds_apply_to_the_same_setup_scaled_by_tokens(tmp_path):
    """A speed measured with CTranslate2 says nothing about transformers; within one setup, longer
    prompts cost proportionally more."""
    import os

    from reclm.pipeline import estimate
    from reclm.pipeline.speed import SpeedBook

    book = SpeedBook(tmp_path / "speeds.json")
    cores = len(os.sched_getaffinity(0))
    ct2 = PipelineConfig.model_validate({"generation": {"backend": "ctranslate2"}})
    hf = PipelineConfig.model_validate({"generation": {"backend": "transformers"}})
    measured = {"units": 100, "unit": "profile", "seconds": 50.0, "tokens_total": 20_000, "host": {"cores": cores}}
    book.record("profiles", measured, estimate.speed_setup("profiles", ct2))
    short = estimate.DataSize(10, 5, 100, 80, True, user_prompts=10, prompt_tokens=132.0)
    longer = estimate.DataSize(10, 5, 100, 80, True, user_prompts=10, prompt_tokens=332.0)
    fast = estimate.profiles(ct2, short, book)
    assert fast.basis == "measured"
    per_profile = 132.0 + estimate.TEMPLATE_TOKENS + 48  # 200 tokens, as measured: 0.5 s each
    assert fast.seconds == pytest.approx(estimate.MODEL_LOAD_SECONDS + 15 * 0.5 * per_profile / 200)
    slow = estimate.profiles(ct2, longer, book)
    assert slow.seconds - estimate.MODEL_LOAD_SECONDS == pytest.approx(2 * (fast.seconds - estimate.MODEL_LOAD_SECONDS))
    assert estimate.profiles(hf, short, book).basis == "default"
    huge = estimate.DataSize(10, 5, 100, 80, True, user_prompts=10, prompt_tokens=932.0)
    assert estimate.profiles(ct2, huge, book).basis == "default", "5x the measured tokens: not comparable"
    legacy = {"profiles": {"unit": "profile", "seconds_per_unit": 9.9, "tokens_per_unit": 1, "cores": cores}}
    (tmp_path / "old.json").write_text(json.dumps(legacy))
    assert estimate.profiles(ct2, short, SpeedBook(tmp_path / "old.json")).basis == "default"


def test_a_measured_dpo_speed_is_not_used_for_ppo(tmp_path):
    """A PPO step (rollouts, reward model, value head) costs several DPO steps: their speeds are kept apart."""
    import os

    from reclm.pipeline import estimate
    from reclm.pipeline.speed import SpeedBook

    book = SpeedBook(tmp_path / "speeds.json")
    dpo = PipelineConfig.model_validate({"stages": {"rl": "dpo"}})
    ppo = PipelineConfig.model_validate({"stages": {"rl": "ppo", "reward": True}})
    size = estimate.DataSize(100, 50, 1000, 800, True, user_prompts=100, prompt_tokens=200.0)
    record = {"units": 10, "unit": "step", "seconds": 300.0, "host": {"cores": len(os.sched_getaffinity(0))}}
    book.record("rl", record, estimate.speed_setup("rl", dpo))
    assert estimate.rl(dpo, size, book).basis == "measured"
    assert estimate.rl(ppo, size, book).basis == "default"


def test_default_speeds_follow_the_device(monkeypatch):
    """Without a measurement, a GPU machine gets the GPU constants (and its own speed-book entries)."""
    from reclm.pipeline import estimate

    config = PipelineConfig.model_validate({"generation": {"backend": "transformers"}})
    size = estimate.DataSize(100, 50, 1000, 800, True, user_prompts=100, prompt_tokens=200.0)
    monkeypatch.setattr(estimate, "current_device", lambda: "cpu")
    cpu_sft, cpu_profiles = estimate.sft(config, size), estimate.profiles(config, size)
    cpu_setup = estimate.speed_setup("profiles", config)
    monkeypatch.setattr(estimate, "current_device", lambda: "cuda")
    gpu_sft, gpu_profiles = estimate.sft(config, size), estimate.profiles(config, size)
    load = estimate.MODEL_LOAD_SECONDS
    ratio = estimate.LORA_SECONDS_PER_TOKEN / estimate.CUDA_LORA_SECONDS_PER_TOKEN
    assert (cpu_sft.seconds - load) / (gpu_sft.seconds - load) == pytest.approx(ratio)
    assert gpu_profiles.seconds < cpu_profiles.seconds / 5
    assert estimate.speed_setup("profiles", config) != cpu_setup


def test_stages_that_read_a_datasets_side_files_hash_them(tmp_path):
    """Shipped teacher profiles and neighbour lists are not in the dataset fingerprint: the stages
    that read them have them among their input files, so editing one reruns those stages."""
    from reclm.pipeline.table import STAGES

    (tmp_path / "interactions.csv").write_text("user,item\n1,1\n")
    (tmp_path / "teacher_user_profiles.jsonl").write_text("{}\n")
    (tmp_path / "item_neighbours.jsonl").write_text("{}\n")
    config = PipelineConfig.model_validate({"dataset": str(tmp_path), "stages": {"teacher": "file", "reward": True}})
    by_name = {s.name: s for s in STAGES}
    shipped = {tmp_path / "teacher_user_profiles.jsonl", tmp_path / "item_neighbours.jsonl"}
    for name in ("teacher", "neighbours", "reward", "rl"):
        assert shipped <= set(by_name[name].files(config)), name
    pipeline = Pipeline(config, tmp_path / "run", STAGES, Console(quiet=True))
    before = pipeline.stage_inputs(by_name["teacher"], {"prepare": "x"})
    (tmp_path / "teacher_user_profiles.jsonl").write_text('{"user": 1}\n')
    assert pipeline.stage_inputs(by_name["teacher"], {"prepare": "x"}) != before


SLOW_STAGE_SCRIPT = """
import sys, time
from pathlib import Path
from rich.console import Console
from reclm.llm.generation import DecodeParams
from reclm.pipeline.engine import Pipeline, Stage
from reclm.pipeline.config import PipelineConfig
from reclm.pipeline.run import terminate_as_interrupt

def slow(ctx):
    (ctx.out / "partial.txt").write_text("half")
    time.sleep(60)

pipeline = Pipeline(PipelineConfig(), Path(sys.argv[1]), [Stage("sft", "sft", slow)], Console(quiet=True))
with terminate_as_interrupt():
    try:
        pipeline.run()
    except KeyboardInterrupt as exc:
        print("interrupted by", exc)
        sys.exit(130)
"""


def test_sigterm_marks_the_running_stage_interrupted_and_keeps_its_work(tmp_path):
    """A scheduler's time limit (SIGTERM) stops a run as Ctrl-C does: the manifest says interrupted and
    the work folder stays for the resume."""
    import signal
    import subprocess
    import sys
    import time

    root = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", SLOW_STAGE_SCRIPT, str(root)], stdout=subprocess.PIPE, text=True)
    partial = root / ".work" / "sft" / "partial.txt"
    deadline = time.monotonic() + 30
    while not partial.is_file() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.05)
    assert partial.is_file(), "the stage never started"
    started = time.monotonic()
    child.send_signal(signal.SIGTERM)
    output, _ = child.communicate(timeout=30)
    assert child.returncode == 130 and "interrupted by signal SIGTERM" in output
    assert time.monotonic() - started < 10, "stopped at once, not after the stage's 60 s"
    record = json.loads((root / "manifests" / "sft.json").read_text())
    assert record["status"] == "interrupted" and "SIGTERM" in record["error"]
    assert partial.read_text() == "half"


def test_collab_estimate_counts_writing_the_dialogue_users_profiles():
    """Collab's default turn-1 responses are the SFT model's profiles of the dialogue users, written in the
    stage: they cost generation time on top of training (MIND: 27 min of the stage on 2 cores)."""
    from reclm.pipeline import estimate

    size = estimate.DataSize(10_000, 500, 50_000, 40_000, True, user_prompts=4_000, prompt_tokens=200.0)
    distilled = PipelineConfig.model_validate({"llm": {"collab": {"steps": 90, "batch_size": 4, "neighbours": 3}}})
    teacher = PipelineConfig.model_validate(
        {"llm": {"collab": {"steps": 90, "batch_size": 4, "neighbours": 3, "profiles": "teacher"}}}
    )
    users = estimate.collab_profile_users(distilled, size)
    assert users == 400 * 4  # ceil(90 x 4 / 0.9) targets, each with 3 neighbours
    writing = estimate.generation(distilled, size, users, None, overhead=estimate.MODEL_LOAD_SECONDS)
    with_writing, training_only = estimate.collab(distilled, size), estimate.collab(teacher, size)
    assert with_writing.seconds == pytest.approx(training_only.seconds + writing.seconds)
    assert with_writing.tokens == training_only.tokens + writing.tokens
    assert estimate.collab_profile_users(distilled, estimate.DataSize(100, 50, 900, 800, True)) == 100


def test_cf_estimate_grows_with_users_and_items_and_carries_a_measured_speed_across_datasets(tmp_path):
    """An epoch-pair costs more with more users + items (MIND's 60,955 against ml-100k's 2,625: 3.0x for
    BiasMF, 11.5x for SimGCL, measured): same train pairs, other sizes, other estimates. A speed measured
    on one dataset is kept per scaled unit and carries to another."""
    import os

    from reclm.pipeline import estimate, work
    from reclm.pipeline.speed import SpeedBook

    config = PipelineConfig.model_validate({"cf": {"backbones": ["bias-mf", "simgcl"], "features": ["text"]}})
    small = estimate.DataSize(943, 1_682, 100_000, 80_000, True)
    large = estimate.DataSize(57_128, 3_827, 100_000, 80_000, True)
    assert work.cf_size_factor("lightgcn", work.CF_REFERENCE_NODES) == 1.0
    assert work.cf_size_factor("bias-mf", 60_955) == pytest.approx(3.0, rel=0.1)
    assert work.cf_size_factor("simgcl", 60_955) == pytest.approx(11.5, rel=0.1)
    on_small, on_large = estimate.train_cf(config, small), estimate.train_cf(config, large)
    epoch_pairs = estimate.cf_epoch_pairs(config, small, "bias-mf")  # the config's epochs x train pairs
    assert on_small.units == on_large.units == 2 * epoch_pairs
    assert on_small.seconds == pytest.approx(
        epoch_pairs * (estimate.CF_SECONDS_PER_EPOCH_PAIR["bias-mf"] + estimate.CF_SECONDS_PER_EPOCH_PAIR["simgcl"])
    )
    assert on_large.seconds > 5 * on_small.seconds

    book = SpeedBook(tmp_path / "speeds.json")  # a finished run on the small data took 10 minutes
    done = sum(epoch_pairs * work.cf_size_factor(b, 2_625) for b in ("bias-mf", "simgcl"))
    record = {"units": done, "unit": work.CF_WORK_UNIT, "seconds": 600.0}
    book.record("train_cf", {**record, "host": {"cores": len(os.sched_getaffinity(0))}}, "cpu")
    measured_small, measured_large = estimate.train_cf(config, small, book), estimate.train_cf(config, large, book)
    assert measured_small.basis == measured_large.basis == "measured"
    assert measured_small.seconds == pytest.approx(600.0)
    growth = sum(work.cf_size_factor(b, 60_955) for b in ("bias-mf", "simgcl")) / (done / epoch_pairs)
    assert measured_large.seconds / measured_small.seconds == pytest.approx(growth)
    assert 5 < growth < 10  # between BiasMF's 3.0x and SimGCL's 11.5x


def test_dry_run_estimates_what_is_left_of_an_interrupted_training_stage(tmp_path):
    import torch

    from reclm.pipeline import estimate

    size = estimate.DataSize(1_000, 200, 9_000, 8_000, True, user_prompts=900, prompt_tokens=150.0)
    config = PipelineConfig.model_validate({"llm": {"sft": {"steps": 30}, "collab": {"steps": 40}}})
    checkpoint = tmp_path / ".work" / "sft" / "checkpoint"
    checkpoint.mkdir(parents=True)
    torch.save({"state": {"step": 10}}, checkpoint / "trainer_state.pt")
    assert estimate.saved_step(tmp_path, "sft", "abc") is None, "no key: the folder is not this attempt's"
    (tmp_path / ".work" / "sft.key").write_text("other inputs")
    assert estimate.saved_step(tmp_path, "sft", "abc") is None
    (tmp_path / ".work" / "sft.key").write_text("abc")
    assert estimate.saved_step(tmp_path, "sft", "abc") == 10

    whole, left = estimate.sft(config, size), estimate.remaining("sft", config, size, None, 10)
    assert left.units == 20 and left.seconds == pytest.approx(whole.seconds * 20 / 30)
    # collab writes its profiles before its first checkpoint: what is left is training only
    collab_left = estimate.remaining("collab", config, size, None, 0)
    assert collab_left.seconds < estimate.collab(config, size).seconds
    training = estimate.training("collab", config, size, config.llm.collab, None, turns=4)
    assert collab_left.seconds == pytest.approx(training.seconds)


def vm_rss_mb() -> float:
    from reclm.pipeline.memory import process_status_mb

    return process_status_mb("VmRSS") or 0.0


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc")
def test_a_stage_peak_does_not_count_memory_that_earlier_work_freed():
    """glibc keeps freed heap for reuse: after PPO the next stage of the same process started at 16 GB it no
    longer used. PeakMemory hands the free heap back first, so a block that allocates nothing reports
    about the memory in use."""
    from reclm.pipeline.memory import PeakMemory

    before = vm_rss_mb()
    blocks = [bytes(4000) + bytes([k % 256]) for k in range(250_000)]  # ~1 GB of heap chunks
    keep = bytes(5000)  # allocated after them: the heap cannot shrink from its top
    del blocks
    assert vm_rss_mb() > before + 500  # freed, yet still resident
    with PeakMemory() as peak:
        pass
    assert peak.rss_mb < before + 200
    del keep


def test_a_run_refused_by_the_lock_leaves_the_saved_config_alone(tmp_path):
    import fcntl

    from reclm.pipeline.run import run as run_pipeline

    root = tmp_path / "run"
    root.mkdir()
    (root / "config.yaml").write_text("the config of the run that holds the lock\n")
    with (root / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        with pytest.raises(StageError, match="another `reclm run`"):
            run_pipeline(PipelineConfig(), root, Console(quiet=True))
    assert (root / "config.yaml").read_text() == "the config of the run that holds the lock\n"


def test_a_unit_committed_but_killed_before_its_rename_is_finished_not_redone(tmp_path):
    """A kill -9 between marking a unit complete and moving it into place: the next run takes it as done."""
    runs: list[str] = []

    def body(ctx: StageContext) -> None:
        unit = ctx.unit("a", {"name": "a"})
        if unit.done:
            return
        runs.append("a")
        scratch = unit.scratch()
        (scratch / "out.txt").write_text("finished")
        from reclm.pipeline.engine import UNIT_MARKER, write_marker

        write_marker(scratch / UNIT_MARKER, unit.key)  # commit's first step, then the "kill"
        raise RuntimeError("killed before the rename")

    pipeline = Pipeline(PipelineConfig(), tmp_path, [Stage("train_cf", "cf", body)], Console(quiet=True))
    with pytest.raises(StageError):
        pipeline.run()
    pipeline.run()
    assert runs == ["a"], "the finished unit was not trained again"
    assert (tmp_path / "cf" / "a" / "out.txt").read_text() == "finished"


def test_a_resumed_stage_keeps_its_earlier_attempts_while_it_runs_and_after_a_kill(setup):
    """The running manifest carries the earlier attempts, so a kill -9 (which leaves "running" behind)
    does not lose them: the next resume still counts the first attempt."""
    run, calls, root, _ = setup
    calls.fail_once.add("sft")
    with pytest.raises(StageError):
        run()
    failed = json.loads((root / "manifests" / "sft.json").read_text())
    calls.fail_once.add("sft")  # the second attempt "dies": we keep what its running manifest said
    with pytest.raises(StageError):
        run()
    second = json.loads((root / "manifests" / "sft.json").read_text())
    assert [a["status"] for a in second["attempts"]] == ["failed", "failed"]
    killed = {**second, "status": "running", "attempts": second["attempts"][:1]}  # as a kill -9 leaves it
    killed.pop("seconds", None)
    (root / "manifests" / "sft.json").write_text(json.dumps(killed))
    run()
    finished = json.loads((root / "manifests" / "sft.json").read_text())
    assert [a["status"] for a in finished["attempts"]] == ["failed", "complete"]
    assert finished["attempts"][0]["seconds"] == pytest.approx(failed["seconds"], abs=1e-3)
