"""Keeping packed documents apart in attention, with memory linear in the row length.

Packed documents must never attend to each other, and position gaps (PoSE, LongRecipe) must never be mistaken
for document boundaries (transformers infers "packing" from position resets when no mask is given). Documents are
therefore given explicitly, as per-token `segment_ids` (B, T), and turned into one of:

* plain causal attention (a 2-D all-ones mask: sdpa runs `is_causal`, no mask tensor) when every row holds one
  document — after `attention_segments` has let the unlabelled tail of a row (SFT padding) join the segment
  before it, which changes no loss term;
* `doc_spans`, per-row document slices for the `DOC_ATTENTION` implementation (sdpa run per document, causal;
  memory O(T)), when the model runs it and rows hold several documents as contiguous runs;
* a dense (B, 1, T, T) mask otherwise (eager attention, which materialises T × T scores anyway; flex; or
  segment ids that recur non-contiguously).

Why not flex attention's BlockMask: in torch 2.13 `flex_attention` raises "FlexAttention does not support backward
on CPU", so it cannot train here; and `create_block_mask` without compilation evaluates the mask densely.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .data.probes import IGNORE

DOC_ATTENTION = "sdpa_documents"
Spans = list[list[tuple[int, int]]]


def document_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, doc_spans: Spans | None = None,
                       **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention function registered as `DOC_ATTENTION`: plain sdpa, or causal sdpa run document by document.

    query (B, H, T, D), key/value (B, Hkv, T, D); returns (B, T, H, D). Without `doc_spans` this is exactly
    transformers' sdpa. With `doc_spans` (row b's documents as [start, end) slices covering 0..T), each document
    attends causally to itself only — the same result as a block-diagonal causal mask, without a T × T tensor."""
    if doc_spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None:
        raise ValueError("doc_spans replaces the attention mask; pass a 2-D all-ones attention_mask with it")
    kwargs.pop("is_causal", None)
    rows = []
    for b, spans in enumerate(doc_spans):
        parts = [sdpa_attention_forward(module, query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                        None, is_causal=True, **kwargs)[0] for s, e in spans]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, 1))
    return (rows[0] if len(rows) == 1 else torch.cat(rows, 0)), None


AttentionInterface.register(DOC_ATTENTION, document_attention)
AttentionMaskInterface.register(DOC_ATTENTION, sdpa_mask)


def attention_segments(segment_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Segment ids (B, T) for attention: the row's tail after its last label joins the segment before it.

    With u the last position carrying a label (labels (B, T) aligned with the inputs, u ≥ 1), the loss reads the
    outputs at positions < u only, and those attend to keys < u: whatever tokens ≥ u attend to changes no loss
    term. So trailing padding (its own segment, label IGNORE) merges into the last document and a
    one-document-plus-padding row becomes a single segment. A row without labels becomes one segment."""
    if labels is None:
        return segment_ids
    t = segment_ids.shape[1]
    idx = torch.arange(t, device=segment_ids.device).expand_as(segment_ids)
    has = (labels != IGNORE) & (idx >= 1)
    last = torch.where(has, idx, torch.zeros_like(idx)).amax(1, keepdim=True)  # 0 when the row has no label
    keep = segment_ids.gather(1, (last - 1).clamp(min=0))
    return torch.where(idx >= last, keep, segment_ids)


def document_spans(segment_ids: torch.Tensor) -> Spans | None:
    """Per row, the [start, end) runs of equal segment id, or None when some id recurs after a different one."""
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    t = segment_ids.shape[1]
    spans: Spans = []
    for b in range(segment_ids.shape[0]):
        cuts = [0, *(torch.nonzero(change[b]).flatten() + 1).tolist(), t]
        if len(cuts) - 1 != int(torch.unique(segment_ids[b]).numel()):
            return None
        spans.append(list(zip(cuts[:-1], cuts[1:], strict=True)))
    return spans


def single_segment(segment_ids: torch.Tensor) -> bool:
    """True when every row (B, T) holds one segment."""
    return bool((segment_ids == segment_ids[:, :1]).all())


def attention_mask_for(segment_ids: torch.Tensor, attn_implementation: str = "sdpa",
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense mask for `model(..., attention_mask=...)` given per-token document ids, shape (B, T).

    Rows holding one document get a 2-D all-ones mask (plain causal attention, the fast path). Otherwise a 4-D
    mask (B, 1, T, T) where token q may attend to token k iff k <= q and both belong to the same document:
    boolean for sdpa/flex, additive float (0 or the dtype's minimum) for eager — eager adds a 4-D mask to the
    scores as it is, so a boolean one would silently mask nothing. O(T²) memory: see `attention_inputs`."""
    if single_segment(segment_ids):
        return torch.ones_like(segment_ids, dtype=torch.long)
    t = segment_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = ((segment_ids[:, :, None] == segment_ids[:, None, :]) & causal)[:, None]
    if attn_implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed,
                                                                                         torch.finfo(dtype).min)
    return allowed


def _implementation(model: torch.nn.Module) -> str:
    return getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"


def mask_for_model(model: torch.nn.Module, segment_ids: torch.Tensor) -> torch.Tensor:
    """`attention_mask_for` with the model's attention implementation and dtype (the dense reference path)."""
    return attention_mask_for(segment_ids, _implementation(model), next(model.parameters()).dtype)


def attention_inputs(model: torch.nn.Module, segment_ids: torch.Tensor,
                     labels: torch.Tensor | None = None) -> dict[str, Any]:
    """Keyword arguments for `model(...)` that keep the documents of `segment_ids` (B, T) apart.

    `labels` (B, T), when given, lets unlabelled row tails join the segment before them (`attention_segments`).
    Returns {"attention_mask": (B, T) ones} for single-document rows; adds "doc_spans" for multi-document rows
    when the model runs `DOC_ATTENTION` (see `use_document_attention`); else the dense mask of `attention_mask_for`
    for the model's attention implementation and dtype."""
    seg = attention_segments(segment_ids, labels)
    ones = torch.ones_like(seg, dtype=torch.long)
    if single_segment(seg):
        return {"attention_mask": ones}
    impl = _implementation(model)
    if impl == DOC_ATTENTION:
        spans = document_spans(seg)
        if spans is not None:
            return {"attention_mask": ones, "doc_spans": spans}
        impl = "sdpa"  # DOC_ATTENTION without spans is plain sdpa: its dense mask is sdpa's
    return {"attention_mask": attention_mask_for(seg, impl, next(model.parameters()).dtype)}


def use_document_attention(model: torch.nn.Module) -> str | None:
    """Switch a model running sdpa to `DOC_ATTENTION` (identical unless `doc_spans` is passed); return the
    implementation to restore with `model.set_attn_implementation`, or None when nothing was changed.

    Set for a whole stage, not per forward: gradient checkpointing re-runs the attention during backward."""
    if _implementation(model) != "sdpa":
        return None
    model.set_attn_implementation(DOC_ATTENTION)
    return "sdpa"
