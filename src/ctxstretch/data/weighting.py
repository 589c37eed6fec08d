"""Which documents are packed, and how often: long-document upsampling (Llama 2 Long), per-source mixing weights
and unbiased stochastic rounding of the repeat counts, all pure functions of lengths and an explicit numpy RNG."""

from __future__ import annotations

import numpy as np

from .records import DataError


def long_document_weights(lengths: np.ndarray, threshold: int, weight: float) -> np.ndarray:
    """Llama 2 Long (Xiong et al., 2023, §2.2, "long documents upsampled"): sampling weight `weight` for documents of
    at least `threshold` tokens, 1 for the others. lengths (D,) tokens → (D,) float."""
    if weight < 0:
        raise DataError(f"long-document weight {weight} must be ≥ 0")
    w = np.ones(len(lengths), dtype=np.float64)
    if threshold > 0:
        w[np.asarray(lengths) >= threshold] = weight
    return w


def source_multipliers(source_tokens: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per-source repeat factors so that source s makes up `weights[s] / sum(weights)` of the tokens while the total
    stays the same (a factor below 1 subsamples, above 1 repeats). source_tokens, weights (S,) → (S,) float."""
    source_tokens, weights = np.asarray(source_tokens, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    if (weights < 0).any() or weights.sum() <= 0:
        raise DataError("mixing weights must be ≥ 0 with a positive sum")
    if ((source_tokens == 0) & (weights > 0)).any():
        raise DataError("a source with a positive mixing weight has no tokens; drop it or give it weight 0")
    share = weights / weights.sum()
    return np.divide(share * source_tokens.sum(), source_tokens, out=np.zeros_like(share), where=source_tokens > 0)


def sample_counts(weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """How often each item is used: `floor(w)` times plus once more with probability `w - floor(w)` (unbiased
    stochastic rounding). (D,) float → (D,) int64."""
    weights = np.asarray(weights, dtype=np.float64)
    base = np.floor(weights)
    return (base + (rng.random(len(weights)) < weights - base)).astype(np.int64)


def plan_documents(lengths: np.ndarray, sources: np.ndarray, rng: np.random.Generator, *,
                   source_weights: np.ndarray | None = None, long_threshold: int = 0, long_weight: float = 1.0,
                   shuffle: bool = True) -> np.ndarray:
    """The order in which documents are packed: indices into the corpus, repeated or dropped according to the
    long-document weight and the per-source mixing weights (applied to the upsampled token counts), then shuffled.
    lengths, sources (D,) → (D',) int64."""
    lengths = np.asarray(lengths)
    w = long_document_weights(lengths, long_threshold, long_weight)
    if source_weights is not None:
        n_sources = len(source_weights)
        tokens = np.bincount(sources, weights=w * lengths, minlength=n_sources)
        w = w * source_multipliers(tokens, source_weights)[sources]
    order = np.repeat(np.arange(len(lengths)), sample_counts(w, rng))
    return rng.permutation(order) if shuffle else order
