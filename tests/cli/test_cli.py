"""The commands run end to end on any local model; nothing reaches the network; pickled weights load only behind
the flag. (Bad input: tests/cli/test_bad_inputs.py.)"""

import json

import pytest
from typer.testing import CliRunner

from ctxstretch.cli import app

runner = CliRunner()


def test_eval_runs_on_any_local_model(tmp_path, micro_model_dir):
    out_dir = tmp_path / "ev"
    result = runner.invoke(app, ["eval", "--model", str(micro_model_dir), "--lengths", "128,256", "--trials", "1",
                                 "--out", str(out_dir)])
    assert result.exit_code == 0, result.output
    data = json.loads((out_dir / "eval.json").read_text())
    assert data["passkey"]["lengths"] == [128, 256] and len(data["passkey"]["acc"]) == 5
    assert (out_dir / "needle.png").exists() and (out_dir / "report.md").exists()
    assert (out_dir / "report.html").read_text().count("data:image/png;base64") >= 3


def test_eval_ruler_tasks_and_report_command(tmp_path, micro_model_dir):
    ev = tmp_path / "ev"
    result = runner.invoke(app, ["eval", "--model", str(micro_model_dir), "--lengths", "300", "--trials", "1",
                                 "--ruler", "niah_multikey,vt", "--out", str(ev)])
    assert result.exit_code == 0, result.output
    data = json.loads((ev / "eval.json").read_text())
    assert set(data["ruler"]) == {"niah_multikey", "vt"} and set(data["ruler"]["vt"]) == {"300"}
    assert "## RULER-style tasks" in (ev / "report.md").read_text()
    rep = tmp_path / "rep"
    result = runner.invoke(app, ["report", str(ev), str(ev), "--out", str(rep)])
    assert result.exit_code == 0, result.output
    assert (rep / "report.html").exists() and "| passkey @ 300 |" in (rep / "report.md").read_text()


def test_the_network_guard_is_active():
    import socket

    with pytest.raises(RuntimeError, match="network access attempted"):
        socket.create_connection(("93.184.216.34", 443), timeout=1)


def test_allow_bin_loads_pickled_weights_safely(tmp_path, micro_model_dir):
    import torch
    from safetensors.torch import load_file

    state = load_file(micro_model_dir / "model.safetensors")
    (micro_model_dir / "model.safetensors").unlink()
    torch.save(state, micro_model_dir / "pytorch_model.bin")
    from ctxstretch.models import load

    model, _ = load(micro_model_dir, allow_bin=True)
    assert torch.equal(model.state_dict()["model.embed_tokens.weight"], state["model.embed_tokens.weight"])


def test_the_guard_turns_user_errors_and_a_full_disk_into_one_line(tmp_path):
    import errno

    import typer

    from ctxstretch.cli.common import guarded
    from ctxstretch.config import ConfigError

    mini = typer.Typer()

    @mini.command()
    @guarded
    def go(what: str = "config") -> None:
        """Fail as asked."""
        if what == "config":
            raise ConfigError("--what: bad [value]")
        if what == "disk":
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "f"))
        if what == "stop":
            raise KeyboardInterrupt
        raise RuntimeError("a bug")

    res = runner.invoke(mini, ["--what", "config"])
    assert (res.exit_code, res.output.strip()) == (2, "error: --what: bad [value]")
    res = runner.invoke(mini, ["--what", "disk"])
    assert res.exit_code == 2 and "f: disk full" in res.output and len(res.output.strip().splitlines()) == 1
    assert runner.invoke(mini, ["--what", "stop"]).exit_code == 130
    assert isinstance(runner.invoke(mini, ["--what", "bug"]).exception, RuntimeError)  # bugs keep their traceback


def test_commands_register_one_way():
    """No command module imports the package that assembles them (only `python -m`'s __main__ does)."""
    from tests.test_imports import import_graph

    graph = import_graph()
    modules = [m for m in graph if m.startswith("ctxstretch.cli.") and m != "ctxstretch.cli.__main__"]
    assert {"ctxstretch.cli.common", "ctxstretch.cli.run", "ctxstretch.cli.evaluate"} <= set(modules)
    assert [m for m in modules if "ctxstretch.cli" in graph[m]] == []


def test_every_builder_argument_is_a_data_flag():
    """`ctxstretch data KIND` takes its builder's argument model: one parameter per field, plus --out and --force."""
    import typer.main

    from ctxstretch.cli.data import data_app
    from ctxstretch.data.builders import REGISTRY

    group = typer.main.get_command(data_app)
    assert set(group.commands) == set(REGISTRY)
    for kind, spec in REGISTRY.items():
        assert {p.name for p in group.commands[kind].params} == {*spec.args.model_fields, "out", "force"}, kind
