"""Attention masks built explicitly, so packed documents never attend to each other and position gaps
(PoSE, LongRecipe) are never mistaken for document boundaries (transformers infers "packing" from position
resets when no mask is given)."""

from __future__ import annotations

import torch


def attention_mask_for(segment_ids: torch.Tensor) -> torch.Tensor:
    """Mask for `model(..., attention_mask=...)` given per-token document ids, shape (B, T).

    Rows holding one document get a 2-D all-ones mask (plain causal attention, the fast path). Otherwise a 4-D
    boolean mask (B, 1, T, T): token q attends to token k iff k <= q and both belong to the same document.
    """
    if bool((segment_ids == segment_ids[:, :1]).all()):
        return torch.ones_like(segment_ids, dtype=torch.long)
    t = segment_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & causal)[:, None]
