"""Pack tokenised documents (`tokenized.py`, in the order `weighting.plan_documents` chose) into fixed-length rows
that keep document boundaries.

A packed row carries, per token: `input_ids`; `position_ids` restarting at 0 where each document (or each piece of
a split document) starts; `segment_ids`, the index of that piece within the row (0, 1, …), from which
`ctxstretch.masking.attention_mask_for` builds the block-diagonal causal mask; and `labels`, the input ids with
`IGNORE` on the first token of every piece (nothing before it in its own document predicts it) and on padding.
Everything here is a pure function of token arrays and an explicit numpy RNG.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .probes import IGNORE
from .records import DataError

ROW_FIELDS = ("input_ids", "position_ids", "segment_ids", "labels")


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
