"""LongSkywork (Zhao et al., 2024, §2 "CIP"): Chunk Interleaved Pretraining. Long training rows are built from short
documents: a group of documents is cut into chunks and the chunks of different documents are interleaved, each
document keeping its own chunk order, so continuing document A means looking back past the chunks of B, C, ….

The paper's outline leaves the numbers open; ours are parameters with documented defaults (**choice**):
`chunk_len` = 512 tokens, `k` = 0 (a group takes documents until it holds a row's worth of tokens), round-robin
interleaving. A group's interleaved sequence is one attention segment: every token sees the whole group before it,
and groups never see each other (rows come from `ctxstretch.data.packing.pack_rows`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from .packing import Rows, iter_packed
from .records import DataError

DEFAULT_CHUNK_LEN = 512  # tokens per chunk (choice)
DEFAULT_K = 0  # documents per group; 0: fill a row (choice)
INTERLEAVES = ("round_robin", "random")


def interleave_order(n_chunks: np.ndarray, mode: str = "round_robin", rng: np.random.Generator | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The order of chunks: (document, chunk number), both (M,) int64 with M = sum(n_chunks).

    "round_robin": chunk 0 of every document, then chunk 1 of every document still going, …; "random": a uniformly
    random interleaving (a seeded shuffle of the multiset of document labels); either way chunk j of a document
    comes before its chunk j + 1.
    """
    n_chunks = np.asarray(n_chunks, dtype=np.int64)
    doc = np.repeat(np.arange(len(n_chunks), dtype=np.int64), n_chunks)
    first = np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
    number = np.arange(len(doc), dtype=np.int64) - first
    if mode == "round_robin":
        order = np.lexsort((doc, number))
        return doc[order], number[order]
    if mode == "random":
        if rng is None:
            raise DataError("random interleaving needs a seeded rng")
        doc = rng.permutation(doc)
        by_doc = np.argsort(doc, kind="stable")  # positions of each document's slots, in order
        number = np.empty_like(doc)
        number[by_doc] = np.arange(len(doc), dtype=np.int64) - first
        return doc, number
    raise DataError(f"interleave must be one of {', '.join(INTERLEAVES)}, not {mode!r}")


def cip_sequence(docs: Sequence[np.ndarray], chunk_len: int = DEFAULT_CHUNK_LEN, mode: str = "round_robin",
                 rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Interleave the chunks of `docs` (token arrays) into one sequence.

    Returns (ids, doc_index), both (sum of lengths,) int64: the interleaved tokens and the index of the document
    each came from. Every token appears exactly once; the tokens of document i, read in order, are docs[i].
    """
    if chunk_len < 1:
        raise DataError(f"chunk length {chunk_len} must be positive")
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    if not lengths.sum():
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    flat = np.concatenate([np.asarray(d) for d in docs]).astype(np.int64, copy=False)
    offsets = np.cumsum(lengths) - lengths
    doc, number = interleave_order(-(-lengths // chunk_len), mode, rng)
    src = offsets[doc] + number * chunk_len
    size = np.minimum(chunk_len, lengths[doc] - number * chunk_len)
    dst = np.cumsum(size) - size
    gather = np.repeat(src - dst, size) + np.arange(int(size.sum()), dtype=np.int64)
    return flat[gather], np.repeat(doc, size)


def groups(docs: Iterable[np.ndarray], k: int = DEFAULT_K, length: int = 0) -> Iterator[list[np.ndarray]]:
    """Consecutive groups of `k` documents; with `k=0`, groups holding at least `length` tokens (the last group
    may hold fewer)."""
    if k < 0 or (k == 0 and length < 1):
        raise DataError("CIP needs k ≥ 1 documents per group, or k = 0 with a positive row length")
    group: list[np.ndarray] = []
    held = 0
    for d in docs:
        if not len(d):
            continue
        group.append(d)
        held += len(d)
        if (k and len(group) == k) or (not k and held >= length):
            yield group
            group, held = [], 0
    if group:
        yield group


def iter_cip_rows(docs: Iterable[np.ndarray], length: int, *, k: int = DEFAULT_K,
                  chunk_len: int = DEFAULT_CHUNK_LEN, mode: str = "round_robin",
                  rng: np.random.Generator | None = None, pad_id: int = 0, rows_per_block: int = 1024,
                  drop_last: bool = False) -> Iterator[Rows]:
    """CIP rows of `length` tokens from a stream of documents: groups (see `groups`), each interleaved by
    `cip_sequence` and packed as one segment; a group longer than a row continues in the next row."""
    seqs = (cip_sequence(g, chunk_len, mode, rng)[0] for g in groups(docs, k, length))
    yield from iter_packed(seqs, length, rows_per_block=rows_per_block, pad_id=pad_id, drop_last=drop_last)


def cip_rows(docs: Sequence[np.ndarray], length: int, **kwargs) -> Rows:
    """All CIP rows of `docs` at once (see `iter_cip_rows` for the keyword arguments)."""
    blocks = list(iter_cip_rows(docs, length, **kwargs))
    if not blocks:
        empty = np.zeros((0, length), dtype=np.int64)
        return Rows(empty, empty, empty, empty, empty.astype(bool))
    return Rows(*(np.concatenate([getattr(b, f) for b in blocks])
                  for f in ("input_ids", "position_ids", "segment_ids", "labels", "pad")))
