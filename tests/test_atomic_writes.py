"""A write that fails half-way (a full disk) leaves the last good checkpoint loadable, never a directory that looks
finished but is not, and reaches the user as one line naming the path (exit code 2)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers.modeling_utils
from safetensors.torch import load_file
from typer.testing import CliRunner

from ctxstretch import models
from ctxstretch.atomic import DiskFullError
from ctxstretch.cli import app
from ctxstretch.config import TrainConfig
from ctxstretch.data.mix import RowMixer
from ctxstretch.train import checkpoints
from ctxstretch.train.checkpoints import checkpoint_state, latest_checkpoint, plain_state_dict
from ctxstretch.train.loop import train_stage
from tests.conftest import micro_llama

runner = CliRunner()
# how a full disk reads from the writers: an OSError, or safetensors' Rust error text
FULL = {"oserror": lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
        "rust-text": lambda: RuntimeError('IoError(Os { code: 28, kind: StorageFull, message: "No space left on '
                                          'device" })')}


def failing(real, when, error):
    """`real`, except that it raises `error()` on the calls for which `when(*args)` holds (having written nothing)."""

    def f(*args, **kwargs):
        if when(*args):
            raise error()
        return real(*args, **kwargs)

    return f


def one_error_line(result) -> str:
    """The one `error: …` line, the last of the output (progress notes may precede it)."""
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert [ln for ln in lines if ln.startswith("error")] == lines[-1:] and lines[-1].startswith("error: "), lines
    return lines[-1]


def _rows(tokenizer):
    stream = np.random.default_rng(0).integers(0, len(tokenizer), 20000).astype(np.uint16)
    return RowMixer(tokenizer, stream, name="t", seed=0, length=32, batch=2, mix={"text": 1}, positions="full",
                    target=64, contiguous_share=1.0)


CFG = TrainConfig(steps=4, batch_size=2, lr=1e-3, warmup_steps=1, checkpoint_every=2, log_every=1, precision="fp32")


def _at_step_4(*args) -> bool:
    return any(isinstance(a, str | os.PathLike) and "step-4" in str(a) for a in args)


@pytest.mark.parametrize("writer", ["weights", "optimizer", "rename"])
@pytest.mark.parametrize("kind", list(FULL))
def test_full_disk_mid_checkpoint_keeps_the_last_good_one(tmp_path, tokenizer, monkeypatch, writer, kind):
    rows = _rows(tokenizer)
    if writer == "weights":
        monkeypatch.setattr(checkpoints, "save_file", failing(checkpoints.save_file, _at_step_4, FULL[kind]))
    elif writer == "optimizer":
        monkeypatch.setattr(torch, "save", failing(torch.save, _at_step_4, FULL[kind]))
    else:
        monkeypatch.setattr(os, "replace", failing(os.replace, _at_step_4, FULL[kind]))
    run = tmp_path / "run"
    with pytest.raises(DiskFullError, match="step-4: disk full"):
        train_stage(micro_llama(tokenizer), rows, CFG, run)
    monkeypatch.undo()

    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]  # no step-4, no step-4.tmp
    last = latest_checkpoint(run)
    assert checkpoint_state(last)["step"] == 2
    assert set(load_file(last / "model.safetensors")) == set(micro_llama(tokenizer).state_dict())
    resumed = train_stage(micro_llama(tokenizer), rows, CFG, run, resume=True)
    straight = train_stage(micro_llama(tokenizer), rows, CFG, tmp_path / "straight")
    a, b = plain_state_dict(resumed), plain_state_dict(straight)
    assert all(torch.equal(a[k], b[k]) for k in a), "the run resumed after the failure differs"


def test_full_disk_mid_model_save_keeps_the_old_model_and_no_half_directory(tmp_path, tokenizer, monkeypatch):
    out = tmp_path / "model"
    models.save(micro_llama(tokenizer), tokenizer, out)
    before = load_file(out / "model.safetensors")
    model = micro_llama(tokenizer, layers=1)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file",
                        failing(transformers.modeling_utils.safe_save_file, lambda *a: True, FULL["oserror"]))
    with pytest.raises(DiskFullError, match="model: disk full"):
        models.save(model, tokenizer, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no model.tmp with config.json and no weights
    after = load_file(out / "model.safetensors")
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)


def test_full_disk_mid_dataset_write_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import datasets

    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"document number {i}. " * 20}) + "\n" for i in range(20)))
    out = tmp_path / "ds"
    real = datasets.Dataset.save_to_disk

    def half_then_full(self, path, *args, **kwargs):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "state.json").write_text("{")  # a folder half-written when the disk fills
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", half_then_full)
    line = one_error_line(runner.invoke(app, ["data", "pack", str(src), "--length", "32", "--out", str(out)]))
    assert f"{out}: disk full" in line and "free some space" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]  # no ds, no ds.tmp

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", real)  # a good dataset, then a failed --force over it
    assert runner.invoke(app, ["data", "pack", str(src), "--length", "32", "--out", str(out)]).exit_code == 0
    rows = datasets.load_from_disk(str(out))["input_ids"]
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", half_then_full)
    one_error_line(runner.invoke(app, ["data", "pack", str(src), "--length", "16", "--force", "--out", str(out)]))
    assert datasets.load_from_disk(str(out))["input_ids"] == rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "ds"]


def test_extend_full_disk_at_the_model_then_resume(tmp_path, micro_model_dir, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {micro_model_dir}\ntarget: 256\ntrain_length: 64\nmix: {{text: 1}}\n"
                   "train: {steps: 2, batch_size: 1, warmup_steps: 0, checkpoint_every: 1, device: cpu}\n"
                   "eval: {lengths: [128], depths: [0.5], trials: 1, needle: false, loss_rows: 0}\n")
    out = tmp_path / "run"
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file",
                        failing(transformers.modeling_utils.safe_save_file, lambda *a: True, FULL["oserror"]))
    line = one_error_line(runner.invoke(app, ["extend", "--config", str(cfg), "--out", str(out)]))
    assert str(out) in line and "/model: disk full" in line
    assert not list(out.rglob("*.tmp")), "a temporary directory was left"
    assert not [d for d in out.rglob("model") if not (d / "model.safetensors").exists()], "a model without weights"
    runs = {c.parent.parent for c in out.rglob("checkpoints/step-*")}
    assert runs, "no checkpoint kept"
    for run in runs:  # the last good checkpoint of each stage loads
        last = latest_checkpoint(run)
        assert checkpoint_state(last)["step"] == 2 and load_file(last / "model.safetensors")

    monkeypatch.undo()
    result = runner.invoke(app, ["extend", "--config", str(cfg), "--out", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    assert (out / "model" / "model.safetensors").exists() and (out / "report.md").exists()
