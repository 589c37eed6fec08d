"""A tokenised corpus: documents as one flat token sequence with per-document offsets and sources, built from a
stream of documents in bounded memory (`TokenizedCorpus.build`) or read back memory-mapped from the token cache
(`TokenChunks` over its Arrow record batches)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .records import Document
from .tokens import tokenize_batches


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
