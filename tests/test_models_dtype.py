"""Weights in bf16 where that is exact enough: evaluation in bf16 holds bf16 weights (a copy when the model is
still being trained), and a saved directory carries the dtype the model was trained in, loadable by plain
transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from ctxstretch.models import eval_dtype, in_dtype, load, resolve, save
from ctxstretch.train.loss import chunked_token_losses, final_hidden


def test_bf16_copy_leaves_the_trained_model_alone(tokenizer):
    from tests.conftest import micro_llama

    model = micro_llama(tokenizer)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy = in_dtype(model, eval_dtype("bf16"))
    assert copy.dtype == torch.bfloat16 and copy.config.dtype == torch.bfloat16 and model.dtype == torch.float32
    assert copy.lm_head.weight is copy.model.embed_tokens.weight
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert in_dtype(model, eval_dtype("fp32")) is model and in_dtype(copy, torch.bfloat16) is copy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_directory_carries_the_trained_dtype(tmp_path, dtype):
    model, tokenizer = load(resolve("embedded"))
    trained = in_dtype(model, dtype)
    trained.config.dtype = torch.float32  # as a model gathered from shards into an fp32 skeleton would say
    out = save(trained, tokenizer, tmp_path / "model")
    assert trained.config.dtype == torch.float32  # saving leaves the caller's model as it was
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    assert json.loads((out / "config.json").read_text())["dtype"] == name
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {{"float32": "F32", "bfloat16": "BF16"}[name]}
    back = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, its own defaults
    assert back.dtype == dtype
    x = torch.arange(1, 33)[None]
    with torch.no_grad():
        assert torch.equal(back(x).logits, trained(x).logits)


def test_bf16_weights_evaluate_within_one_percent_of_fp32_under_autocast():
    """The embedded model's mean token loss over 1,024 tokens of README prose: bf16 weights against fp32 weights
    under bf16 autocast (what evaluation ran before)."""
    model, tokenizer = load(resolve("embedded"))
    text = (Path(__file__).parents[1] / "README.md").read_text()
    ids = torch.tensor(tokenizer(text)["input_ids"][:1025])[None]
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def mean_loss(m: torch.nn.Module) -> float:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return float(chunked_token_losses(m.lm_head, final_hidden(m, input_ids=inputs), targets).mean())

    fp32, bf16 = mean_loss(model), mean_loss(in_dtype(model, torch.bfloat16))
    assert abs(bf16 - fp32) / fp32 < 0.01, (fp32, bf16)
