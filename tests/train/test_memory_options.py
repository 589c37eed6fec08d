"""Memory options of a training step, checked on CPU: flash-attention-2's varlen boundaries built from segment ids
on a flattened micro-batch, activation offload's wiring (and its refusal on a CPU), and the bf16-parameter route's
refusal outside DeepSpeed's bf16 mode. The flash-attention kernel itself runs on a GPU only (`bench/gpu_check.sh`);
here a reference attention that reads the same `cu_seq_lens` stands in for it."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ctxstretch.config import ConfigError, TrainConfig, UserError
from ctxstretch.data.probes import IGNORE
from ctxstretch.masking import use_document_attention
from ctxstretch.train import step as step_module
from ctxstretch.train.loop import run_accelerator, train_stage
from ctxstretch.train.parallel import Layout, local_batch
from ctxstretch.train.step import activation_offload, check_param_dtype, micro_step, varlen_batch
from tests.conftest import micro_llama

VARLEN_REFERENCE = "varlen_reference"


def varlen_reference(module, query, key, value, attention_mask, cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """What flash-attention's varlen kernel computes, on CPU: causal sdpa within each [cu[i], cu[i+1]) of the one
    flattened row. Refuses to run without the boundaries, so a test cannot pass on plain causal attention."""
    assert query.shape[0] == 1 and cu_seq_lens_q is not None and max_length_q is not None
    kwargs.pop("is_causal", None)
    cu = cu_seq_lens_q.tolist()
    parts = [sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None,
                                    is_causal=True, **kwargs)[0] for s, e in zip(cu[:-1], cu[1:], strict=True)]
    return torch.cat(parts, 1), None


AttentionInterface.register(VARLEN_REFERENCE, varlen_reference)


def packed(vocab: int) -> dict[str, torch.Tensor]:
    """Two rows of 24 tokens: row 0 holds documents of 10 and 14 tokens (the second with a position gap of 500
    and not starting at 0), row 1 one document of 16 tokens followed by 8 unlabelled padding tokens."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (2, 24), generator=g)
    seg = torch.tensor([[0] * 10 + [1] * 14, [0] * 16 + [1] * 8])
    pos = torch.stack([torch.cat([torch.arange(10), torch.arange(7) + 3, torch.arange(7) + 510]),
                       torch.arange(24)])
    labels = ids.clone()
    labels[0, [0, 10]] = IGNORE
    labels[1, 0] = IGNORE
    labels[1, 16:] = IGNORE
    return {"input_ids": ids, "labels": labels, "segment_ids": seg, "position_ids": pos}


def test_varlen_boundaries_follow_documents_and_keep_position_gaps():
    rows = packed(100)
    flat, kw = varlen_batch(rows)
    cu = kw["cu_seq_lens_q"]
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 10, 24, 40, 48] and kw["cu_seq_lens_k"] is cu
    assert kw["max_length_q"] == kw["max_length_k"] == 16 and isinstance(kw["max_length_q"], int)
    seg, row = flat["segment_ids"][0], torch.arange(48) // 24
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):  # one (row, document) per sequence
        assert len({(int(r), int(d)) for r, d in zip(row[s:e], seg[s:e], strict=True)}) == 1
    assert torch.equal(flat["position_ids"], rows["position_ids"].reshape(1, 48))  # the gap 9 → 510 is kept
    assert flat["labels"][0, 24] == IGNORE and torch.equal(flat["input_ids"], rows["input_ids"].reshape(1, 48))
    recurring = {**rows, "segment_ids": torch.tensor([[0] * 8 + [1] * 8 + [0] * 8] * 2)}
    with pytest.raises(UserError, match="recurs"):
        varlen_batch(recurring)


def _step(tokenizer, attn: str, cfg: TrainConfig, offload=None) -> tuple[float, list[torch.Tensor]]:
    """One micro_step on `packed` rows; returns the loss and the gradients."""
    torch.manual_seed(0)
    model = micro_llama(tokenizer).train()
    if attn == VARLEN_REFERENCE:
        model.set_attn_implementation(VARLEN_REFERENCE)
    else:
        use_document_attention(model)
    accelerator = Accelerator(cpu=True)
    b = local_batch(packed(len(tokenizer)), Layout(), "cpu")
    loss = micro_step(accelerator, model, model, b, cfg, Layout())
    return loss, [p.grad.clone() for p in model.parameters()]


def test_flash_varlen_step_equals_per_document_sdpa(tokenizer):
    """Two packed rows per process under flash_attention_2: the flattened row with cu_seq_lens gives the loss and
    gradients of sdpa run per document on the rows as they are."""
    want_loss, want = _step(tokenizer, "sdpa", TrainConfig(precision="fp32"))
    flash = TrainConfig(precision="fp32", attn_implementation="flash_attention_2")
    loss, got = _step(tokenizer, VARLEN_REFERENCE, flash)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    assert all(torch.allclose(g, w, atol=1e-6, rtol=1e-4) for g, w in zip(got, want, strict=True))


def test_activation_offload_wraps_the_forward_and_is_refused_on_cpu(tokenizer, tmp_path, monkeypatch):
    """On a GPU the forward runs under torch's save_on_cpu; here a recording saved-tensor hook stands in for it
    (pinned memory needs CUDA): every saved activation goes through it and the gradients are unchanged."""
    on = TrainConfig(precision="fp32", activation_offload=True)
    assert isinstance(activation_offload(on, "cuda"), torch.autograd.graph.save_on_cpu)
    assert isinstance(activation_offload(TrainConfig(), "cuda"), type(activation_offload(TrainConfig(), "cpu")))
    with pytest.raises(ConfigError, match="activation_offload"):
        activation_offload(on, "cpu")
    _, want = _step(tokenizer, "sdpa", TrainConfig(precision="fp32"))
    packed_tensors: list[torch.Size] = []

    def recording(cfg, device):
        assert cfg.activation_offload
        return torch.autograd.graph.saved_tensors_hooks(lambda t: packed_tensors.append(t.shape) or t.cpu(),
                                                        lambda t: t)

    monkeypatch.setattr(step_module, "activation_offload", recording)
    _, got = _step(tokenizer, "sdpa", on)
    assert len(packed_tensors) > 10
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="activation_offload"):
        train_stage(micro_llama(tokenizer), lambda i: packed(len(tokenizer)), TrainConfig(
            steps=1, batch_size=2, device="cpu", activation_offload=True), tmp_path / "run")


def test_bf16_parameters_need_deepspeed_bf16(tmp_path):
    """param_dtype bf16 is refused outside DeepSpeed's bf16 mode (torch's AdamW would keep bf16 state); the
    shipped one-GPU config selects that mode (ZeRO-2, optimizer partitions offloaded to CPU)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    from ctxstretch.train.parallel import accelerate_config

    cfg = TrainConfig(param_dtype="bf16", precision="bf16", device="cpu")
    with pytest.raises(ConfigError, match="deepspeed_bf16"):
        check_param_dtype(cfg, run_accelerator(cfg, "cpu", tmp_path))
    check_param_dtype(TrainConfig(), Accelerator(cpu=True))
    path = accelerate_config("deepspeed_bf16")
    config = load_config_from_file(str(path))
    assert config.mixed_precision == "bf16" and config.num_processes == 1
    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    _validate_launch_command(args)
    assert args.zero_stage == 2 and args.offload_optimizer_device == "cpu"
