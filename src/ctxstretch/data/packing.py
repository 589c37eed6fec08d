"""Tokenise documents, weight them (long-document upsampling, per-source mixing) and pack them into fixed-length
rows that keep document boundaries.

A packed row carries, per token: `input_ids`; `position_ids` restarting at 0 where each document (or each piece of
a split document) starts; `segment_ids`, the index of that piece within the row (0, 1, …), from which
`ctxstretch.masking.attention_mask_for` builds the block-diagonal causal mask; and `labels`, the input ids with
`IGNORE` on the first token of every piece (nothing before it in its own document predicts it) and on padding.
Everything here is a pure function of token arrays and an explicit numpy RNG.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .probes import IGNORE
from .readers import DataError, Document
from .tokens import tokenize_batches

ROW_FIELDS = ("input_ids", "position_ids", "segment_ids", "labels")


class TokenChunks:
    """A flat token sequence kept as consecutive chunks (e.g. the record batches of a memory-mapped Arrow file), so a
    corpus need not be one contiguous array. `len`, integer indexing and slicing work as on the flat array: a slice
    inside one chunk is a zero-copy view, one across chunks a copy; `np.asarray` concatenates everything."""

    def __init__(self, chunks: Iterable[np.ndarray]):
        self.chunks = [c for c in chunks if len(c)]
        self.dtype = self.chunks[0].dtype if self.chunks else np.dtype(np.int32)
        self.starts = np.zeros(len(self.chunks) + 1, dtype=np.int64)  # token offset of each chunk, then the total
        np.cumsum([len(c) for c in self.chunks], out=self.starts[1:])

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def _chunk(self, i: int) -> int:
        return int(np.searchsorted(self.starts, i, side="right")) - 1

    def __getitem__(self, key):
        if isinstance(key, slice):
            a, b, step = key.indices(len(self))
            if step != 1:
                return np.asarray(self)[key]
            if b <= a:
                return np.zeros(0, dtype=self.dtype)
            c, last = self._chunk(a), self._chunk(b - 1)
            if c == last:
                return self.chunks[c][a - self.starts[c] : b - self.starts[c]]
            parts = [self.chunks[c][a - self.starts[c] :], *self.chunks[c + 1 : last],
                     self.chunks[last][: b - self.starts[last]]]
            return np.concatenate(parts)
        if isinstance(key, (int, np.integer)):
            i = int(key) + len(self) if key < 0 else int(key)
            if not 0 <= i < len(self):
                raise IndexError(f"index {key} out of range for {len(self)} tokens")
            c = self._chunk(i)
            return self.chunks[c][i - self.starts[c]]
        return np.asarray(self)[key]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        flat = np.concatenate(self.chunks) if self.chunks else np.zeros(0, dtype=self.dtype)
        return flat if dtype is None else flat.astype(dtype, copy=False)


def as_tokens(chunks: Sequence[np.ndarray]) -> np.ndarray | TokenChunks:
    """One array for zero or one chunk (no copy), else a `TokenChunks` view over them."""
    chunks = [c for c in chunks if len(c)]
    if len(chunks) <= 1:
        return chunks[0] if chunks else np.zeros(0, dtype=np.int32)
    return TokenChunks(chunks)


@dataclass
class TokenizedCorpus:
    """Documents as one flat token sequence: document i is `tokens[offsets[i]:offsets[i+1]]`, from source
    `source_names[sources[i]]`. About 4 bytes per token, so a large corpus fits where its text would; from the token
    cache the tokens are memory-mapped (`TokenChunks` over the Arrow record batches), not held in memory."""

    tokens: np.ndarray | TokenChunks  # (N,) int32
    offsets: np.ndarray  # (D + 1,) int64
    sources: np.ndarray  # (D,) int32, index into source_names
    source_names: list[str]

    @classmethod
    def build(cls, tokenizer, docs: Iterable[Document], batch: int = 256, eos_id: int | None = None,
              progress=None, sink=None, chunk_tokens: int = 1 << 20) -> TokenizedCorpus:
        """Tokenise a stream of documents in batches; `progress(n_docs, n_tokens)` is called after each batch.

        Tokens are gathered in chunks of whole documents of at least `chunk_tokens` tokens (the last may be
        shorter), never in one list of per-document arrays. With a `sink` (e.g. `tokcache.Writer`) each chunk goes
        to `sink.write(tokens, lengths, sources)` instead of being kept, and the corpus returned is
        `sink.close(source_names)`: memory stays flat however large the corpus is."""
        names: dict[str, int] = {}
        pending: deque[int] = deque()  # source of each document handed to the tokenizer and not yet back
        chunk: list[np.ndarray] = []
        chunk_src: list[int] = []
        held = n_docs = total = 0
        kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # without a sink: (tokens, lengths, sources)

        def texts() -> Iterator[str]:
            for d in docs:
                pending.append(names.setdefault(d.source, len(names)))
                yield d.text

        def flush() -> None:
            nonlocal held
            part = (np.concatenate(chunk), np.fromiter(map(len, chunk), dtype=np.int64, count=len(chunk)),
                    np.asarray(chunk_src, dtype=np.int32))
            chunk.clear()
            chunk_src.clear()
            held = 0
            if sink is not None:
                sink.write(*part)
            else:
                kept.append(part)

        for ids in tokenize_batches(tokenizer, texts(), batch, eos_id):
            chunk.append(ids)
            chunk_src.append(pending.popleft())
            held += len(ids)
            n_docs += 1
            total += len(ids)
            if held >= chunk_tokens:
                flush()
            if progress is not None and n_docs % batch == 0:
                progress(n_docs, total)
        if chunk:
            flush()
        if progress is not None:
            progress(n_docs, total)
        if sink is not None:
            return sink.close(list(names))
        offsets = np.zeros(n_docs + 1, dtype=np.int64)
        if kept:
            np.cumsum(np.concatenate([k[1] for k in kept]), out=offsets[1:])
        sources = np.concatenate([k[2] for k in kept]) if kept else np.zeros(0, dtype=np.int32)
        return cls(as_tokens([k[0] for k in kept]), offsets, sources, list(names))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """(D,) tokens per document."""
        return np.diff(self.offsets)

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def docs(self, order: Iterable[int]) -> Iterator[np.ndarray]:
        for i in order:
            yield self.doc(int(i))


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


@dataclass
class Rows:
    """Packed rows; the four fields of ROW_FIELDS are (R, T) int64 (see the module docstring), `pad` (R, T) bool
    marks padding."""

    input_ids: np.ndarray
    position_ids: np.ndarray
    segment_ids: np.ndarray
    labels: np.ndarray
    pad: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, sel: slice) -> Rows:
        return Rows(*(getattr(self, k)[sel] for k in (*ROW_FIELDS, "pad")))

    def as_dict(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in ROW_FIELDS}

    @property
    def real_tokens(self) -> int:
        """Tokens that are not padding."""
        return int((~self.pad).sum())


def _layout(lengths: np.ndarray, length: int, split_short: bool) -> np.ndarray:
    """Start slot of each document in the row-major buffer of rows of `length` tokens."""
    if split_short:
        starts = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        return starts
    starts = np.empty(len(lengths), dtype=np.int64)
    cur = 0
    for i, n in enumerate(lengths.tolist()):
        used = cur % length
        if used and n <= length and n > length - used:  # a document that fits in a row starts a new one
            cur += length - used
        starts[i] = cur
        cur += n
    return starts


def pack_rows(docs: Sequence[np.ndarray], length: int, *, pad_id: int = 0, split_short: bool = True) -> Rows:
    """Pack documents (token arrays, in order) into rows of `length` tokens.

    Documents longer than a row are always split (each piece restarts its positions at 0). `split_short=True`
    fills every row, so a document crossing a row end also continues in the next row; `split_short=False` never
    splits a document that fits in a row: it starts a new row and the current one is padded. Only the last row
    (and, with `split_short=False`, rows ended early) carry padding: `pad_id`, label IGNORE, its own segment.
    """
    if length < 1:
        raise DataError(f"row length {length} must be positive")
    docs = [np.asarray(d) for d in docs if len(d)]
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    if not len(docs):
        empty = np.zeros((0, length), dtype=np.int64)
        return Rows(empty, empty.copy(), empty.copy(), empty.copy(), np.zeros((0, length), dtype=bool))
    starts = _layout(lengths, length, split_short)
    end = int(starts[-1] + lengths[-1])
    n_rows = -(-end // length)
    total = n_rows * length
    flat = np.concatenate(docs).astype(np.int64, copy=False)
    src_starts = np.zeros(len(docs), dtype=np.int64)
    np.cumsum(lengths[:-1], out=src_starts[1:])
    dest = np.repeat(starts - src_starts, lengths) + np.arange(len(flat), dtype=np.int64)

    ids = np.full(total, pad_id, dtype=np.int64)
    ids[dest] = flat
    covered = np.zeros(total, dtype=bool)
    covered[dest] = True
    is_start = np.zeros(total, dtype=bool)
    is_start[starts] = True
    is_start[::length] = True
    is_start[1:] |= ~covered[1:] & covered[:-1]  # a padding run starts its own segment
    slot = np.arange(total, dtype=np.int64)
    piece_start = np.maximum.accumulate(np.where(is_start, slot, 0))
    seg = np.cumsum(is_start).reshape(n_rows, length)
    labels = np.where(covered & ~is_start, ids, IGNORE)
    return Rows(ids.reshape(n_rows, length), (slot - piece_start).reshape(n_rows, length), seg - seg[:, :1],
                labels.reshape(n_rows, length), ~covered.reshape(n_rows, length))


def iter_packed(docs: Iterable[np.ndarray], length: int, *, rows_per_block: int = 1024, pad_id: int = 0,
                split_short: bool = True, drop_last: bool = False) -> Iterator[Rows]:
    """`pack_rows` over a stream, `rows_per_block` rows at a time (memory stays bounded). The rows equal those of
    one `pack_rows` call on the whole stream: a block's unfinished last row is carried into the next block.
    `drop_last` drops a final row that is not full."""
    buf: list[np.ndarray] = []
    held = 0
    budget = max(1, rows_per_block) * length
    for d in docs:
        if len(d):
            buf.append(d)
            held += len(d)
        if held >= budget:
            rows = pack_rows(buf, length, pad_id=pad_id, split_short=split_short)
            last_pad = rows.pad[-1]
            if last_pad.any():
                seg, ids = rows.segment_ids[-1], rows.input_ids[-1]
                buf = [ids[(seg == s) & ~last_pad] for s in np.unique(seg[~last_pad])]
                rows = rows[: len(rows) - 1]
            else:
                buf = []
            held = sum(len(b) for b in buf)
            if len(rows):
                yield rows
    if buf:
        rows = pack_rows(buf, length, pad_id=pad_id, split_short=split_short)
        if drop_last and rows.pad[-1].any():
            rows = rows[: len(rows) - 1]
        if len(rows):
            yield rows


def answer_row(prompt: np.ndarray, answer: np.ndarray, length: int, pad_id: int) -> dict[str, np.ndarray]:
    """One SFT row of `length` tokens: `prompt` then `answer` (labels on the answer only), then padding in its own
    segment with positions restarting at 0. Fields (length,) int64; the caller checks the two fit."""
    n = len(prompt) + len(answer)
    row = np.full(length, pad_id, dtype=np.int64)
    row[: len(prompt)], row[len(prompt) : n] = prompt, answer
    labels = np.full(length, IGNORE, dtype=np.int64)
    labels[len(prompt) : n] = answer
    pos = np.arange(length, dtype=np.int64)
    pos[n:] -= n
    seg = (np.arange(length) >= n).astype(np.int64)
    return {"input_ids": row, "position_ids": pos, "segment_ids": seg, "labels": labels}
