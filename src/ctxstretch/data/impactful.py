"""Impactful-token selection (Hu et al., 2024, "LongRecipe", §4.1 and §3.2).

A token is *impactful* when a long-context model predicts it much better than the base model:
`Δ(t) = log p_long(t | x<t) − log p_base(t | x<t)`. Two scorers: two models (a long one and the base), or one model
with full versus truncated context (`LogprobDelta`). The top `share` (20%) of a document's scored tokens are
impactful (choice: the paper's "top 20% per position" is read as a ranking within each scored document).
Documents are split into sentences (`BoundaryVocab`), sentences without an impactful token are dropped, and rows
of `length` tokens are cut from what is left. Without a scorer, the released code's heuristic: keep every sentence
containing a digit and about `other_share` (50%) of the others, at random.

Everything but the scorer is a pure function of token ids and an explicit numpy RNG.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from .sentences import BoundaryVocab

Scorer = Callable[[np.ndarray], np.ndarray]  # ids (n,) → Δ (n,) float, NaN where a token was not scored


def digit_vocab(tokenizer) -> np.ndarray:
    """(vocab,) bool: the token's text contains a digit."""
    n = len(tokenizer)
    return np.fromiter((any(ch.isdigit() for ch in tokenizer.decode([t])) for t in range(n)), dtype=bool, count=n)


def sentence_spans(ends: np.ndarray) -> np.ndarray:
    """(S, 2) [start, end) token spans of the sentences of a document, from its sentence-end mask (n,) (a tail
    without an end is a sentence too)."""
    n = len(ends)
    stops = np.flatnonzero(ends) + 1
    if not len(stops) or stops[-1] != n:
        stops = np.append(stops, n)
    stops = stops[stops > 0] if n else stops[:0]
    starts = np.concatenate([[0], stops[:-1]]).astype(np.int64)
    return np.stack([starts, stops.astype(np.int64)], axis=1) if n else np.zeros((0, 2), dtype=np.int64)


def sentences_with(spans: np.ndarray, marked: np.ndarray) -> np.ndarray:
    """(S,) bool: the sentence contains a marked token; marked (n,) bool."""
    if not len(spans):
        return np.zeros(0, dtype=bool)
    csum = np.concatenate([[0], np.cumsum(marked, dtype=np.int64)])
    return csum[spans[:, 1]] > csum[spans[:, 0]]


def impactful_mask(delta: np.ndarray, share: float = 0.2) -> np.ndarray:
    """(n,) bool: the top `share` (rounded up) of the scored tokens by Δ; NaN (unscored) never; ties broken by
    position (earlier first)."""
    delta = np.asarray(delta, dtype=np.float64)
    scored = np.flatnonzero(np.isfinite(delta))
    k = int(np.ceil(share * len(scored)))
    mask = np.zeros(len(delta), dtype=bool)
    if k:
        mask[scored[np.argsort(-delta[scored], kind="stable")[:k]]] = True
    return mask


def heuristic_keep(ids: np.ndarray, spans: np.ndarray, digits: np.ndarray, rng: np.random.Generator,
                   other_share: float = 0.5) -> np.ndarray:
    """(S,) bool: every sentence with a digit token, and each other sentence with probability `other_share`."""
    has_digit = sentences_with(spans, digits[np.asarray(ids)])
    return has_digit | (rng.random(len(spans)) < other_share)


def scored_keep(ids: np.ndarray, spans: np.ndarray, scorer: Scorer, share: float = 0.2) -> np.ndarray:
    """(S,) bool: the sentence holds at least one impactful token under `scorer`."""
    return sentences_with(spans, impactful_mask(scorer(np.asarray(ids)), share))


def keep_sentences(ids: np.ndarray, spans: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The tokens of the kept sentences, in order."""
    if not len(spans):
        return np.asarray(ids)[:0]
    sel = np.repeat(keep, spans[:, 1] - spans[:, 0])
    return np.asarray(ids)[spans[0, 0] : spans[-1, 1]][sel]


@dataclass
class SelectionStats:
    """What the selection kept: documents, sentences and tokens in and out."""

    documents: int = 0
    sentences: int = 0
    kept_sentences: int = 0
    tokens: int = 0
    kept_tokens: int = 0
    rows: int = 0
    kept_lengths: list[int] = field(default_factory=list)


def impactful_rows(tokenizer, docs: Iterable[np.ndarray], length: int, rng: np.random.Generator,
                   scorer: Scorer | None = None, *, share: float = 0.2, other_share: float = 0.5,
                   boundaries: BoundaryVocab | None = None, digits: np.ndarray | None = None,
                   stats: SelectionStats | None = None) -> Iterator[np.ndarray]:
    """Rows of exactly `length` token ids (int64) from the sentences of `docs` that survive selection.

    docs: token arrays (documents in order; an EOS at the end of each is kept with its last sentence).
    scorer: `scorer(ids (n,)) -> Δ (n,)` (e.g. `LogprobDelta`); tokens in the top `share` of a document's Δ are
    impactful and sentences without one are dropped. None: the digit heuristic (`other_share` of the digit-free
    sentences kept at random). Kept text of consecutive documents is concatenated (documents are separated by
    their EOS, as in LongRecipe's reference code) and cut into rows; a final partial row is dropped.
    `boundaries`/`digits` may be passed to avoid recomputing the vocabulary tables per call; `stats` is filled in.
    """
    if length < 1:
        raise ValueError(f"row length {length} must be positive")
    boundaries = boundaries or BoundaryVocab.from_tokenizer(tokenizer)
    if scorer is None and digits is None:
        digits = digit_vocab(tokenizer)
    stats = stats if stats is not None else SelectionStats()
    buf: list[np.ndarray] = []
    held = 0
    for doc in docs:
        ids = np.asarray(doc, dtype=np.int64)
        if not len(ids):
            continue
        spans = sentence_spans(boundaries.sentence_ends(ids))
        keep = (scored_keep(ids, spans, scorer, share) if scorer is not None
                else heuristic_keep(ids, spans, digits, rng, other_share))
        kept = keep_sentences(ids, spans, keep)
        stats.documents += 1
        stats.sentences += len(spans)
        stats.kept_sentences += int(keep.sum())
        stats.tokens += len(ids)
        stats.kept_tokens += len(kept)
        stats.kept_lengths.append(len(kept))
        if len(kept):
            buf.append(kept)
            held += len(kept)
        if held >= length:
            flat = np.concatenate(buf)
            n_rows = len(flat) // length
            for r in range(n_rows):
                stats.rows += 1
                yield flat[r * length : (r + 1) * length]
            rest = flat[n_rows * length :]
            buf, held = ([rest] if len(rest) else []), len(rest)


# ------------------------------------------------------------------------------------------------------- scoring
def token_logprobs(model, ids: np.ndarray, window: int, score_from: int = 1, stride: int | None = None,
                   batch_size: int = 4) -> np.ndarray:
    """(n,) float64 log p(ids[t] | context) with the context cut to windows of `window` tokens starting every
    `stride` (default: `window`, non-overlapping) tokens; in each window after the first only positions from
    `window - stride` on are scored, so every scored token sees at least `window - stride` tokens of context
    (`score_from` tokens in the first window). NaN where a token has no score (position 0)."""
    import torch

    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    stride = stride or window
    out = np.full(n, np.nan)
    starts = list(range(0, max(1, n - window + stride), stride)) or [0]
    jobs = []
    for s in starts:
        lo = s + (window - stride if s else score_from)
        jobs.append((s, min(n, s + window), max(lo, s + 1)))  # a window's first token has no context
    dev = next(model.parameters()).device
    for b in range(0, len(jobs), batch_size):
        group = jobs[b : b + batch_size]
        width = max(e - s for s, e, _ in group)
        x = torch.zeros((len(group), width), dtype=torch.long)
        for i, (s, e, _) in enumerate(group):
            x[i, : e - s] = torch.from_numpy(ids[s:e])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=x.to(dev), use_cache=False).logits.float(), -1)
        got = lp[:, :-1].gather(-1, x[:, 1:, None].to(dev))[..., 0].cpu().numpy()
        for i, (s, e, lo) in enumerate(group):  # right padding: causal attention never sees it
            if lo < e:
                out[lo:e] = got[i, lo - s - 1 : e - s - 1]
    return out


class LogprobDelta:
    """Δ(t) for `impactful_rows`. Two models: `long_model` minus `base_model`, both with the context of up to
    `window` tokens (default: the long model's window). One model (`base_model=None`): full context (`window`)
    minus a truncated context of `short` tokens (scored in windows of `short` with half-window stride, so the
    truncated context is `short/2`..`short` tokens; default `short`: the window / 4, a choice)."""

    def __init__(self, long_model, base_model=None, *, window: int | None = None, short: int | None = None,
                 batch_size: int = 4):
        self.long, self.base = long_model, base_model
        self.window = window or int(long_model.config.max_position_embeddings)
        self.short = short or max(2, self.window // 4)
        self.batch_size = batch_size

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        full = token_logprobs(self.long, ids, self.window, batch_size=self.batch_size)
        if self.base is not None:
            other = token_logprobs(self.base, ids, self.window, batch_size=self.batch_size)
        else:
            other = token_logprobs(self.long, ids, self.short, stride=max(1, self.short // 2),
                                   batch_size=self.batch_size)
        return full - other
