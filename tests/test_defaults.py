"""The rule that derives training settings from the model: the embedded model keeps its tuned settings, a
pretrained one gets a small LR, checkpointing and a step count its hardware can finish; risky LRs warn."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from ctxstretch import defaults
from ctxstretch.cli import app
from ctxstretch.defaults import (
    TIMED_LENGTHS,
    cpu_step_fit,
    cpu_step_seconds,
    lr_warning,
    pretrained_lr,
    train_defaults,
    warmup_for,
)
from ctxstretch.hardware import train_step_seconds
from ctxstretch.recipes import expand
from ctxstretch.recipes.base import RecipeParams, share, split
from ctxstretch.recipes.extend import DEFAULT_MIX, PRETRAINED_MIX, ExtendConfig, dry_run, pipeline, resolve_extend
from ctxstretch.recipes.llama2_long import Llama2LongParams
from ctxstretch.tiny import MODEL_DIR

# SmolLM2-135M's shape: the rule reads config.json only, so no weights are needed (an empty file stands in)
SMOLLM2_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
                  "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                  "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192,
                  "rope_theta": 100000.0, "tie_word_embeddings": True, "rms_norm_eps": 1e-5}


@pytest.fixture
def shaped_dir(tmp_path, monkeypatch):
    """A directory with SmolLM2's config.json, the embedded tokenizer and a placeholder weights file."""
    d = tmp_path / "smol-shape"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(SMOLLM2_CONFIG))
    for f in MODEL_DIR.glob("tokenizer*"):
        shutil.copy(f, d / f.name)
    (d / "model.safetensors").write_bytes(b"")
    # a fixed step-time fit (33 s for 4,096 tokens: SmolLM2-135M's step on a shared 2-core CPU) instead of timing
    # 135M random weights
    monkeypatch.setattr(defaults, "cpu_step_fit", lambda *a, **k: (8e-3, 1e-8))
    return d


def test_the_step_time_fit_recovers_a_per_token_and_a_per_pair_cost(monkeypatch, tmp_path, tokenizer):
    """t(T) = a·T + b·T² from the two timed lengths; the per-pair cost never goes negative on noisy timings."""
    from tests.conftest import micro_llama

    path = tmp_path / "micro"
    micro_llama(tokenizer, window=128).save_pretrained(path)
    tokenizer.save_pretrained(path)
    monkeypatch.setattr(defaults, "train_step_seconds", lambda model, n, *a: 2e-3 * n + 3e-7 * n * n)
    assert cpu_step_fit(str(path), "fp32") == pytest.approx((2e-3, 3e-7))
    assert cpu_step_seconds(str(path), 4096, True, "fp32") == pytest.approx((2e-3 * 4096 + 3e-7 * 4096**2) * 4 / 3)
    cpu_step_fit.cache_clear()
    monkeypatch.setattr(defaults, "train_step_seconds", lambda model, n, *a: {512: 2.0, 2048: 7.0}[n])
    a, b = cpu_step_fit(str(path), "fp32")
    assert b == 0 and a == pytest.approx(2.0 / 512) and TIMED_LENGTHS == (512, 2048)
    cpu_step_fit.cache_clear()


def test_the_step_time_estimate_tracks_a_measured_step(tmp_path, tokenizer):
    """On a real (micro) model, the estimate from the two short timings lands near a step timed at another length."""
    from tests.conftest import micro_llama

    path = tmp_path / "micro"
    model = micro_llama(tokenizer, window=128, hidden=128)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    estimate = cpu_step_seconds(str(path), 4096, False, "fp32")
    measured = train_step_seconds(model.train(), 4096, "fp32", model.config.vocab_size, repeats=2)
    assert 0.4 < estimate / measured < 2.5, (estimate, measured)


def test_embedded_keeps_its_tuned_settings():
    d = train_defaults(params=4_500_000, embedded=True, train_length=1228, device="cpu")
    assert (d.lr, d.steps, d.batch_size, d.warmup_steps, d.gradient_checkpointing) == (1e-3, 200, 4, 20, False)


def test_pretrained_lr_rule_matches_the_papers_at_their_scale():
    assert pretrained_lr(7_000_000_000) == pytest.approx(2e-5)  # Llama 2 Long, 7B
    assert 4e-5 < pretrained_lr(1_400_000_000) < 6e-5  # LongRecipe's 5e-5
    assert pretrained_lr(135_000_000) == pytest.approx(1.44e-4, rel=0.01)
    assert pretrained_lr(1_000) == 2e-4  # capped


def test_pretrained_on_cpu_fits_its_time_budget_and_on_gpu_its_token_budget():
    cpu = train_defaults(params=135_000_000, embedded=False, train_length=9830, device="cpu", step_seconds=226.0)
    assert cpu.batch_size == 1 and cpu.steps == int(2 * 3600 // 226) and cpu.gradient_checkpointing
    assert cpu.warmup_steps == 2 and "sqrt" in cpu.rule
    gpu = train_defaults(params=8_000_000_000, embedded=False, train_length=32768, device="cuda")
    assert gpu.batch_size == 32 and gpu.steps == int(1e9 // (32 * 32768)) and gpu.lr < 2.1e-5
    with pytest.raises(ValueError, match="step_seconds"):
        train_defaults(params=135_000_000, embedded=False, train_length=9830, device="cpu")


def test_given_steps_set_the_warmup_and_the_printed_rule():
    d = train_defaults(params=135_000_000, embedded=False, train_length=4096, device="cpu", given_steps=77)
    assert (d.steps, d.warmup_steps) == (77, 3)
    assert "77 steps as given" in d.rule and "warm-up 3" in d.rule and "fit" not in d.rule


def test_warmup_and_risky_lr_warning():
    assert warmup_for(200, True) == 20 and warmup_for(50, True) == 5
    assert warmup_for(10, False) == 2 and warmup_for(400, False) == 20
    warning = lr_warning(1e-3, 135_000_000, embedded=False)
    assert warning and "0.000144" in warning
    assert lr_warning(1e-3, 4_500_000, embedded=True) is None
    assert lr_warning(1e-4, 135_000_000, embedded=False) is None


def test_resolve_extend_embedded_and_pretrained(shaped_dir):
    emb, rule = resolve_extend(ExtendConfig(train={"device": "cpu"}))
    assert emb.mix == DEFAULT_MIX and emb.text == ["embedded"] and emb.train.lr == 1e-3 and emb.train.steps == 200
    assert "embedded model" in rule
    real, rule = resolve_extend(ExtendConfig(model=str(shaped_dir), target=32768, train={"device": "cpu"}))
    t = real.train
    assert real.mix == PRETRAINED_MIX and real.text == ["stdlib"] and real.train_length == 9830
    assert t.lr == pytest.approx(pretrained_lr(134_515_008), rel=0.01) and t.batch_size == 1
    assert t.gradient_checkpointing and t.steps >= 10 and t.precision in ("bf16", "fp32")
    assert real.eval.heldout_trials == 1 and real.eval.precision == "auto"
    stage = pipeline(real).stages[0]
    assert stage.data.long_threshold == 9830 and stage.data.long_weight > 1 and stage.data.text == ["stdlib"]
    # explicit settings win; a wrecking LR warns and names the derived value
    mine, rule = resolve_extend(ExtendConfig(model=str(shaped_dir), target=32768,
                                             train={"device": "cpu", "lr": 1e-3, "steps": 40}))
    assert mine.train.lr == 1e-3 and mine.train.steps == 40 and mine.train.warmup_steps == 2
    assert "warning" in rule and "0.000144" in rule


def test_resume_keeps_the_saved_derivation(shaped_dir):
    first, _ = resolve_extend(ExtendConfig(model=str(shaped_dir), target=32768, train={"device": "cpu"}))
    pinned = first.model_copy(update={"train": first.train.model_copy(update={"steps": 7})})
    again, rule = resolve_extend(ExtendConfig(model=str(shaped_dir), target=32768, train={"device": "cpu"}),
                                 saved=pinned)
    assert again.train.steps == 7 and "kept" in rule


def test_dry_run_prints_the_plan_and_writes_nothing(shaped_dir, tmp_path):
    lines = dry_run(*resolve_extend(ExtendConfig(model=str(shaped_dir), target=32768, train={"device": "cpu"})))
    text = "\n".join(lines)
    assert "stage extend:" in text and "estimate: training" in text and "GB" in text and "lr 0.000144" in text
    out = tmp_path / "never"
    result = CliRunner().invoke(app, ["extend", "--model", str(shaped_dir), "--target", "32768", "--device", "cpu",
                                      "--dry-run", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "stage extend:" in result.output and "ntk-fixed" in result.output and not out.exists()


def test_cli_default_method_is_the_recipe_default():
    result = CliRunner().invoke(app, ["extend", "--device", "cpu", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "rope ntk-fixed" in result.output


def test_zero_fractions_and_curriculum_splits():
    assert share(10, 0) == 0 and share(0, 0.5) == 0 and share(10, 0.01) == 1
    assert split(1, 3) == [0, 0, 1] and split(10, 3) == [3, 3, 4] and sum(split(7, 4)) == 7
    p = Llama2LongParams(recipe="llama2-long", steps=1, curriculum=[0.25, 0.5], sft_fraction=0)
    stages = expand(p, 256).stages
    assert [s.train.steps for s in stages] == [1] and stages[0].name == "cpt"
    params, _ = RecipeParams(recipe="x", lr=1e-3).resolved(256)
    assert params.train(lr=5e-6).lr == 5e-6 and params.train().lr == 1e-3


def test_presets_derive_their_settings_for_a_pretrained_model(shaped_dir):
    from ctxstretch.recipes import read_spec, recipe_params

    data, where = read_spec("longrecipe")
    pipe = expand(recipe_params({**data, "model": str(shaped_dir), "target": 32768, "device": "cpu"}, where), 8192)
    extend_stage = pipe.stages[0]
    assert extend_stage.train.lr == pytest.approx(1.44e-4, rel=0.01) and extend_stage.train.batch_size == 1
    assert extend_stage.train.gradient_checkpointing and extend_stage.data.text == ["stdlib"]
    assert "passkey" not in extend_stage.data.mix and "sqrt" in pipe.description
    emb = expand(recipe_params(data, where), 256).stages[0]
    assert emb.train.lr == 1e-3 and emb.data.text == ["embedded"] and emb.train.batch_size == 4


def test_checkpointing_is_on_past_the_base_window_for_pretrained_models_only(shaped_dir):
    """Activation checkpointing follows the row length against the model's original window; the embedded model
    keeps its tuned setting (off) at any length; `derive` and the presets path apply the same rule."""
    from ctxstretch.defaults import derive
    from ctxstretch.models import load_config
    from ctxstretch.rope import original_window

    within = train_defaults(params=135_000_000, embedded=False, train_length=4096, device="cuda", window=8192)
    past = train_defaults(params=135_000_000, embedded=False, train_length=9830, device="cuda", window=8192)
    assert not within.gradient_checkpointing and "checkpointing off" in within.rule
    assert past.gradient_checkpointing and "checkpointing on" in past.rule and "8,192-token window" in past.rule
    emb = train_defaults(params=4_500_000, embedded=True, train_length=65536, device="cpu", window=256)
    assert not emb.gradient_checkpointing and "no activation checkpointing" in emb.rule
    assert original_window(load_config(shaped_dir)) == 8192
    config = json.loads((shaped_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048,
                                 "rope_theta": 1e5}
    (shaped_dir / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 32768}))
    assert original_window(load_config(shaped_dir)) == 2048  # an earlier scaling's original window
    (shaped_dir / "config.json").write_text(json.dumps(SMOLLM2_CONFIG))
    fill, rule = derive(str(shaped_dir), 4096, "cuda", {}, False, 8192)
    assert fill["gradient_checkpointing"] is False and "4,096-token rows within" in rule
    fill, _ = derive(str(shaped_dir), 4096, "cuda", {"gradient_checkpointing": True}, False, 8192)
    assert "gradient_checkpointing" not in fill  # what the user set wins
    from ctxstretch.recipes import expand, read_spec, recipe_params

    data, where = read_spec("longrecipe")
    short = expand(recipe_params({**data, "model": str(shaped_dir), "target": 8192, "device": "cpu"}, where), 8192)
    assert not any(s.train.gradient_checkpointing for s in short.stages if s.train is not None)
