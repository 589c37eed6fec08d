import json

import pytest
import torch
import torch.nn.functional as F

from ctxstretch.config import ConfigError, TrainConfig, parse
from ctxstretch.data.probes import IGNORE
from ctxstretch.train.loop import train_stage
from ctxstretch.train.loss import chunked_weighted_loss, final_hidden, token_weights, weighted_loss
from tests.conftest import micro_llama

T, STRIDE = 64, 32  # one row whose positions skip by 32: 0, 32, …, 2,016 (a LongRecipe-like spread)


def spread_rows(tokenizer):
    ids = torch.randint(0, len(tokenizer), (1, T), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(T)[None] * STRIDE,
             "segment_ids": torch.zeros_like(ids)}
    return lambda i: batch


def cfg(**kw):
    return TrainConfig(**{**dict(steps=2, batch_size=1, lr=1e-3, warmup_steps=0, checkpoint_every=2, log_every=1,
                                 precision="fp32"), **kw})


def test_loss_by_position_buckets_add_up_to_the_step_loss(tmp_path, tokenizer):
    train_stage(micro_llama(tokenizer), spread_rows(tokenizer), cfg(), tmp_path)
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    buckets = first["loss_by_position"]
    assert list(buckets) == ["loss@512", "loss@1K", "loss@2K"]
    # tokens are predicted from positions 0…1,984 (the last token predicts nothing): 16, 16 and 31 per bucket
    counts = {"loss@512": 16, "loss@1K": 16, "loss@2K": 31}
    pooled = sum(buckets[k] * n for k, n in counts.items()) / sum(counts.values())
    assert pooled == pytest.approx(first["loss"], abs=1e-4)
    assert len(set(buckets.values())) == 3  # three different means, not one number copied


@pytest.mark.parametrize("chunked", [False, True])
def test_per_token_losses_leave_the_loss_bitwise_unchanged(tokenizer, chunked):
    model = micro_llama(tokenizer)
    b = spread_rows(tokenizer)(0)
    shifted, weights = token_weights(b["labels"])
    shifted[0, 5] = IGNORE  # an unscored token stays 0
    weights[0, 5] = 0
    out = torch.full_like(weights, -1.0)
    # an all-ones mask, as training passes: transformers would otherwise read the position gaps as document starts
    inputs = {"input_ids": b["input_ids"], "position_ids": b["position_ids"],
              "attention_mask": torch.ones_like(shifted), "use_cache": False}
    if chunked:
        hidden = final_hidden(model, **{k: v for k, v in inputs.items() if k != "use_cache"})
        plain = chunked_weighted_loss(model.lm_head, hidden, shifted, weights, chunk_tokens=16)
        got = chunked_weighted_loss(model.lm_head, hidden, shifted, weights, chunk_tokens=16, out_tokens=out)
        out[weights == 0] = 0  # only scored tokens are written
    else:
        logits = model(**inputs).logits
        plain = weighted_loss(logits, shifted, weights)
        got = weighted_loss(logits, shifted, weights, out_tokens=out)
    assert torch.equal(got, plain)
    logits = model(**inputs).logits.float()
    want = F.cross_entropy(logits[0], shifted[0], ignore_index=IGNORE, reduction="none")
    torch.testing.assert_close(out[0], want, rtol=1e-5, atol=1e-5)
    assert out[0, 5] == 0 and out[0, -1] == 0


def test_tensorboard_receives_what_metrics_jsonl_holds(tmp_path, tokenizer):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_stage(micro_llama(tokenizer), spread_rows(tokenizer), cfg(log_with=["tensorboard"]), tmp_path, name="ext")
    records = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events = list((tmp_path / "logs" / "ext").rglob("events.out.tfevents.*"))
    assert events, "TensorBoard wrote no event file under RUN/logs/<stage>"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert loss == [(r["step"], pytest.approx(r["loss"], abs=1e-5)) for r in records]
    far = [e.value for e in acc.Scalars("loss_by_position/loss@2K")]
    assert far == [pytest.approx(r["loss_by_position"]["loss@2K"], abs=1e-5) for r in records]


def test_an_unknown_or_missing_tracker_is_refused_in_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from ctxstretch.cli import app

    res = CliRunner().invoke(app, ["extend", "--log-with", "tensorbord", "--out", str(tmp_path / "r")])
    assert res.exit_code != 0 and "unknown tracker 'tensorbord'; choose from tensorboard, trackio, wandb" in res.output
    assert not (tmp_path / "r").exists()
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="train: in 'log_with': tracker wandb needs the wandb package: pip install"):
        parse(TrainConfig, {"log_with": ["wandb"]}, "train")
