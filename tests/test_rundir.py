"""The run directory's layout is spelled in one place, and what the pipeline writes is where RunDir says."""

from __future__ import annotations

import json
from pathlib import Path

from ctxstretch.rundir import CompareDir, RunDir


def test_paths_of_a_run_directory(tmp_path):
    run = RunDir(str(tmp_path))
    assert run.root == tmp_path
    assert [run.config, run.metrics, run.report, run.report_html, run.model, run.cache] == [
        tmp_path / n for n in ("config.yaml", "metrics.jsonl", "report.md", "report.html", "model", "cache")]
    assert run.base.json == tmp_path / "base" / "eval.json"
    assert run.extended.partial == tmp_path / "extended" / "heldout.partial.json"
    sd = run.stage("cpt")
    assert sd.root == tmp_path / "stages" / "cpt" and sd.name == "cpt"
    assert [sd.model, sd.data, sd.checkpoints, sd.metrics, sd.done] == [
        sd.root / n for n in ("model", "data", "checkpoints", "metrics.jsonl", "done.json")]
    assert sd.eval.lm_eval == sd.root / "eval" / "lm-eval"
    assert run.dataset("@qa-data") == tmp_path / "stages" / "qa-data" / "data"
    assert run.dataset("/some/dir") == Path("/some/dir") and run.dataset(None) is None


def test_finished_and_evaluated_stages_are_read_back_by_name(tmp_path):
    run = RunDir(tmp_path)
    for name in ("sft", "cpt-1024", "cpt"):
        run.stage(name).root.mkdir(parents=True)
        run.stage(name).done.write_text(json.dumps({"stage": name}))
    run.stage("half").root.mkdir()  # not finished
    run.stage("cpt").eval.root.mkdir()
    run.stage("cpt").eval.json.write_text("{}")
    assert [s.name for s in run.finished_stages()] == ["cpt", "cpt-1024", "sft"]
    assert [s.summary()["stage"] for s in run.finished_stages()] == ["cpt", "cpt-1024", "sft"]
    assert [s.name for s in run.evaluated_stages()] == ["cpt"]
    assert not run.finished
    run.extended.root.mkdir()
    run.extended.json.write_text("{}")
    assert run.finished


def test_a_comparison_shares_one_base_evaluation(tmp_path):
    cmp = CompareDir(tmp_path)
    assert cmp.base.root == tmp_path / "base" and cmp.table == tmp_path / "compare.md"
    assert cmp.run("longrecipe") == RunDir(tmp_path / "longrecipe")


def test_the_pipeline_writes_where_rundir_says(tmp_path):
    """A training-free pipeline's run directory, checked through RunDir's names."""
    from ctxstretch.recipes import pipeline_from
    from ctxstretch.recipes.pipeline import Run

    tiny = {"lengths": [256, 512], "depths": [0.5], "trials": 1, "heldout_trials": 1, "heldout_depths": [0.5],
            "loss_rows": 1, "short_rows": 1, "needle": False, "chat": False}
    cfg = pipeline_from({"recipe": "yarn-free", "target": 512, "eval": tiny}, "x", lambda model: 256)
    run = RunDir(tmp_path / "run")
    assert Run(cfg, run.root).execute() == run.report
    for path in (run.config, run.metrics, run.report, run.report_html, run.model / "config.json", run.base.json,
                 run.extended.json):
        assert path.exists(), path
    assert not run.cache.exists() and not run.extended.partial.exists()
