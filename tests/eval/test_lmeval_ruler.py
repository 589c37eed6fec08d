"""lm-evaluation-harness's RULER tasks as an external suite: the command line, the results parsing, bad input, and
one real offline run on the embedded model (slow: builds lm-eval's own environment on first use)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ctxstretch.cli import app
from ctxstretch.config import ConfigError
from ctxstretch.eval import lmeval_ruler as lr


def test_command_uses_the_local_tokenizer_one_length_and_room_for_the_answer(tmp_path):
    cmd = lr.command(Path("python"), tmp_path / "m", "niah_single_1", 2048, 3, tmp_path / "o", "float32")
    args = cmd[cmd.index("--model_args") + 1]
    assert f"tokenizer={tmp_path / 'm'}" in args and f"max_length={2048 + lr.GEN_MARGIN}" in args
    assert json.loads(cmd[cmd.index("--metadata") + 1]) == {"max_seq_lengths": [2048]}
    assert cmd[cmd.index("--limit") + 1] == "3"


def test_results_are_read_by_length(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"results": {"niah_single_1": {"alias": "niah_single_1", "sample_len": 2,
                                                              "4096,none": -1, "512,none": 0.5,
                                                              "512_stderr,none": 0.1}}}))
    assert lr.parse_results(path, "niah_single_1", 512) == 0.5
    with pytest.raises(ConfigError, match="no score"):
        lr.parse_results(path, "niah_single_1", 4096)  # lm-eval's -1: the length was not run


def test_bad_tasks_and_lengths_are_one_line_errors():
    with pytest.raises(ConfigError, match="choose from"):
        lr.check_tasks(["ruler_qa_squad"], [1024])  # needs a download: not offered
    with pytest.raises(ConfigError, match="≥ 256"):
        lr.check_tasks(["ruler_vt"], [128])


@pytest.mark.slow
def test_eval_runs_an_lm_eval_ruler_task_offline(tmp_path):
    out = tmp_path / "ev"
    result = CliRunner().invoke(app, ["eval", "--lengths", "512", "--trials", "1", "--short-rows", "0",
                                      "--lm-eval-tasks", "niah_single_1", "--lm-eval-limit", "1", "--out", str(out)],
                                env={**os.environ})
    assert result.exit_code == 0, result.output
    data = json.loads((out / "eval.json").read_text())
    score = data["external_ruler"]["niah_single_1"]["512"]
    assert 0.0 <= score <= 1.0
    report = (out / "report.md").read_text()
    assert "## External suite: lm-evaluation-harness RULER" in report and "niah_single_1 @ 512" in report
