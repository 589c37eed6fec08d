"""Recipes as pipelines: presets expand, bad recipe files are refused up front, stages resume, merge, compare."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from ctxstretch.cli import app
from ctxstretch.config import ConfigError
from ctxstretch.recipes import RECIPES, pipeline_from, read_spec
from ctxstretch.recipes.pipeline import PipelineConfig, Run
from ctxstretch.train.merge import linear_merge
from tests.conftest import micro_llama

runner = CliRunner()
TINY_EVAL = {"lengths": [128, 512], "depths": [0.5], "trials": 1, "loss_rows": 1}


@pytest.fixture
def micro128(tmp_path, tokenizer):
    """A random micro Llama with a 128-token window (long enough for the probes)."""
    path = tmp_path / "micro128"
    model = micro_llama(tokenizer, window=128)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_has_a_preset_that_expands(name):
    data, where = read_spec(name)
    pipe = pipeline_from(data, where, lambda model: 256).resolved(256)
    assert pipe.target == 4096 and pipe.name == name
    trained = [s for s in pipe.stages if s.kind == "train"]
    assert bool(trained) == (not name.endswith("-free"))
    for s in trained:  # every row fits the stage's window and every stage reaches at most the target
        assert 0 < s.train_length <= s.target <= pipe.target
    if name in ("longrecipe", "pose", "randpos"):
        assert trained[0].train_length == int(0.3 * 4096) and trained[0].positions != "full"
    if name == "longrecipe":
        assert [s.kind for s in pipe.stages] == ["train", "train", "merge"]
        assert pipe.stages[1].train.min_lr_ratio == 0.0  # replay decays to zero


def test_the_extend_recipe_trains_as_the_extend_command_does():
    """`recipe: extend` (what `compare --recipes extend` runs) and `ctxstretch extend` train the same stage."""
    from ctxstretch.recipes.extend import ExtendConfig, pipeline, resolve_extend

    data, where = read_spec("extend")
    as_recipe = pipeline_from(data, where, lambda model: 256).resolved(256)
    cfg, _ = resolve_extend(ExtendConfig())
    as_command = pipeline(cfg).resolved(256)
    assert as_recipe.rope == as_command.rope and as_recipe.target == as_command.target == 4096
    (a,), (b,) = as_recipe.stages, as_command.stages
    assert a.model_dump() == b.model_dump() and a.train_length == 2048 and a.data.mix == {
        "text": 0.4, "text_copy": 0.3, "random_copy": 0.3}


def test_the_extend_run_seed_reaches_its_training_rows():
    """`seed:` of an extend config seeds the training rows unless `train.seed` is set."""
    from ctxstretch.recipes.extend import ExtendConfig, ExtendTrainConfig, pipeline, resolve_extend

    def stage_seed(**kw) -> int:
        cfg, _ = resolve_extend(ExtendConfig(**kw))
        (stage,) = pipeline(cfg).resolved(256).stages
        return stage.train.seed

    assert stage_seed() == 0 and stage_seed(seed=1) == 1
    assert stage_seed(seed=1, train=ExtendTrainConfig(seed=3)) == 3
    # written down as resolved, so a run directory saved with `train.seed: 0` resumes
    assert resolve_extend(ExtendConfig())[0].train.seed == 0


def test_llama2_long_curriculum_shares_one_budget():
    data = {"recipe": "llama2-long", "steps": 90, "curriculum": [0.25, 0.5]}
    pipe = pipeline_from(data, "x", lambda model: 256).resolved(256)
    cpt = [s for s in pipe.stages if s.name.startswith("cpt")]
    assert [s.target for s in cpt] == [1024, 2048, 4096]
    assert sum(s.train.steps for s in cpt) == 90


def _stages(data: dict, window: int = 256) -> dict[str, int]:
    """stage name → optimizer steps (None for a stage that does not train) of a recipe's resolved pipeline."""
    pipe = pipeline_from(data, "x", lambda model: window).resolved(window)
    return {s.name: s.train.steps if s.kind == "train" else None for s in pipe.stages}


@pytest.mark.parametrize("data,dropped", [
    ({"recipe": "longskywork", "sft_fraction": 0}, {"sft"}),
    ({"recipe": "longskywork", "long_sft_fraction": 0}, {"long-sft"}),
    ({"recipe": "longskywork", "sft_fraction": 0, "long_sft_fraction": 0}, {"sft", "long-sft"}),
    ({"recipe": "longrecipe", "replay_fraction": 0}, {"replay"}),
    ({"recipe": "llama2-long", "sft_fraction": 0}, {"qa-data", "sft"}),
])
def test_a_zero_fraction_drops_its_stage(data, dropped):
    full = _stages({**data, **{k: 0.2 for k in data if k.endswith("fraction")}, "steps": 50})
    got = _stages({**data, "steps": 50})
    assert set(full) - set(got) == dropped and all(v is None or v > 0 for v in got.values()), got


@pytest.mark.parametrize("recipe", ["longskywork", "longrecipe", "llama2-long"])
def test_no_budget_means_no_side_stage(recipe):
    """steps 0 (training-free): no SFT, replay or self-instruct stage runs a step or builds data for nothing."""
    got = _stages({"recipe": recipe, "steps": 0})
    assert all(v == 0 for v in got.values() if v is not None)
    assert not {"sft", "long-sft", "replay", "qa-data"} & set(got)


def test_a_small_fraction_of_a_positive_budget_is_one_step_and_zero_is_zero():
    from ctxstretch.recipes.base import share, split

    assert share(10, 0.01) == 1 and share(10, 0.0) == 0 and share(0, 0.5) == 0 and share(10, 0.26) == 3
    for steps in range(0, 7):
        for parts in range(1, 5):
            assert sum(split(steps, parts)) == steps and min(split(steps, parts)) >= 0


@pytest.mark.parametrize("steps", [0, 1, 2, 5])
def test_a_curriculum_never_gets_a_negative_step_count(steps):
    got = _stages({"recipe": "llama2-long", "steps": steps, "curriculum": [0.1, 0.25, 0.5, 0.75], "sft_fraction": 0})
    assert "cpt" in got and all(v >= 0 for v in got.values()) and sum(got.values()) == steps
    assert all(v > 0 for k, v in got.items() if k != "cpt")  # an earlier stage left without steps is dropped


def test_curriculum_shares_below_the_window_train_once_at_the_window():
    got = _stages({"recipe": "llama2-long", "steps": 9, "curriculum": [0.01, 0.02, 0.5], "sft_fraction": 0})
    assert list(got) == ["cpt-256", "cpt-2048", "cpt"] and sum(got.values()) == 9
    with pytest.raises(ConfigError, match="curriculum"):
        _stages({"recipe": "llama2-long", "curriculum": [0.5, 1.0]})


def test_an_explicit_zero_is_kept_not_replaced_by_the_default():
    from ctxstretch.recipes.llama2_long import Llama2LongParams

    p, _ = Llama2LongParams(recipe="llama2-long", steps=40, lr=1e-3).resolved(256)
    assert p.train(0).steps == 0 and p.train(None).steps == 40
    assert p.train(lr=5e-4).lr == 5e-4 and p.train().lr == 1e-3


@pytest.mark.parametrize("data,message", [
    ({"recipe": "longrecpe"}, "did you mean 'longrecipe'"),
    ({"recipe": "longrecipe", "stpes": 3}, "did you mean 'steps'"),
    ({"recipe": "longrecipe", "lr": 0}, "field 'lr'"),
    ({"stages": [{"name": "a", "train_length": 9000}]}, "train_length 9000 exceeds"),
    ({"stages": [{"name": "a", "data": {"mix": {"dataset": 1}, "dataset": "@nope"}}]}, "names no earlier build stage"),
    ({"stages": [{"name": "a", "data": {"mix": {"txt": 1}}}]}, "unknown: txt"),
    ({"stages": [{"name": "a"}, {"name": "a"}]}, "two stages are named 'a'"),
    ({"target": 100, "stages": [{"name": "a"}]}, "must be larger than the model's window"),
    ({"model": "embedded"}, "give either 'recipe: NAME'"),
    ({"stages": [{"name": "a", "build": {"kind": "synl"}, "merge": {}}]}, "sets both 'build' and 'merge'"),
    ({"stages": [{"name": "a", "build": {"kind": "synl", "args": {"count": 0}}}]},
     "stages[0] (a): build.args: give lengths"),
])
def test_bad_recipe_files_are_refused_before_anything_runs(tmp_path, data, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(path), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_unknown_preset_name_suggests_the_nearest():
    with pytest.raises(ConfigError, match="did you mean 'longskywork'"):
        read_spec("longskywrk")


def test_linear_merge_interpolates_every_parameter(tokenizer):
    a, b = micro_llama(tokenizer), micro_llama(tokenizer)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    linear_merge(a, b, 0.25)
    for name, p in a.named_parameters():
        assert torch.allclose(p, before[name] + 0.25, atol=1e-6), name
    with pytest.raises(ConfigError, match="must lie in"):
        linear_merge(a, b, 1.5)


@pytest.mark.slow
def test_pipeline_stages_resume_and_output_loads_plainly(tmp_path, micro128, monkeypatch):
    """A run killed in its second stage resumes without redoing the first; every stage leaves a loadable model."""
    from transformers import AutoModelForCausalLM

    from ctxstretch.recipes import stages as stages_mod

    cfg = PipelineConfig.model_validate({
        "model": str(micro128), "target": 512, "rope": {"method": "yarn"}, "eval": TINY_EVAL,
        "stages": [{"name": "long", "positions": "longrecipe", "length_fraction": 0.3,
                    "train": {"steps": 3, "batch_size": 2, "lr": 1e-3, "warmup_steps": 0}},
                   {"name": "merge", "merge": {"weight": 0.5}}]})
    out = tmp_path / "run"

    def crash(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(stages_mod, "linear_merge", crash)
    with pytest.raises(RuntimeError, match="killed"):
        Run(cfg, out).execute()
    first = out / "stages" / "long" / "model" / "model.safetensors"
    stamp = first.stat().st_mtime_ns
    assert not (out / "stages" / "merge" / "done.json").exists()
    monkeypatch.undo()
    Run(cfg, out, resume=True).execute()
    assert first.stat().st_mtime_ns == stamp, "a finished stage is not redone"
    for d in (out / "stages" / "long" / "model", out / "stages" / "merge" / "model", out / "model"):
        model = AutoModelForCausalLM.from_pretrained(d)
        assert model.config.rope_parameters["rope_type"] == "yarn"
        assert model.config.max_position_embeddings == 512
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("stage") == "long" and "step" in r] == [3]
    assert {r.get("eval") for r in records} >= {"base", "extended"}


@pytest.mark.slow
def test_compare_writes_the_table_and_the_claims(tmp_path, micro128):
    from ctxstretch.compare import run_compare

    out = tmp_path / "cmp"
    path = run_compare(["longrecipe", "full", "pi", "yarn-free", "extend"], out, model=str(micro128), target=512,
                       steps=2, batch_size=2, overrides={"eval": TINY_EVAL, "warmup_steps": 0})
    text = path.read_text()
    for row in ("| base |", "| longrecipe |", "| longrecipe (after extend) |", "| full |", "| pi |",
                "| yarn-free |", "| extend |", "## Claims", "ABF beats PI"):
        assert row in text, row
    assert (out / "report.html").exists() and (out / "needle.png").exists()
    assert len(list(out.glob("*/model/model.safetensors"))) == 5
    # the full-length rows cost more tokens than the 0.3·L rows under the same step budget
    cells = [[x.strip() for x in r.split("|")[1:-1]] for r in text.split("## Claims")[0].splitlines()
             if r.startswith("| ")]
    head, body = cells[0], cells[1:]
    col = {name: i for i, name in enumerate(head)}
    tokens = {c[col["recipe"]]: c[col["tokens trained"]] for c in body}
    # ranked by held-out retrieval at the target (in-format passkey/needle never rank)
    held = [float(c[col["held-out @ 512"]].split(" ")[0]) for c in body if c[col["rank"]]]
    assert held == sorted(held, reverse=True) and [c[col["rank"]] for c in body if c[col["rank"]]] == ["1", "2", "3",
                                                                                                        "4", "5"]
    assert tokens["full"] == "2,048"  # 2 steps × 2 rows × 512
    assert 0 < int(tokens["longrecipe"].replace(",", "")) < 2048


def test_a_stage_trains_on_a_ctxstretch_data_directory(tmp_path, micro128):
    """Rows of a `ctxstretch data` folder (SynL here) feed a stage, padded to its rows in their own segment."""
    from transformers import AutoTokenizer

    from ctxstretch.data.builders import build_synl
    from ctxstretch.data.mix import DatasetRows
    from ctxstretch.data.records import DataError
    from ctxstretch.recipes.config import StageConfig
    from ctxstretch.recipes.rows import stage_rows
    from ctxstretch.tiny import MODEL_DIR

    data = tmp_path / "synl"
    build_synl(data, model=str(micro128), lengths=[200], count=3)
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    stage = StageConfig.model_validate({"name": "sft", "train_length": 256, "target": 512,
                                        "data": {"mix": {"dataset": 1.0}, "dataset": str(data)},
                                        "train": {"batch_size": 2}})
    batch = stage_rows(stage, tok, 0, dataset_dir=data)(0)
    assert batch["input_ids"].shape == (2, 256)
    labelled = batch["labels"] != -100
    assert labelled.any() and (batch["segment_ids"][labelled] == 0).all(), "loss only on the example's answer"
    with pytest.raises(DataError, match="longer than 128"):
        DatasetRows(str(data), 128, 0, tok)


def test_a_training_free_recipe_writes_the_new_rope(tmp_path, micro128):
    """No stages: the output is the base weights under the new rope configuration, and it computes differently."""
    from transformers import AutoModelForCausalLM

    cfg = pipeline_from({"recipe": "yarn-free", "model": str(micro128), "target": 512, "eval": TINY_EVAL}, "x",
                        lambda model: 128)
    Run(cfg, tmp_path / "run").execute()
    new = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert new.config.rope_parameters["rope_type"] == "yarn" and new.config.max_position_embeddings == 512
    x = torch.arange(300)[None] % 1000
    with torch.no_grad():
        base_logits = AutoModelForCausalLM.from_pretrained(micro128)(x).logits
        assert not torch.allclose(new(x).logits, base_logits)


def test_stages_inherit_the_runs_device_and_seed_unless_they_set_their_own():
    cfg = PipelineConfig(device="cpu", seed=7, stages=[{"name": "a"}, {"name": "b", "train": {"seed": 3}}])
    a, b = cfg.resolved(256).stages
    assert (a.train.device, a.train.seed) == ("cpu", 7)
    assert (b.train.device, b.train.seed) == ("cpu", 3)


def test_each_recipe_checks_its_own_claims():
    from types import SimpleNamespace

    from ctxstretch.compare import claims

    def outcome(held: float, wall: float, far_loss: float, stages=None):
        return SimpleNamespace(at=lambda kind, n, r=None: r.held if r is not None else held, wall_s=wall,
                               flops=wall * 1e9, stage_results=stages or {},
                               result=SimpleNamespace(buckets={"2048-4096": far_loss}))

    base = SimpleNamespace(buckets={"2048-4096": 5.0})
    outs = {"longrecipe": outcome(0.5, 30, 2.0, {"extend": SimpleNamespace(held=0.6)}),
            "full": outcome(0.5, 100, 1.9), "pi": outcome(0.2, 100, 2.5),
            "longskywork": outcome(0.4, 50, 2.2, {"sft": SimpleNamespace(held=0.3)})}
    got = {label.split(" (")[0].split(" reaches")[0]: ok for label, ok, _ in claims(outs, base, 256, 4096)}
    assert got == {"LongRecipe": True, "ABF beats PI on loss at positions 2048-4096": True,
                   "the SynL long-SFT stage raises held-out retrieval @ 4,096 of the SFT model": True}
    assert claims({"pi": outs["pi"]}, base, 256, 4096) == []  # a claim whose recipes did not run is left out


def test_resume_into_a_seeded_directory_writes_its_config(tmp_path):
    import yaml

    from ctxstretch.recipes.pipeline import prepare_out

    out = tmp_path / "run"
    (out / "base").mkdir(parents=True)
    (out / "base" / "eval.json").write_text("{}")
    prepare_out(out, {"a": 1}, resume=True, force=False)
    assert yaml.safe_load((out / "config.yaml").read_text()) == {"a": 1}
    assert (out / "base" / "eval.json").exists()
