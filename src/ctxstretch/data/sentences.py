"""Sentence boundaries derived from a tokenizer's vocabulary (never hard-coded token ids)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BoundaryVocab:
    """Boolean lookup tables over the vocabulary, shape (vocab,)."""

    ends_stop: np.ndarray  # token text ends with '.', '?' or '!'
    ends_newline: np.ndarray  # token text ends with a newline
    starts_space: np.ndarray  # token text starts with whitespace

    @classmethod
    def from_tokenizer(cls, tokenizer) -> BoundaryVocab:
        n = len(tokenizer)
        stop, newline, space = (np.zeros(n, dtype=bool) for _ in range(3))
        for tid in range(n):
            text = tokenizer.decode([tid])
            if not text:
                continue
            stop[tid] = text[-1] in ".?!"
            newline[tid] = text[-1] == "\n"
            space[tid] = text[0].isspace()
        return cls(stop, newline, space)

    def sentence_ends(self, ids: np.ndarray) -> np.ndarray:
        """Mask (len(ids),): True where a sentence ends at that token (a newline, or . ? ! before whitespace)."""
        ids = np.asarray(ids)
        nxt_space = np.ones(len(ids), dtype=bool)
        nxt_space[:-1] = self.starts_space[ids[1:]]
        return self.ends_newline[ids] | (self.ends_stop[ids] & nxt_space)
