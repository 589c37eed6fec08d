"""Short-context regression (held-out loss on the base window, lm-eval tasks behind their extra), the report's
"what extension cost" section for any number of models, old eval.json files, and the backend seam."""

import json
import math
import sys
import types
from functools import partial

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ctxstretch.cli import app
from ctxstretch.config import ConfigError
from ctxstretch.eval import suite
from ctxstretch.eval.backend import check_backend
from ctxstretch.eval.passkey import Grid
from ctxstretch.eval.perplexity import token_losses
from ctxstretch.eval.report import write_report
from ctxstretch.eval.short import LMEVAL_MISSING, lm_eval_args, metrics_of, run_lm_eval, short_context_loss
from ctxstretch.eval.suite import EvalConfig, EvalResult, evaluate
from tests.conftest import micro_llama

runner = CliRunner()


@pytest.fixture(scope="module")
def stream(tokenizer):
    text = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 200
    return np.asarray(tokenizer(text)["input_ids"])


def result(short_loss: float | None, lm: dict | None = None) -> EvalResult:
    grid = Grid("passkey", [64], [0.0], np.array([[1.0]]), 1)
    short = None if short_loss is None else {"length": 64, "rows": 4, "tokens": 252, "loss": short_loss,
                                             "source": "embedded"}
    return EvalResult(grid, None, None, {}, 64, {}, short, lm)


def test_short_context_loss_of_an_untrained_model_is_near_uniform(tokenizer, stream):
    """Rows of the model's own window; a freshly initialised model predicts about uniformly: loss ≈ ln(vocab)."""
    losses_of = partial(token_losses, micro_llama(tokenizer, window=64), batch_size=2)
    res = short_context_loss(losses_of, stream, 64, rows=4)
    assert res["length"] == 64 and res["rows"] == 4 and res["tokens"] == 4 * 63
    assert abs(res["loss"] - math.log(len(tokenizer))) < 0.5
    with pytest.raises(ConfigError, match="fewer than one row"):
        short_context_loss(partial(token_losses, micro_llama(tokenizer)), stream[:10], 64)


def test_evaluate_records_the_short_context_loss_on_a_user_text(tokenizer, stream, tmp_path, monkeypatch):
    monkeypatch.setattr(suite, "embedded_token_stream", lambda *a, **k: stream)  # skip tokenising the corpus
    (tmp_path / "notes.txt").write_text("Short held-out notes of the user. " * 200)
    cfg = EvalConfig(lengths=[128], depths=[0.5], trials=1, needle=False, loss_rows=1, short_rows=3,
                     short_text=str(tmp_path / "notes.txt"))
    res = evaluate(micro_llama(tokenizer), tokenizer, cfg, base_window=64, target=128)
    assert res.short["rows"] == 3 and res.short["length"] == 64 and res.short["source"].endswith("notes.txt")
    res.save(tmp_path / "run")
    assert EvalResult.load(tmp_path / "run").short == res.short
    assert evaluate(micro_llama(tokenizer), tokenizer, cfg.model_copy(update={"short_rows": 0}), 64, 128).short is None


def test_report_shows_what_extension_cost_for_any_number_of_models(tmp_path):
    lm = {"hellaswag": {"acc": 0.30, "acc_norm": 0.31}}
    results = {"base": result(3.0, lm), "extended": result(3.2, {"hellaswag": {"acc": 0.29, "acc_norm": 0.33}}),
               "yarn": result(2.9), "old": result(None)}
    md = write_report(tmp_path, "t", [], results, 64).read_text()
    section = md.split("## Short-context regression")[1].split("\n## ")[0]
    assert "| metric | base | extended | yarn | old |" in section
    assert ("| held-out loss, rows of 64 tokens (nats/token) | 3.000 | 3.200 (+0.200, **worse**) | 2.900 (-0.100) "
            "| – |") in section
    assert "| hellaswag acc (lm-eval) | 0.300 | 0.290 (-0.010, **worse**) | – | – |" in section
    assert "| hellaswag acc_norm (lm-eval) | 0.310 | 0.330 (+0.020) |" in section
    html = (tmp_path / "report.html").read_text()
    assert "Short-context regression" in html and "<b>worse</b>" in html
    # no model with a short-context figure: no section
    assert "Short-context" not in write_report(tmp_path, "t", [], {"a": result(None)}, 64).read_text()


def test_eval_json_without_the_new_fields_still_loads(tmp_path):
    result(3.0, {"x": {"acc": 0.5}}).save(tmp_path)
    data = json.loads((tmp_path / "eval.json").read_text())
    del data["short_context"], data["lm_eval"]
    (tmp_path / "eval.json").write_text(json.dumps(data))
    old = EvalResult.load(tmp_path)
    assert old.short is None and old.lm_eval is None and "short_context" not in old.summary()


def test_lm_eval_missing_is_one_line_naming_the_extra(monkeypatch, tmp_path, micro_model_dir):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed, whatever this machine has
    with pytest.raises(ConfigError, match=r"ctxstretch\[lmeval\]"):
        evaluate(None, None, EvalConfig(lm_eval_tasks=["hellaswag"]), 64, 64)  # before any work
    res = runner.invoke(app, ["eval", "--model", str(micro_model_dir), "--lm-eval-tasks", "hellaswag",
                              "--out", str(tmp_path / "ev")])
    assert res.exit_code == 2 and LMEVAL_MISSING in res.output and not (tmp_path / "ev").exists()
    assert len(res.output.strip().splitlines()) == 1


def test_lm_eval_wrapper_builds_its_arguments(monkeypatch):
    assert lm_eval_args([" hellaswag", "arc_easy ", ""], limit=20) == {
        "tasks": ["hellaswag", "arc_easy"], "limit": 20, "num_fewshot": None, "batch_size": 1, "log_samples": False}
    with pytest.raises(ConfigError, match="at least one task"):
        lm_eval_args([" "])
    # a stand-in lm_eval: the wrapper hands it the in-memory model and these arguments, and keeps numeric metrics
    seen = {}
    fake = types.ModuleType("lm_eval")
    fake.simple_evaluate = lambda **kw: seen.update(kw) or {"results": {"hellaswag": {
        "alias": "hellaswag", "acc,none": 0.25, "acc_stderr,none": 0.01, "acc_norm,none": 0.3}}}
    models = types.ModuleType("lm_eval.models")
    hf = types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = lambda pretrained, tokenizer, batch_size: ("HFLM", pretrained, tokenizer, batch_size)
    monkeypatch.setitem(sys.modules, "lm_eval", fake)
    monkeypatch.setitem(sys.modules, "lm_eval.models", models)
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", hf)
    assert run_lm_eval("M", "T", ["hellaswag"], limit=5) == {"hellaswag": {"acc": 0.25, "acc_norm": 0.3}}
    assert seen["model"] == ("HFLM", "M", "T", 1) and seen["tasks"] == ["hellaswag"] and seen["limit"] == 5
    assert metrics_of({}) == {}


def test_backend_seam(tmp_path, micro_model_dir):
    assert check_backend("transformers") == "transformers"
    with pytest.raises(ConfigError, match="unknown backend 'onnx'"):
        check_backend("onnx")
    with pytest.raises(ConfigError, match="ctxstretch backend setup vllm"):  # no vLLM environment there
        check_backend("vllm", tmp_path / "no-env")
    res = runner.invoke(app, ["eval", "--model", str(micro_model_dir), "--backend", "vllm",
                              "--vllm-env", str(tmp_path / "no-env"), "--out", str(tmp_path / "ev")])
    assert res.exit_code == 2 and "backend setup vllm" in res.output and len(res.output.strip().splitlines()) == 1


def test_chat_check_skips_models_without_a_chat_template_and_scores_answers(tokenizer):
    from ctxstretch.eval import chat as chat_mod

    assert chat_mod.chat_check(None, tokenizer) is None  # the embedded tokenizer has no chat template

    class Echo:  # a stand-in model whose "answer" is fixed text, to check the scoring
        def __init__(self, tok, text):
            self.tok, self.text = tok, text

        def parameters(self):
            yield torch.zeros(1)

        def generate(self, ids, **kw):
            return torch.cat([ids, torch.tensor([self.tok.encode(self.text)])], 1)

    class Templated:
        chat_template = "x"
        pad_token_id = eos_token_id = 0

        def apply_chat_template(self, msgs, **kw):
            return {"input_ids": torch.tensor([tokenizer.encode(msgs[0]["content"])])}

        def encode(self, text):
            return tokenizer.encode(text)

        def decode(self, ids, **kw):
            return tokenizer.decode(ids, **kw)

    tok = Templated()
    result = chat_mod.chat_check(Echo(tok, "Paris is blue, 7 days"), tok)
    assert result["asked"] == 3 and result["passed"] == 3
    assert chat_mod.chat_check(Echo(tok, "no idea"), tok)["passed"] == 0
