"""Pipeline stages: a stage is one of train, build or merge (refused when it says two); every stage runs on the run's
device with one seed for its rows and its weights; building data never loads a model; a build stage's arguments
are checked before anything runs."""

from __future__ import annotations

import pytest

from ctxstretch.config import ConfigError
from ctxstretch.recipes.config import PipelineConfig, StageConfig, load_pipeline
from ctxstretch.recipes.stages import STAGES, BuildStage, MergeStage, RunContext, TrainStage, stage_of
from ctxstretch.rundir import RunDir
from ctxstretch.tiny import MODEL_DIR


def test_each_kind_of_stage_is_its_own_class_and_yaml_keeps_its_shape():
    cfg = load_pipeline({"stages": [{"name": "t"}, {"name": "b", "build": {"kind": "synl"}},
                                    {"name": "m", "merge": {"weight": 0.3}}]}, "x.yaml")
    assert [type(stage_of(s)) for s in cfg.stages] == [TrainStage, BuildStage, MergeStage]
    assert set(STAGES) == {"train", "build", "merge"}
    assert not BuildStage.changes_model and TrainStage.changes_model and MergeStage.changes_model
    again = load_pipeline(cfg.model_dump(mode="json"), "config.yaml")  # what config.yaml records loads back
    assert again == cfg


def test_a_stage_that_builds_and_merges_is_refused_in_one_line():
    with pytest.raises(ConfigError) as e:
        load_pipeline({"stages": [{"name": "ok"}, {"name": "both", "build": {"kind": "synl"},
                                                    "merge": {"weight": 0.5}}]}, "r.yaml")
    msg = str(e.value)
    assert "\n" not in msg and "r.yaml" in msg and "stages.1" in msg and "'both'" in msg
    assert "'build' and 'merge'" in msg


def test_a_stage_runs_on_the_runs_device():
    cfg = PipelineConfig(device="cpu", stages=[{"name": "a", "train": {"device": "auto"}}])
    assert cfg.resolved(256).stages[0].train.device == "auto"  # auto is this CPU here: the same device
    with pytest.raises(ConfigError, match=r"stages\[0\] \(a\): train.device 'cuda' is not the run's device 'cpu'"):
        PipelineConfig(device="cpu", stages=[{"name": "a", "train": {"device": "cuda"}}]).resolved(256)


class _Recorder:
    def __init__(self):
        self.calls = {}

    def __call__(self, name, result=None):
        def record(*args, **kwargs):
            self.calls[name] = (args, kwargs)
            return result(*args, **kwargs) if callable(result) else result
        return record


def _context(tmp_path, cfg: PipelineConfig, tokenizer) -> RunContext:
    from rich.console import Console

    return RunContext(cfg, RunDir(tmp_path / "run"), MODEL_DIR, "the rope config", tokenizer, "cpu", False,
                      Console(quiet=True))


def test_a_train_stage_draws_rows_with_the_seed_its_weights_use(tmp_path, tokenizer, monkeypatch):
    """Rows and torch share the stage's seed (the run's unless the stage sets its own), and the model the stage
    trains is loaded on the run's device with the new rope configuration."""
    from ctxstretch.recipes import stages

    rec = _Recorder()
    monkeypatch.setattr(stages, "load", rec("load", lambda *a, **k: ("model", None)))
    monkeypatch.setattr(stages, "stage_rows", rec("rows", "rows"))
    monkeypatch.setattr(stages, "train_stage", rec("train", lambda model, *a, **k: model))
    monkeypatch.setattr(stages, "save", rec("save"))
    cfg = PipelineConfig(device="cpu", seed=7, stages=[
        {"name": "own", "train": {"seed": 3, "steps": 1}}, {"name": "inherits", "train": {"steps": 1}}]).resolved(256)
    ctx = _context(tmp_path, cfg, tokenizer)
    for stage, seed in zip(cfg.stages, (3, 7), strict=True):
        sd = ctx.run.stage(stage.name)
        sd.root.mkdir(parents=True)
        stage_of(stage).run(ctx, sd)
        (_, _, rows_seed), _ = rec.calls["rows"]
        (_, _, train_cfg, _), _ = rec.calls["train"]
        assert rows_seed == train_cfg.seed == seed
        assert ctx.current == sd.model and sd.summary()["stage"] == stage.name
    (path, device), kwargs = rec.calls["load"]
    assert (path, device, kwargs["config"]) == (MODEL_DIR, "cpu", "the rope config")  # loaded once, the original


def test_a_build_stage_never_loads_a_model_and_leaves_the_current_one(tmp_path, tokenizer, monkeypatch):
    from ctxstretch.recipes import stages

    def no_loading(*a, **k):
        raise AssertionError("a build stage loaded a model")

    monkeypatch.setattr(stages, "load", no_loading)
    cfg = PipelineConfig(seed=5, stages=[{"name": "tables", "train_length": 200,
                                          "build": {"kind": "synl", "args": {"count": 1}}}]).resolved(256)
    ctx = _context(tmp_path, cfg, tokenizer)
    sd = ctx.run.stage("tables")
    sd.root.mkdir(parents=True)
    BuildStage(cfg.stages[0]).run(ctx, sd)
    assert ctx.current == MODEL_DIR and not sd.model.exists()
    assert sd.summary()["what"] == "built synl data (1 rows)"
    import json

    meta = json.loads((sd.data / "ctxstretch.json").read_text())
    assert (meta["builder"], meta["lengths"], meta["seed"]) == ("synl", [200], 5)  # the stage's length and seed


@pytest.mark.parametrize("build,message", [
    ({"kind": "synl", "args": {"cuont": 2}}, "did you mean 'count'"),
    ({"kind": "synl", "args": {"count": 0}}, "count ≥ 1"),
    ({"kind": "pack", "args": {"length": 1}}, "length 1 must be at least 2"),
    ({"kind": "nope"}, "build kind 'nope' is unknown; choose one of cip, impactful, pack, probes"),
])
def test_a_build_stages_arguments_are_checked_before_anything_runs(build, message):
    cfg = PipelineConfig(stages=[{"name": "data", "build": build}])
    with pytest.raises(ConfigError) as e:
        cfg.resolved(256)
    assert str(e.value).startswith("stages[0] (data): ") and message in str(e.value) and "--" not in str(e.value)


def test_a_dataset_reference_must_name_an_earlier_build_stage():
    cfg = PipelineConfig(stages=[{"name": "a"}, {"name": "b", "data": {"mix": {"dataset": 1.0}, "dataset": "@a"}}])
    with pytest.raises(ConfigError, match="names no earlier build stage"):
        cfg.resolved(256)


def test_the_context_loads_a_later_model_without_the_rope_override(tmp_path, tokenizer, monkeypatch):
    from ctxstretch.recipes import stages

    seen = []

    def load(path, device, config=None, **kwargs):
        seen.append((path, config))
        return "model", None

    monkeypatch.setattr(stages, "load", load)
    ctx = _context(tmp_path, PipelineConfig().resolved(256), tokenizer)
    ctx.use(tmp_path / "stage-model")
    ctx.model()
    ctx.model()  # loaded once
    assert seen == [(tmp_path / "stage-model", None)]


def test_stage_config_kinds():
    assert StageConfig(name="a").kind == "train"
    assert StageConfig(name="a", build={"kind": "pack"}).kind == "build"
    assert StageConfig(name="a", merge={}).kind == "merge"


def test_a_runs_training_stages_share_one_accelerator(tmp_path, tokenizer, monkeypatch):
    """Two training stages, one Accelerator (made for the first, reused with the second's gradient accumulation)."""
    from ctxstretch.train import loop
    from tests.conftest import micro_llama

    made = []

    class Counting(loop.Accelerator):
        def __init__(self, *args, **kwargs):
            made.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(loop, "Accelerator", Counting)
    train = {"steps": 2, "batch_size": 1, "lr": 1e-4, "warmup_steps": 0, "checkpoint_every": 2, "precision": "fp32"}
    cfg = PipelineConfig(device="cpu", target=512, stages=[
        {"name": "a", "train_length": 64, "train": train},
        {"name": "b", "train_length": 64, "train": {**train, "grad_accum": 2}}]).resolved(256)
    ctx = _context(tmp_path, cfg, tokenizer)
    ctx.use(MODEL_DIR, micro_llama(tokenizer))
    for stage in cfg.stages:
        sd = ctx.run.stage(stage.name)
        stage_of(stage).run(ctx, sd)
        assert sd.summary()["stage"] == stage.name and (sd.model / "config.json").exists()
    assert len(made) == 1 and made[0].gradient_accumulation_steps == 2


def test_training_stages_with_different_precisions_are_refused_before_anything_runs():
    with pytest.raises(ConfigError, match=r"train.precision differs between training stages \(a: bf16, b: fp32\)"):
        PipelineConfig(device="cpu", stages=[{"name": "a", "train": {"precision": "bf16"}},
                                             {"name": "b", "train": {"precision": "fp32"}}]).resolved(256)
