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


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (N,) for hidden (N, d), target (N,); logits (N, V) in fp32 as the model's."""
    return F.cross_entropy(head(hidden).float(), target, reduction="none")


def chunked_weighted_loss(head: torch.nn.Module, hidden: torch.Tensor, shifted: torch.Tensor, weights: torch.Tensor,
                          chunk_tokens: int = CHUNK_TOKENS, out_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Σ weights · cross-entropy(head(hidden), shifted) — `weighted_loss` without whole-row logits.

    hidden (B, T, d): the decoder's final (normed) hidden states; shifted (B, T): the token predicted at each
    position (IGNORE where none); weights (B, T) fp32 per-token loss weights (zero where shifted is IGNORE).
    Returns a scalar; gradients reach `hidden` and the head's parameters. out_tokens (B, T), when given, receives
    each scored token's cross-entropy (detached; 0 elsewhere)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    keep = torch.nonzero((shifted.reshape(-1) != IGNORE) & (weights.reshape(-1) != 0)).flatten()
    if keep.numel() == 0:
        return hidden.sum() * 0.0
    h, y, w = flat.index_select(0, keep), shifted.reshape(-1)[keep], weights.reshape(-1)[keep].float()
    total = None
    for s in range(0, len(keep), chunk_tokens):
        part = slice(s, s + chunk_tokens)
        if torch.is_grad_enabled():
            tok = checkpoint(_chunk_loss, head, h[part], y[part], use_reentrant=False)
        else:
            tok = _chunk_loss(head, h[part], y[part])
        if out_tokens is not None:
            out_tokens.view(-1)[keep[part]] = tok.detach()
        loss = (tok * w[part]).sum()
        total = loss if total is None else total + loss
    return total


def row_mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged per row, then over rows with any label, so short answers weigh as much as text.

    logits (B, T, V), labels (B, T) aligned with the inputs (the prediction for token t comes from t-1)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                          reduction="none").view(labels.shape)
    mask = labels != IGNORE
    count = mask.sum(1)
    has = count > 0
    per_row = (tok * mask).sum(1)[has] / count[has]
    return per_row.mean() if has.any() else logits.sum() * 0.0


def token_weights(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(shifted labels, weights), both (B, T), for the loss of one *global* batch.

    shifted[:, t] is the token predicted at position t (IGNORE at the end); weights[r, t] = 1 / (n_r · R), n_r the
    labelled tokens of row r and R the rows with any label, so Σ weights · token loss equals `row_mean_loss`.
    Computed before the batch is split over ranks (rows) and context-parallel ranks (tokens), each rank's weighted
    sum is its exact share of the global loss."""
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], 1)
    mask = shifted != IGNORE
    count = mask.sum(1, keepdim=True)
    rows = int((count > 0).sum())
    return shifted, mask / (count.clamp(min=1) * max(rows, 1))


def weighted_loss(logits: torch.Tensor, shifted: torch.Tensor, weights: torch.Tensor,
                  out_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Σ weights · cross-entropy; logits (B, T, V) predict `shifted` (B, T) position by position.
    out_tokens (B, T), when given, receives each token's cross-entropy (detached; 0 where `shifted` is IGNORE)."""
    tok = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=IGNORE,
                          reduction="none")
    if out_tokens is not None:
        out_tokens.copy_(tok.detach().view(shifted.shape))
    return (tok.view(shifted.shape) * weights).sum()



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
