"""Bad input gets one line naming the problem and the fix, exit code 2, and nothing half-written."""

import json

import pytest
from typer.testing import CliRunner

from ctxstretch.cli import app

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def one_line_error(output: str) -> str:
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    assert "Traceback" not in output
    assert lines and lines[-1].startswith("error:"), output
    return " ".join(lines)


def test_missing_model_dir(tmp_path):
    code, out = run("extend", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert code == 2 and "no such directory" in one_line_error(out)
    assert not (tmp_path / "o").exists()


def test_not_a_model_dir(tmp_path):
    (tmp_path / "m").mkdir()
    code, out = run("extend", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o"))
    assert code == 2 and "no config.json" in one_line_error(out)


def test_model_without_rope(tmp_path):
    m = tmp_path / "gpt2"
    m.mkdir()
    (m / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2}))
    code, out = run("extend", "--model", str(m), "--out", str(tmp_path / "o"))
    assert code == 2 and "no rotary position embedding" in one_line_error(out)


@pytest.mark.parametrize("target", ["64", "32"])
def test_target_not_above_window(tmp_path, micro_model_dir, target):
    code, out = run("extend", "--model", str(micro_model_dir), "--target", target, "--out", str(tmp_path / "o"))
    assert code == 2 and "must be larger than the model's window" in one_line_error(out)
    assert not (tmp_path / "o").exists()


def test_existing_out_is_refused(tmp_path, micro_model_dir):
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    code, out = run("extend", "--model", str(micro_model_dir), "--target", "256", "--out", str(out_dir))
    assert code == 2 and "--resume" in one_line_error(out) and "--force" in out
    assert (out_dir / "keep.txt").read_text() == "mine"


def test_train_length_above_target(tmp_path, micro_model_dir):
    code, out = run("extend", "--model", str(micro_model_dir), "--target", "256", "--train-length", "512",
                    "--out", str(tmp_path / "o"))
    assert code == 2 and "exceeds --target" in one_line_error(out)


def test_unknown_method_and_conflicting_flags(tmp_path, micro_model_dir):
    code, out = run("extend", "--model", str(micro_model_dir), "--target", "256", "--method", "xpos",
                    "--out", str(tmp_path / "o"))
    assert code == 2 and "unknown" in one_line_error(out)
    code, out = run("extend", "--resume", "--force", "--out", str(tmp_path / "o"))
    assert code == 2 and "conflict" in one_line_error(out)


def test_config_typo_suggests_the_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: embedded\ntraget: 4096\n")
    code, out = run("extend", "--config", str(cfg), "--out", str(tmp_path / "o"))
    assert code == 2 and "did you mean 'target'" in one_line_error(out)
    cfg.write_text("train: {stpes: 3}\n")
    code, out = run("extend", "--config", str(cfg), "--out", str(tmp_path / "o"))
    assert code == 2 and "did you mean 'steps'" in one_line_error(out)
    cfg.write_text("model: [unclosed\n")
    code, out = run("extend", "--config", str(cfg), "--out", str(tmp_path / "o"))
    assert code == 2 and "invalid YAML" in one_line_error(out)


def test_remote_code_and_pickled_weights_are_refused(tmp_path, micro_model_dir):
    cfg = json.loads((micro_model_dir / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    (micro_model_dir / "config.json").write_text(json.dumps(cfg))
    code, out = run("extend", "--model", str(micro_model_dir), "--target", "256", "--out", str(tmp_path / "o"))
    assert code == 2 and "--trust-remote-code" in one_line_error(out)


def test_eval_runs_on_any_local_model(tmp_path, micro_model_dir):
    out_dir = tmp_path / "ev"
    result = runner.invoke(app, ["eval", "--model", str(micro_model_dir), "--lengths", "128,256", "--trials", "1",
                                 "--out", str(out_dir)])
    assert result.exit_code == 0, result.output
    data = json.loads((out_dir / "eval.json").read_text())
    assert data["passkey"]["lengths"] == [128, 256] and len(data["passkey"]["acc"]) == 5
    assert (out_dir / "needle.png").exists() and (out_dir / "report.md").exists()
    assert (out_dir / "report.html").read_text().count("data:image/png;base64") >= 3
    code, out = run("eval", "--model", str(micro_model_dir), "--lengths", "1k,x", "--out", str(tmp_path / "e2"))
    assert code == 2 and "not a length" in one_line_error(out)


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
    code, out = run("eval", "--model", str(micro_model_dir), "--ruler", "qa", "--out", str(tmp_path / "e3"))
    assert code == 2 and "unknown task 'qa'" in one_line_error(out)
    code, out = run("report", str(tmp_path / "nothing"), "--out", str(rep))
    assert code == 2 and "no eval.json" in one_line_error(out)


@pytest.mark.parametrize("flag,value,field", [("--steps", "-1", "train.steps"), ("--lr", "0", "train.lr"),
                                              ("--target", "-5", "target"), ("--lora-rank", "-2", "lora_rank"),
                                              ("--device", "tpu", "train.device")])
def test_bad_numbers_name_the_field(tmp_path, flag, value, field):
    code, out = run("extend", flag, value, "--out", str(tmp_path / "o"))
    assert code == 2 and f"field '{field}'" in one_line_error(out)
    assert not (tmp_path / "o").exists()


def test_the_network_guard_is_active():
    import socket

    with pytest.raises(RuntimeError, match="network access attempted"):
        socket.create_connection(("93.184.216.34", 443), timeout=1)


def test_pickled_only_weights_are_refused_without_the_flag(tmp_path, micro_model_dir):
    import torch
    from safetensors.torch import load_file

    state = load_file(micro_model_dir / "model.safetensors")
    (micro_model_dir / "model.safetensors").unlink()
    torch.save(state, micro_model_dir / "pytorch_model.bin")
    code, out = run("extend", "--model", str(micro_model_dir), "--target", "256", "--out", str(tmp_path / "o"))
    assert code == 2 and "--allow-bin" in one_line_error(out) and "safetensors" in out
    assert not (tmp_path / "o").exists()


def test_allow_bin_loads_pickled_weights_safely(tmp_path, micro_model_dir):
    import torch
    from safetensors.torch import load_file

    state = load_file(micro_model_dir / "model.safetensors")
    (micro_model_dir / "model.safetensors").unlink()
    torch.save(state, micro_model_dir / "pytorch_model.bin")
    from ctxstretch.models import load

    model, _ = load(micro_model_dir, allow_bin=True)
    assert torch.equal(model.state_dict()["model.embed_tokens.weight"], state["model.embed_tokens.weight"])
