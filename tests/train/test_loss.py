import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ctxstretch.config import TrainConfig
from ctxstretch.eval.perplexity import token_losses
from ctxstretch.masking import mask_for_model
from ctxstretch.train.loop import train_stage
from ctxstretch.train.lora import with_lora
from ctxstretch.train.loss import (
    chunked_token_losses,
    chunked_weighted_loss,
    final_hidden,
    supports_chunked_head,
    token_weights,
    weighted_loss,
)
from tests.conftest import micro_llama


def _batch(seed: int = 0, b: int = 3, t: int = 40) -> dict[str, torch.Tensor]:
    """Rows with a text row, an SFT row (labels on a short answer, then padding) and a row without labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 4000, (b, t), generator=g)
    labels = ids.clone()
    labels[1, :25], labels[1, 30:] = -100, -100
    labels[2] = -100
    seg = torch.zeros(b, t, dtype=torch.long)
    seg[1, 30:] = 1
    pos = torch.arange(t).repeat(b, 1)
    pos[0, 20:] += 100  # a position gap
    return {"input_ids": ids, "labels": labels, "segment_ids": seg, "position_ids": pos}


def _plain_and_chunked(model, head, batch, chunk_tokens: int):
    shifted, weights = token_weights(batch["labels"])
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
              "attention_mask": mask_for_model(model, batch["segment_ids"])}
    plain = weighted_loss(model(**inputs, use_cache=False).logits, shifted, weights)
    plain.backward()
    want = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    chunked = chunked_weighted_loss(head, final_hidden(model, **inputs), shifted, weights, chunk_tokens=chunk_tokens)
    chunked.backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return plain, chunked, want, got


@pytest.mark.parametrize("chunk_tokens", [1, 7, 4096])
def test_chunked_loss_and_gradients_equal_the_plain_loss(tokenizer, chunk_tokens):
    model = micro_llama(tokenizer).train()
    assert model.config.tie_word_embeddings and supports_chunked_head(model)
    plain, chunked, want, got = _plain_and_chunked(model, model.get_output_embeddings(), _batch(), chunk_tokens)
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-5)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-6), k


def test_chunked_loss_with_untied_head_and_bf16_autocast(tokenizer):
    model = micro_llama(tokenizer).train()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untie
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, chunked, want, got = _plain_and_chunked(model, model.lm_head, _batch(1), 16)
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-3)
    assert got["lm_head.weight"].abs().sum() > 0 and got["model.embed_tokens.weight"].abs().sum() > 0


def test_chunked_loss_through_a_lora_model(tokenizer):
    model = with_lora(micro_llama(tokenizer), rank=4, train_embeddings_norms=False).train()
    assert supports_chunked_head(model)
    plain, chunked, want, got = _plain_and_chunked(model, model.get_output_embeddings(), _batch(2), 8)
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-5)
    assert any("lora" in k for k in got) and want.keys() == got.keys()
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-6), k


def test_a_batch_without_labels_has_zero_loss_and_a_graph(tokenizer):
    model = micro_llama(tokenizer)
    labels = torch.full((2, 10), -100)
    shifted, weights = token_weights(labels)
    hidden = final_hidden(model, input_ids=torch.randint(1, 4000, (2, 10)))
    loss = chunked_weighted_loss(model.lm_head, hidden, shifted, weights)
    assert loss.item() == 0.0 and loss.requires_grad


@torch.no_grad()
def test_chunked_token_losses_equal_full_logits(tokenizer):
    model = micro_llama(tokenizer)
    ids = torch.randint(1, 4000, (2, 50))
    logits = model(input_ids=ids).logits.float()
    want = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    hidden = final_hidden(model, input_ids=ids, attention_mask=torch.ones_like(ids))
    got = chunked_token_losses(model.lm_head, hidden[:, :-1], ids[:, 1:], chunk_tokens=8)
    assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    stream = np.random.default_rng(0).integers(1, 4000, 200)
    per_token = token_losses(model, stream, 50, rows=4, batch_size=2)
    rows = torch.tensor(stream[:200].reshape(4, 50))
    plain = F.cross_entropy(model(input_ids=rows).logits.float()[:, :-1].transpose(1, 2), rows[:, 1:],
                            reduction="none")
    assert np.allclose(per_token, plain.numpy(), rtol=1e-5, atol=1e-6)


def test_train_stage_loss_equals_the_plain_loss(tmp_path, tokenizer):
    """The first logged loss of a stage (chunked head, merged padding) equals the plain loss of its first batch."""
    model = micro_llama(tokenizer)
    batch = _batch(3)
    shifted, weights = token_weights(batch["labels"])
    want = weighted_loss(copy.deepcopy(model)(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                              attention_mask=mask_for_model(model, batch["segment_ids"])).logits,
                         shifted, weights).item()
    cfg = TrainConfig(steps=1, batch_size=3, lr=1e-3, warmup_steps=0, log_every=1, precision="fp32", device="cpu")
    trained = train_stage(model, lambda i: batch, cfg, tmp_path)
    got = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
    assert trained.config._attn_implementation == "sdpa", "the stage restores the model's attention"


@pytest.mark.parametrize("checkpointing", [False, True])
def test_one_packed_step_equals_a_plain_dense_mask_step(tmp_path, tokenizer, checkpointing):
    """A packed row (per-document attention), an SFT row (merged padding) and the chunked head give the weights
    of one plain step: dense block-diagonal mask, full logits, AdamW — with and without gradient checkpointing
    (which re-runs the attention in backward)."""
    from ctxstretch.train.loop import param_groups

    batch = _batch(4)
    batch["segment_ids"][0, 15:] = 1
    batch["position_ids"][0, 15:] = torch.arange(25)
    batch["labels"][0, 15] = -100
    cfg = TrainConfig(steps=1, batch_size=3, lr=1e-3, warmup_steps=0, log_every=1, precision="fp32", device="cpu",
                      gradient_checkpointing=checkpointing)
    model = micro_llama(tokenizer)
    manual = copy.deepcopy(model).train()
    trained = train_stage(model, lambda i: batch, cfg, tmp_path)

    opt = torch.optim.AdamW(param_groups(manual, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    shifted, weights = token_weights(batch["labels"])
    logits = manual(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                    attention_mask=mask_for_model(manual, batch["segment_ids"]), use_cache=False).logits
    weighted_loss(logits, shifted, weights).backward()
    torch.nn.utils.clip_grad_norm_(manual.parameters(), cfg.grad_clip)
    opt.step()
    for (k, v), (_, w) in zip(trained.state_dict().items(), manual.state_dict().items(), strict=True):
        assert torch.allclose(v, w, atol=1e-6), k
