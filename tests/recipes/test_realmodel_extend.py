"""A real pretrained model through the whole `extend` at a reduced size: SmolLM2-135M-Instruct, two steps of
1,024-token rows carrying positions over 16K, bf16 where native, the derived small LR; the output loads with plain
transformers and keeps the new rope."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from ctxstretch import extend
from ctxstretch.defaults import pretrained_lr
from ctxstretch.hardware import precision_for
from ctxstretch.recipes.extend import ExtendConfig


@pytest.mark.slow
def test_smollm2_extend_smoke(smollm2, tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(4):  # a small user corpus keeps the test fast (the default would tokenise the standard library)
        (texts / f"{i}.txt").write_text(" ".join(f"Chapter {i}, paragraph {j}: the river turned north." for j in
                                                 range(600)))
    cfg = ExtendConfig(model=str(smollm2), target=16384, train_length=1024, text=[str(texts)],
                       train={"steps": 2, "device": "cpu"},
                       eval={"lm_eval_tasks": [], "lengths": [1024], "heldout_depths": [0.5], "heldout_trials": 1,
                             "depths": [0.5], "trials": 1, "needle": False, "loss_rows": 1, "short_rows": 1,
                             "precision": "auto"})
    out = tmp_path / "run"
    report = extend(config=cfg, out=out)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["lr"] == pytest.approx(pretrained_lr(134_515_008), rel=0.01)
    assert saved["train"]["batch_size"] == 1
    assert saved["train"]["gradient_checkpointing"] is False  # 1,024-token rows: inside the 8,192-token window
    assert saved["train"]["precision"] == precision_for("cpu")
    assert saved["mix"] == {"text": 0.7, "cip": 0.2, "text_copy": 0.1}
    rope = json.loads((out / "model" / "config.json").read_text())["rope_parameters"]
    assert rope["rope_theta"] > 1e5  # fixed NTK: a larger base than the original 1e5
    text = report.read_text()
    assert "## Held-out families (headline)" in text and "1,024" in text
    assert "chat questions answered sensibly" in text  # SmolLM2 has a chat template
    model = AutoModelForCausalLM.from_pretrained(out / "model", local_files_only=True)  # no project code needed
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
