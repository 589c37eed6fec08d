"""The LM head and cross-entropy in chunks of tokens, so a row's full-vocabulary fp32 logits never exist at once.

Training (`chunked_weighted_loss`) runs each chunk under `torch.utils.checkpoint`: its logits are dropped after
the forward and recomputed in backward, so memory is O(chunk × V) for the logits plus O(T × d) for the hidden
states, whatever the row length. Only tokens with a non-zero loss weight go through the head (SFT rows with a
short answer cost almost nothing). The head is called as a module, so tied embeddings and a LoRA-wrapped
`lm_head` work as in the model's own forward.

Why not a library: `cut-cross-entropy` 25.1 needs `triton` (its compiled CCE kernels are CUDA-only) and its CPU
fallback is a `torch.compile`d "logits = e @ c.T; cross_entropy" over all tokens at once, which leaves the memory
to inductor's fusion and costs a compile per shape; `liger-kernel` is Triton/GPU only (it stays available on GPU
as `fused_loss: liger`). This checkpointed chunk loop is exact, small and runs everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data.probes import IGNORE

CHUNK_TOKENS = 2048


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, target: torch.Tensor,
                weight: torch.Tensor) -> torch.Tensor:
    """Σ weight · cross-entropy for hidden (N, d), target (N,), weight (N,); logits (N, V) in fp32 as the model's."""
    logits = head(hidden).float()
    return (F.cross_entropy(logits, target, reduction="none") * weight).sum()


def chunked_weighted_loss(head: torch.nn.Module, hidden: torch.Tensor, shifted: torch.Tensor, weights: torch.Tensor,
                          chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """Σ weights · cross-entropy(head(hidden), shifted) — `train.loop.weighted_loss` without whole-row logits.

    hidden (B, T, d): the decoder's final (normed) hidden states; shifted (B, T): the token predicted at each
    position (IGNORE where none); weights (B, T) fp32 per-token loss weights (zero where shifted is IGNORE).
    Returns a scalar; gradients reach `hidden` and the head's parameters."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    keep = torch.nonzero((shifted.reshape(-1) != IGNORE) & (weights.reshape(-1) != 0)).flatten()
    if keep.numel() == 0:
        return hidden.sum() * 0.0
    h, y, w = flat.index_select(0, keep), shifted.reshape(-1)[keep], weights.reshape(-1)[keep].float()
    total = None
    for s in range(0, len(keep), chunk_tokens):
        part = slice(s, s + chunk_tokens)
        if torch.is_grad_enabled():
            loss = checkpoint(_chunk_loss, head, h[part], y[part], w[part], use_reentrant=False)
        else:
            loss = _chunk_loss(head, h[part], y[part], w[part])
        total = loss if total is None else total + loss
    return total


def chunked_token_losses(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                         chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """Per-token cross-entropy (B, N) of head(hidden) against targets (B, N), N tokens at a time in chunks; for
    evaluation under `no_grad` (hidden (B, N, d)). Values equal `F.cross_entropy` on the full fp32 logits."""
    out = []
    for s in range(0, hidden.shape[1], chunk_tokens):
        logits = head(hidden[:, s:s + chunk_tokens]).float()
        out.append(F.cross_entropy(logits.transpose(1, 2), targets[:, s:s + chunk_tokens], reduction="none"))
    return torch.cat(out, 1)


def supports_chunked_head(model: torch.nn.Module) -> bool:
    """True when logits are `lm_head(last hidden state)` and nothing more (no softcapping or logit scale)."""
    cfg, heads = getattr(model, "config", None), getattr(model, "get_output_embeddings", None)
    if cfg is None or heads is None or heads() is None:  # e.g. a DDP wrapper: the plain path
        return False
    return not getattr(cfg, "final_logit_softcapping", None) and getattr(cfg, "logit_scale", None) in (None, 1, 1.0)


def final_hidden(model: torch.nn.Module, **inputs) -> torch.Tensor:
    """The decoder's final normed hidden states (B, T, d) from `model(**inputs)` without computing logits.

    Goes through the (possibly DDP/FSDP/peft-wrapped) model's own forward, asking for no logits (an empty
    `logits_to_keep`) and for the hidden states, whose last entry is the normed final state in transformers ≥ 5."""
    out = model(**inputs, use_cache=False, output_hidden_states=True,
                logits_to_keep=torch.zeros(0, dtype=torch.long, device=inputs["input_ids"].device))
    return out.hidden_states[-1]
