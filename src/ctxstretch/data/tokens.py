"""Tokenizer helpers every data module shares: batched encoding by the fast backend, the padding id."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np


def pad_id_of(tok) -> int:
    """The tokenizer's padding id, else its EOS id, else 0 (padding is never trained on)."""
    for tid in (tok.pad_token_id, tok.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def tokenize_batches(tokenizer, texts: Iterable[str], batch: int = 256, eos_id: int | None = None
                     ) -> Iterator[np.ndarray]:
    """Token ids (int32, one array per text, in order), encoded `batch` texts at a time by the fast tokenizer's
    backend (Rust, no special tokens); `eos_id`, when given, is appended to every document."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    chunk: list[str] = []

    def flush() -> Iterator[np.ndarray]:
        if backend is not None:
            seqs = [e.ids for e in backend.encode_batch_fast(chunk, add_special_tokens=False)]
        else:
            seqs = tokenizer(chunk, add_special_tokens=False)["input_ids"]
        chunk.clear()
        for ids in seqs:
            if eos_id is not None:
                ids.append(eos_id)
            yield np.asarray(ids, dtype=np.int32)

    for text in texts:
        chunk.append(text)
        if len(chunk) >= batch:
            yield from flush()
    if chunk:
        yield from flush()
