"""Attention masks built explicitly, so packed documents never attend to each other and position gaps
(PoSE, LongRecipe) are never mistaken for document boundaries (transformers infers "packing" from position
resets when no mask is given)."""

from __future__ import annotations

import torch


def attention_mask_for(segment_ids: torch.Tensor, attn_implementation: str = "sdpa",
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Mask for `model(..., attention_mask=...)` given per-token document ids, shape (B, T).

    Rows holding one document get a 2-D all-ones mask (plain causal attention, the fast path). Otherwise a 4-D
    mask (B, 1, T, T) where token q may attend to token k iff k <= q and both belong to the same document:
    boolean for sdpa/flex, additive float (0 or the dtype's minimum) for eager — eager adds a 4-D mask to the
    scores as it is, so a boolean one would silently mask nothing.
    """
    if bool((segment_ids == segment_ids[:, :1]).all()):
        return torch.ones_like(segment_ids, dtype=torch.long)
    t = segment_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = ((segment_ids[:, :, None] == segment_ids[:, None, :]) & causal)[:, None]
    if attn_implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed,
                                                                                         torch.finfo(dtype).min)
    return allowed


def mask_for_model(model, segment_ids: torch.Tensor) -> torch.Tensor:
    """`attention_mask_for` with the model's attention implementation and dtype."""
    impl = getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"
    return attention_mask_for(segment_ids, impl, next(model.parameters()).dtype)
