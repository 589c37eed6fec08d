"""The vLLM backend (eval/vllm_*.py): a missing or broken environment is one line and exit code 2 (fast, always
run); the engine's teacher-forced view scores probes exactly as the model it stands for; parity's comparison and
verdict; and, where the vLLM environment exists (CI builds it once under the user cache dir), `eval --backend vllm`
on SmolLM2 and rope parity for the default and the YaRN rope."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ctxstretch.cli import app
from ctxstretch.config import ConfigError
from ctxstretch.data.heldout import HeldoutBuilder
from ctxstretch.data.probes import rng_for
from ctxstretch.eval import venv, vllm_env
from ctxstretch.eval.passkey import answer_scores
from ctxstretch.eval.suite import EvalConfig
from ctxstretch.eval.vllm_client import PromptScores, VllmEngine, VllmError
from ctxstretch.eval.vllm_eval import EngineLM
from ctxstretch.eval.vllm_parity import compare, hf_scores, rope_variant, verdict
from ctxstretch.tiny import MODEL_DIR
from tests.conftest import micro_llama

runner = CliRunner()


def _one_line_exit_2(args: list[str]) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
    return res.output


def test_a_missing_vllm_environment_is_one_line_naming_the_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(vllm_env.ENV_VAR, raising=False)
    for args in (["eval", "--backend", "vllm", "--out", str(tmp_path / "ev")], ["check-parity", "embedded"]):
        out = _one_line_exit_2(args)
        assert "no vLLM environment" in out and "ctxstretch backend setup vllm" in out
    assert not (tmp_path / "ev").exists()  # refused before anything ran
    monkeypatch.setenv(vllm_env.ENV_VAR, str(tmp_path / "elsewhere"))
    assert "elsewhere" in _one_line_exit_2(["eval", "--backend", "vllm", "--out", str(tmp_path / "ev")])
    unfinished = vllm_env.default_env_dir()
    (unfinished / "bin").mkdir(parents=True)
    (unfinished / "bin" / "python").symlink_to(sys.executable)  # as a killed build leaves it: no marker
    monkeypatch.delenv(vllm_env.ENV_VAR)
    assert "not finished building" in _one_line_exit_2(["eval", "--backend", "vllm", "--out", str(tmp_path / "e")])


def test_a_broken_vllm_environment_is_one_line_naming_the_setup(tmp_path):
    broken = tmp_path / "broken"
    (broken / "bin").mkdir(parents=True)
    (broken / "bin" / "python").symlink_to(sys.executable)  # a python without vllm
    out = _one_line_exit_2(["eval", "--backend", "vllm", "--vllm-env", str(broken), "--lengths", "256",
                            "--trials", "1", "--short-rows", "0", "--out", str(tmp_path / "ev")])
    assert "cannot run vLLM" in out and "No module named 'vllm'" in out and "backend setup vllm" in out


def test_setup_builds_the_locked_steps_and_never_replaces_a_foreign_folder(tmp_path, monkeypatch):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not built by ctxstretch"):
        vllm_env.setup(foreign)
    assert (foreign / "notes.txt").exists()
    calls = []

    def fake(cmd, **kw):
        calls.append(cmd)
        if cmd[1:3] == ["-m", "venv"]:
            (Path(cmd[3]) / "bin").mkdir(parents=True)
            (Path(cmd[3]) / "bin" / "python").touch()
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(venv.subprocess, "run", fake)
    python = vllm_env.setup(tmp_path / "new")
    assert python == tmp_path / "new" / "bin" / "python"
    assert [c[3:] for c in calls[1:]] == [["install", "-q", "torch==2.13.0"], ["install", "-q", vllm_env.VLLM],
                                          ["uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"]]
    assert vllm_env.find_python(tmp_path / "new") == python  # reused: no second build
    vllm_env.setup(tmp_path / "new")
    assert len(calls) == 4
    res = runner.invoke(app, ["backend", "setup", "llama.cpp"])
    assert res.exit_code == 2 and "needs no setup" in res.output


class _ModelAsEngine:
    """A stand-in for VllmEngine that answers `score` from a transformers model (what vLLM would do)."""

    def __init__(self, model):
        self.model = model

    def score(self, prompts, tail=0):
        out = []
        for ids in prompts:
            s = hf_scores(self.model, ids)
            k = len(s.top) if tail <= 0 else min(tail, len(s.top))
            out.append(PromptScores(s.top[-k:], s.top_lp[-k:], s.tok_lp[-k:]))
        return out


def test_the_engine_view_scores_probes_as_the_model_it_stands_for(tokenizer):
    model = micro_llama(tokenizer)
    builder = HeldoutBuilder(tokenizer)
    examples = [builder.make(f, rng_for(f"t-{f}", 0, evaluation=True), 256, 0.5)
                for f in ("first_sentence", "kv_uuid", "doc_fact")]
    # the untrained model's argmax never spells the answers: make one probe solved by construction (greedy)
    solved = examples[0]
    ids = solved.input_ids.copy()
    for j in np.flatnonzero(solved.labels != -100):
        with torch.no_grad():
            ids[j] = int(model(input_ids=torch.from_numpy(ids[:j])[None]).logits[0, -1].argmax())
    solved.input_ids, solved.labels = ids, np.where(solved.labels != -100, ids, -100)
    ok_hf, frac_hf = answer_scores(model, examples, batch_size=2)
    view = EngineLM(_ModelAsEngine(model), len(tokenizer), [tokenizer.eos_token_id])
    ok_v, frac_v = answer_scores(view, examples, batch_size=2)
    assert ok_hf.tolist() == ok_v.tolist() and np.allclose(frac_hf, frac_v)
    assert ok_v.tolist()[0] is True and frac_v.tolist()[0] == 1.0


def _scores(n: int, shift: float = 0.0, nan_from: int | None = None) -> PromptScores:
    rng = np.random.default_rng(0)
    top, lp = rng.integers(0, 100, n - 1), -rng.random(n - 1)
    tok = lp - rng.random(n - 1)
    if nan_from is not None:
        lp, tok = lp.copy(), tok.copy()
        lp[nan_from:] = tok[nan_from:] = np.nan
    return PromptScores(top, lp + shift, tok + shift)


def test_parity_buckets_and_verdict():
    same = compare(_scores(1024), _scores(1024), 1024, 256)
    assert [(b.lo, b.hi) for b in same] == [(0, 256), (256, 512), (512, 1023)]
    assert all(b.agree == 1.0 and b.mean_tok == 0.0 for b in same)
    assert verdict(same, "float32", 256).startswith("agree")
    beyond = compare(_scores(1024), PromptScores(*[np.concatenate([a[:256], b[256:]]) for a, b in zip(
        vars(_scores(1024)).values(), vars(_scores(1024, shift=0.5)).values(), strict=True)]), 1024, 256)
    line = verdict(beyond, "float32", 256)
    assert line.startswith("DIFFER beyond the original window (256)") and "0.5" in line
    nan = compare(_scores(1024), _scores(1024, nan_from=300), 1024, 256)
    assert nan[1].nan == 212 and "NaN logprobs at 723 positions from 256 on" in verdict(nan, "float32", 256)


def test_rope_variant_rewrites_only_the_rope(tmp_path):
    out = rope_variant(MODEL_DIR, tmp_path / "yarn", "yarn", 1024, base_window=256)
    raw = json.loads((out / "config.json").read_text())
    base = json.loads((MODEL_DIR / "config.json").read_text())
    assert raw["rope_parameters"]["rope_type"] == "yarn" and raw["rope_parameters"]["factor"] == 4
    assert raw["rope_parameters"]["original_max_position_embeddings"] == 256
    assert {k: v for k, v in raw.items() if k not in ("rope_parameters", "max_position_embeddings")} == \
        {k: v for k, v in base.items() if k not in ("rope_parameters", "max_position_embeddings")}
    weights = next(out.glob("*.safetensors"))
    assert weights.is_symlink() and weights.resolve().parent == MODEL_DIR.resolve()


def test_vllm_reads_the_default_rope_past_its_window_and_refuses_dynamic_ntk_there(tmp_path):
    from ctxstretch.eval.vllm_eval import vllm_overrides

    default = rope_variant(MODEL_DIR, tmp_path / "default", "default", 0, base_window=256)
    assert vllm_overrides(default, 1024) == {"max_position_embeddings": 1024}
    assert vllm_overrides(default, 200) == {}  # inside the window: as written
    assert vllm_overrides(rope_variant(MODEL_DIR, tmp_path / "abf", "abf", 512, base_window=256), 1024) == {
        "max_position_embeddings": 1024}  # ABF is the default rope with another base
    for method in ("yarn", "pi", "llama3"):  # their tables follow their own parameters
        assert vllm_overrides(rope_variant(MODEL_DIR, tmp_path / method, method, 512, base_window=256), 1024) == {}
    dynamic = rope_variant(MODEL_DIR, tmp_path / "ntk", "ntk", 512, base_window=256)
    assert vllm_overrides(dynamic, 256) == {}
    with pytest.raises(ConfigError, match="does not compute dynamic NTK rope past the 256-token window.*ntk-fixed"):
        vllm_overrides(dynamic, 1024)  # vLLM 0.32: unscaled base, no positions past the window (check-parity)


def test_requests_longer_than_the_engine_are_refused_before_sending():
    engine = object.__new__(VllmEngine)
    engine.max_model_len = 8
    with pytest.raises(VllmError, match="a 9-token request exceeds the engine's max_model_len 8"):
        engine.score([np.zeros(8, dtype=np.int64)])  # scoring asks for one generated token beyond the prompt


# ---- with the vLLM environment (real engine runs, a minute or two each on 2 CPU cores) ----

@pytest.fixture(scope="session")
def vllm_python():
    """The vLLM environment's python: the one that exists, or (in CI) the one built once under the user cache dir;
    skips with the reason otherwise."""
    try:
        return vllm_env.find_python()
    except vllm_env.VllmUnavailable as e:
        if not os.environ.get("CI"):
            pytest.skip(f"{e} (about 3 minutes and 3.5 GB, once; CI builds it)")
    try:
        return vllm_env.setup()
    except venv.IndexUnreachable as e:
        pytest.skip(f"the vLLM environment cannot be built here: {e}")


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.real_model
def test_eval_runs_on_the_vllm_backend(vllm_python, smollm2, tmp_path):
    out = tmp_path / "ev"
    res = runner.invoke(app, ["eval", "--model", str(smollm2), "--backend", "vllm", "--lengths", "256",
                              "--trials", "1", "--short-rows", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "eval.json").read_text())
    assert set(data["heldout"]) == {"first_sentence", "kv_uuid", "doc_fact"}
    cell = data["heldout"]["kv_uuid"]["256"]
    default = EvalConfig()  # the command's default grid
    probes = default.heldout_trials * len(default.heldout_depths)
    assert cell["n"] == probes and 0.0 <= cell["token_acc"] <= 1.0
    assert len(data["passkey"]["acc"]) == 5 and data["passkey"]["lengths"] == [256]
    assert all(np.isfinite(v) and 0 < v < 20 for v in data["loss_by_position"].values())
    assert 0 < data["short_context"]["loss"] < 20 and data["short_context"]["length"] == 8192
    assert data["chat"]["passed"] >= 2  # "Paris", "seven", "blue" from greedy generation in vLLM
    assert (out / "vllm.log").exists() and (out / "report.md").exists()


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.real_model
def test_parity_default_and_yarn(vllm_python, smollm2, tmp_path):
    from ctxstretch.eval.vllm_eval import vllm_overrides
    from ctxstretch.eval.vllm_parity import check_parity

    # SmolLM2's weights with a 512-token window: positions 512-1,023 lie beyond it
    default = rope_variant(smollm2, tmp_path / "default", "default", 0, base_window=512)
    res = runner.invoke(app, ["check-parity", str(default), "--lengths", "1024"])
    # as written, vLLM tabulates the default rope for max_position_embeddings positions only and reads past its
    # table beyond them (NaN or garbage)
    assert res.exit_code == 1 and "DIFFER beyond the original window (512)" in res.output, res.output
    buckets, line = check_parity(default, [1024], hf_overrides=vllm_overrides(default, 1025))  # as eval serves it
    assert line.startswith("agree") and min(b.agree for b in buckets) >= 0.98, line
    assert max(b.mean_tok for b in buckets) < 1e-3
    yarn = rope_variant(smollm2, tmp_path / "yarn", "yarn", 2048, base_window=512)  # 4x the 512-token window
    res = runner.invoke(app, ["check-parity", str(yarn), "--lengths", "1024"])
    assert res.exit_code == 0 and "agree" in res.output, res.output
    assert "| 1,024 | 512–1,023 |" in res.output  # positions beyond the original window were compared


def test_a_run_with_the_vllm_backend_evaluates_saved_models_in_vllm_and_reports_parity(tmp_path, monkeypatch):
    """eval.backend vllm: every evaluation goes to vLLM with the saved model's directory, then the final model's rope
    parity is checked once, kept in its eval.json and shown in the report (the engines themselves are stubbed)."""
    from ctxstretch.eval.passkey import Grid
    from ctxstretch.eval.suite import EvalResult
    from ctxstretch.recipes import pipeline
    from ctxstretch.recipes.config import PipelineConfig

    served, checked = [], []

    def fake_eval(model_dir, cfg, window, target, log_path=None, progress=None):
        served.append(Path(model_dir))
        return EvalResult(Grid("passkey", [512], [0.5], np.ones((1, 1)), 1), None, None, {}, window)

    bucket = {"length": 512, "lo": 0, "hi": 256, "n": 255, "max_top": 1e-5, "mean_top": 1e-6, "mean_tok": 2e-6,
              "agree": 1.0, "nan": 0}

    def fake_parity(model_dir, log_path=None):
        checked.append(Path(model_dir))
        return {"dtype": "float32", "verdict": "agree: every bucket within …", "buckets": [bucket]}

    monkeypatch.setattr(pipeline, "check_backend", lambda name: name)
    monkeypatch.setattr(pipeline, "evaluate_dir", fake_eval)
    monkeypatch.setattr(pipeline, "parity_record", fake_parity)
    cfg = PipelineConfig(target=512, device="cpu", eval={"backend": "vllm", "lengths": [512]})
    report = pipeline.Run(cfg, tmp_path / "run").execute()
    assert served == [MODEL_DIR, tmp_path / "run" / "model"] and checked == [tmp_path / "run" / "model"]
    saved = json.loads((tmp_path / "run" / "extended" / "eval.json").read_text())
    assert saved["parity"]["verdict"].startswith("agree")
    text = report.read_text()
    assert "## Rope parity: transformers vs vLLM" in text and "| 512 | 0–256 | 255 |" in text
    pipeline.Run(cfg, tmp_path / "run", resume=True).execute()  # read back, not checked again
    assert checked == [tmp_path / "run" / "model"]


def test_extend_and_compare_with_vllm_but_no_environment_stop_in_one_line_writing_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(vllm_env.ENV_VAR, raising=False)
    for cmd in (["extend", "--steps", "0", "--target", "512"],
                ["compare", "--recipes", "yarn-free", "--target", "512"]):
        res = runner.invoke(app, [*cmd, "--backend", "vllm", "--out", str(tmp_path / cmd[0])])
        assert res.exit_code == 2, res.output
        error = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
        assert len(error) == 1 and "no vLLM environment" in error[0], res.output
        assert not (tmp_path / cmd[0] / "config.yaml").exists()
