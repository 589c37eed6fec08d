import json

import numpy as np
import pytest
import torch

from ctxstretch.config import TrainConfig
from ctxstretch.data.mix import RowMixer
from ctxstretch.train.checkpoints import latest_checkpoint
from ctxstretch.train.loop import lr_lambda, train_stage
from ctxstretch.train.loss import row_mean_loss
from tests.conftest import micro_llama


def rows(tokenizer, positions="longrecipe"):
    stream = np.random.default_rng(0).integers(0, len(tokenizer), 20000).astype(np.uint16)
    return RowMixer(tokenizer, stream, name="t", seed=0, length=48, batch=2,
                    mix={"text": 1, "random_copy": 1}, positions=positions, target=256, contiguous_share=0.3)


def cfg(**kw):
    base = dict(steps=6, batch_size=2, lr=1e-3, warmup_steps=2, checkpoint_every=3, log_every=1, precision="fp32")
    return TrainConfig(**{**base, **kw})


def test_rows_are_a_pure_function_of_the_index(tokenizer):
    r = rows(tokenizer)
    a, b = r(5), r(5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(r(5)["input_ids"], r(6)["input_ids"])
    assert int(r(5)["position_ids"].max()) < 256


def test_loss_falls_and_metrics_are_written(tmp_path, tokenizer):
    model = micro_llama(tokenizer)
    r = rows(tokenizer, positions="full")
    first = row_mean_loss(model(input_ids=r(0)["input_ids"]).logits, r(0)["labels"]).item()
    model = train_stage(model, lambda i: r(0), cfg(steps=15), tmp_path)
    after = row_mean_loss(model(input_ids=r(0)["input_ids"]).logits, r(0)["labels"]).item()
    assert after < first - 0.5
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 16))


def test_resume_after_a_crash_is_exact(tmp_path, tokenizer):
    r = rows(tokenizer)
    straight = train_stage(micro_llama(tokenizer), r, cfg(), tmp_path / "a")

    def crashing(i):
        if i == 4:
            raise RuntimeError("simulated kill")
        return r(i)

    with pytest.raises(RuntimeError):
        train_stage(micro_llama(tokenizer), crashing, cfg(), tmp_path / "b")
    assert latest_checkpoint(tmp_path / "b").name == "step-3"
    resumed = train_stage(micro_llama(tokenizer), r, cfg(), tmp_path / "b", resume=True)
    for (k, v), (_, w) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(v, w), k
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


def test_schedule_warms_up_then_decays():
    f = lr_lambda(cfg(steps=100, warmup_steps=10, min_lr_ratio=0.1))
    assert f(0) < f(5) < f(9) <= 1.0
    assert f(10) == pytest.approx(1.0)
    assert f(100) == pytest.approx(0.1)
    assert f(50) > f(90)


def test_stopping_rule_ends_the_stage_and_a_resume_does_not_continue_it(tmp_path, tokenizer):
    r = rows(tokenizer)
    calls = []

    def evaluate(model, step):
        calls.append(step)
        return {"score": float(step)}

    c = cfg(steps=12, eval_every=2, checkpoint_every=5)
    train_stage(micro_llama(tokenizer), r, c, tmp_path, eval_fn=evaluate, stop_when=lambda rec: rec["score"] >= 4)
    assert calls == [2, 4] and latest_checkpoint(tmp_path).name == "step-4"
    train_stage(micro_llama(tokenizer), r, c, tmp_path, resume=True, eval_fn=evaluate,
                stop_when=lambda rec: rec["score"] >= 4)
    assert calls == [2, 4], "a stage that met its stopping rule is not trained further on resume"


@pytest.mark.parametrize("option, package", [({"attn_implementation": "flash_attention_2"}, "flash_attn"),
                                             ({"fused_loss": "liger"}, "liger_kernel")])
def test_gpu_extras_refuse_clearly_when_missing(tmp_path, tokenizer, option, package):
    import importlib.util

    from ctxstretch.config import ConfigError

    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed")
    with pytest.raises(ConfigError, match="pip install"):
        train_stage(micro_llama(tokenizer), rows(tokenizer), cfg(**option), tmp_path)


def test_varlen_positions_must_restart_exactly_at_document_starts():
    from ctxstretch.config import UserError
    from ctxstretch.train.parallel import check_varlen_positions

    seg = torch.tensor([[0, 0, 0, 1, 1, 2]])
    check_varlen_positions(seg, torch.tensor([[0, 1, 2, 0, 1, 0]]))
    check_varlen_positions(seg, torch.tensor([[0, 5, 90, 0, 7, 0]]))  # gaps inside a document are fine
    with pytest.raises(UserError):
        check_varlen_positions(seg, torch.tensor([[0, 1, 2, 3, 4, 0]]))  # a document that never restarts
