"""lm-evaluation-harness 0.4.13's RULER tasks (eval/lmeval_ruler.py): results parsing, refused inputs, the
environment's reuse, the command line, and one real offline run of `ctxstretch eval` on the embedded model (slow:
builds lm-eval's own environment on first use)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ctxstretch.cli import app
from ctxstretch.config import ConfigError
from ctxstretch.eval import lmeval_ruler as lr
from ctxstretch.tiny import MODEL_DIR

# the shape of a real results_*.json of `--tasks niah_single_1,ruler_vt --metadata '{"max_seq_lengths":[1024]}'`
# (trimmed: configs, env info); the metric of a length is "<length>,none", and 4096 is lm-eval's -1 placeholder
RESULTS = {
    "results": {
        "niah_single_1": {"name": "niah_single_1", "alias": "niah_single_1", "sample_len": 2, "4096,none": -1,
                          "4096_stderr,none": "N/A", "1024,none": 0.5, "1024_stderr,none": 0.5},
        "ruler_vt": {"name": "ruler_vt", "alias": "ruler_vt", "sample_len": 2, "4096,none": -1,
                     "4096_stderr,none": "N/A", "1024,none": 0.1, "1024_stderr,none": 0.1},
    },
    "group_subtasks": {"niah_single_1": [], "ruler_vt": []},
    "n-samples": {"niah_single_1": {"original": 500, "effective": 2}, "ruler_vt": {"original": 500, "effective": 2}},
    "lm_eval_version": "0.4.13",
    "max_length": 1280,
}


def test_scores_are_read_per_task_and_length():
    assert lr.scores_from_results(RESULTS, ["niah_single_1", "ruler_vt"], [1024]) == {
        "niah_single_1": {1024: 0.5}, "ruler_vt": {1024: 0.1}}
    with pytest.raises(ConfigError, match="no score at length 4096"):  # the -1 placeholder: never run
        lr.scores_from_results(RESULTS, ["niah_single_1"], [4096])
    with pytest.raises(ConfigError, match="no results for task ruler_cwe"):
        lr.scores_from_results(RESULTS, ["ruler_cwe"], [1024])


def test_unknown_tasks_and_bad_lengths_are_refused_up_front(tmp_path):
    run = lambda tasks, lengths, limit=1: lr.run_ruler(MODEL_DIR, tasks, lengths, limit, tmp_path,  # noqa: E731
                                                       python=tmp_path / "never-run")
    with pytest.raises(ConfigError, match="unknown lm-eval RULER task.*qa_squad.*choose from.*niah_single_1"):
        run(["qa_squad"], [1024])  # downloads SQuAD: not offered
    for lengths in ([], [0], [-512], [512.0], [True]):
        with pytest.raises(ConfigError, match="positive integers"):
            run(["niah_single_1"], lengths)
    with pytest.raises(ConfigError, match="ruler_vt cannot build a 512-token prompt.*≥ 1,024"):
        run(["ruler_vt"], [512])  # 0.4.13 would loop forever there
    with pytest.raises(ConfigError, match="limit must be a positive integer"):
        run(["niah_single_1"], [512], limit=0)
    with pytest.raises(ConfigError, match="choose from"):
        lr.check_tasks(["ruler_qa_squad"], [1024])  # needs a download: not offered
    with pytest.raises(ConfigError, match="≥ 256"):
        lr.check_tasks(["ruler_vt"], [128])
    with pytest.raises(ConfigError, match="no config.json"):
        lr.run_ruler(tmp_path, ["niah_single_1"], [512], 1, tmp_path / "o", python=tmp_path / "never-run")


def test_environment_is_reused_only_when_finished(tmp_path, monkeypatch):
    monkeypatch.delenv(lr.PYTHON_VAR, raising=False)
    env = tmp_path / "venv"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").symlink_to(sys.executable)
    (env / ".ctxstretch-ready").write_text("\n".join(lr.REQUIREMENTS))
    assert lr.ensure_env(env) == env / "bin" / "python"  # a finished build: no pip
    (env / ".ctxstretch-ready").unlink()  # as a killed build leaves it: built again, from scratch, marker last
    calls = []

    def fake(cmd, **kw):
        calls.append(cmd)
        if cmd[1:3] == ["-m", "venv"]:
            Path(cmd[3]).mkdir()
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(lr.subprocess, "run", fake)
    assert lr.ensure_env(env) == env / "bin" / "python" and not (env / "bin").exists()  # the stale env was removed
    assert [c[1:3] for c in calls] == [["-m", "venv"], ["-m", "pip"], ["-m", "pip"]]
    assert calls[1][-1] == "torch==2.13.0" and (env / ".ctxstretch-ready").read_text() == "\n".join(lr.REQUIREMENTS)
    (env / ".ctxstretch-ready").unlink()
    down = "ERROR: No matching distribution found for torch==2.13.0\n"
    monkeypatch.setattr(lr.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", down))
    with pytest.raises(lr.IndexUnreachable, match="No matching distribution found for torch"):
        lr.ensure_env(env)
    assert not (env / ".ctxstretch-ready").exists()
    monkeypatch.setenv(lr.PYTHON_VAR, sys.executable)
    assert str(lr.ensure_env()) == sys.executable
    monkeypatch.setenv(lr.PYTHON_VAR, str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="no such executable"):
        lr.ensure_env()


def test_command_uses_the_local_tokenizer_and_leaves_room_past_the_prompt(tmp_path):
    cmd = lr.command(tmp_path / "py", tmp_path / "m", ["niah_single_1", "ruler_cwe"], [1024], 2, tmp_path / "o")
    args = cmd[cmd.index("--model_args") + 1].split(",")
    assert f"pretrained={tmp_path / 'm'}" in args and f"tokenizer={tmp_path / 'm'}" in args
    assert f"max_length={1024 + lr.MARGIN}" in args and "dtype=auto" in args
    assert json.loads(cmd[cmd.index("--metadata") + 1]) == {"max_seq_lengths": [1024]}
    assert cmd[cmd.index("--tasks") + 1] == "niah_single_1,ruler_cwe" and cmd[-2:] == ["--limit", "2"]


def test_failures_name_the_cause():
    log = ("Loading weights: 100%|██████| 38/38 [00:00<00:00, 36223.53it/s]\nTraceback (most recent call last):\n"
           "ConnectionError: Couldn't reach 'baber/paul_graham_essays' on the Hub (OfflineModeIsEnabled)\n")
    assert "tried to fetch data offline (ConnectionError: Couldn't reach" in lr._diagnose(log, 1, "x.log")
    assert lr._diagnose("ValueError: bad dtype\n", 1, "x.log").startswith("lm_eval exited with code 1: ValueError")


@pytest.mark.slow
def test_eval_runs_an_lm_eval_ruler_task_offline(tmp_path):
    out = tmp_path / "ev"
    result = CliRunner().invoke(app, ["eval", "--lengths", "512", "--trials", "1", "--short-rows", "0",
                                      "--lm-eval-tasks", "niah_single_1", "--lm-eval-limit", "1", "--out", str(out)],
                                env={**os.environ})
    assert result.exit_code == 0, result.output
    data = json.loads((out / "eval.json").read_text())
    score = data["external_ruler"]["niah_single_1"]["512"]
    assert isinstance(score, float) and 0.0 <= score <= 1.0
    assert list((out / "lm-eval" / "len512").glob("*/results_*.json"))
    report = (out / "report.md").read_text()
    assert "## External suite: lm-evaluation-harness RULER" in report and "niah_single_1 @ 512" in report


def test_extend_runs_lm_eval_ruler_on_each_saved_model(tmp_path, micro_model_dir, monkeypatch):
    """RULER tasks in `eval.lm_eval_tasks` run on the base and the saved extended model, into each report."""
    from ctxstretch import extend
    from ctxstretch.eval import lmeval_ruler
    from ctxstretch.recipes.extend import ExtendConfig

    seen = []

    def fake_run_ruler(model_dir, tasks, lengths, limit, out_dir, dtype="auto"):
        seen.append((Path(model_dir), tuple(tasks), tuple(lengths), limit, dtype))
        return {t: {n: 0.5 for n in lengths} for t in tasks}

    monkeypatch.setattr(lmeval_ruler, "run_ruler", fake_run_ruler)
    monkeypatch.setattr(lmeval_ruler, "ensure_env", lambda: Path(sys.executable))  # built up front
    cfg = ExtendConfig(model=str(micro_model_dir), target=512, train_length=64, mix={"text": 1.0},
                       train={"steps": 1, "batch_size": 1, "device": "cpu"},
                       eval={"lengths": [256], "depths": [0.5], "trials": 1, "needle": False, "loss_rows": 0,
                             "short_rows": 0, "heldout_depths": [0.5], "heldout_trials": 1,
                             "lm_eval_tasks": ["niah_single_1"], "lm_eval_limit": 2})
    out = tmp_path / "run"
    report = extend(config=cfg, out=out).read_text()
    assert [s[0] for s in seen] == [micro_model_dir, out / "model"]
    assert seen[0][1:] == (("niah_single_1",), (256,), 2, "auto")  # an fp32 evaluation: the config's own dtype
    assert json.loads((out / "extended" / "eval.json").read_text())["external_ruler"] == {"niah_single_1": {"256": 0.5}}
    assert "niah_single_1" in report and "2 samples per task and length" in report


def test_a_bf16_evaluation_runs_lm_eval_in_bf16(tmp_path, monkeypatch):
    """lm-eval loads the model in bf16 when the run's own evaluation holds it in bf16 (an fp32 checkpoint would
    otherwise run in fp32 there: ~2x slower on a bf16 CPU, and not the model the other scores measured)."""
    from ctxstretch.eval import lmeval_ruler
    from ctxstretch.eval.suite import EvalConfig, EvalResult, add_external

    seen = []
    monkeypatch.setattr(lmeval_ruler, "run_ruler", lambda *a, dtype="auto": seen.append(dtype) or {})
    cfg = EvalConfig(lm_eval_tasks=["niah_single_1"], lm_eval_limit=1)
    for precision in ("bf16", "fp32"):
        add_external(EvalResult(None, None, None, {}), MODEL_DIR, cfg, [1024], tmp_path, precision=precision)
    assert seen == ["bfloat16", "auto"]


def test_the_default_extend_report_carries_the_external_suite_or_says_why_not(tmp_path, micro_model_dir,
                                                                            monkeypatch):
    """Unless told otherwise, `extend` asks lm-eval's RULER tasks at a quarter of the target and at the target; when
    lm-eval's environment cannot be built (no package index) the run still finishes and the report says why."""
    from ctxstretch import extend
    from ctxstretch.eval import lmeval_ruler
    from ctxstretch.eval.venv import IndexUnreachable
    from ctxstretch.recipes.extend import EXTERNAL_TASKS, ExtendConfig, resolve_extend

    tiny = {"lengths": [256], "depths": [0.5], "trials": 1, "needle": False, "loss_rows": 0, "short_rows": 0,
            "heldout_depths": [0.5], "heldout_trials": 1}
    cfg = ExtendConfig(model=str(micro_model_dir), target=4096, train_length=64, mix={"text": 1.0},
                       train={"steps": 0, "device": "cpu"}, eval=tiny)
    resolved, rule = resolve_extend(cfg)
    ev = resolved.eval
    assert (tuple(ev.lm_eval_tasks), ev.lm_eval_lengths, ev.lm_eval_optional) == (EXTERNAL_TASKS, [1024, 4096], True)
    assert "lm-eval RULER" in rule
    assert resolve_extend(cfg.model_copy(update={"target": 512}))[0].eval.lm_eval_tasks == []  # below the floor

    def unreachable():
        raise IndexUnreachable("the lm-eval environment could not be built: the package index is unreachable")

    monkeypatch.setattr(lmeval_ruler, "ensure_env", unreachable)
    report = extend(config=cfg, out=tmp_path / "run").read_text()
    assert "## External suite: lm-evaluation-harness RULER" in report
    assert "Not run: the lm-eval environment could not be built" in report
    with pytest.raises(IndexUnreachable):  # asked for explicitly: a one-line error before anything runs
        lmeval_ruler.prepare(["niah_single_1"], [1024], optional=False)
