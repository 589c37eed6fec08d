"""Training rows: a seeded mix of plain text and synthetic retrieval probes, each row given position ids by a
position-index transform. `RowMixer(index)` is a pure function of (name, seed, index), so resumed runs see the
same rows as uninterrupted ones.
"""

from __future__ import annotations

import numpy as np
import torch

from ..positions import transform
from .probes import ProbeBuilder, rng_for
from .sentences import BoundaryVocab

ROW_KINDS = ("text", "passkey", "needle", "text_copy", "random_copy")


class RowMixer:
    """Rows of `length` tokens drawn from `stream` (a flat token array) and probes, `batch` per call.

    mix: weight per row kind (see ROW_KINDS). positions: a transform from `ctxstretch.positions`; with it, rows
    carry positions spread over `[0, target)`, except a `contiguous_share` of rows kept at 0..length-1.
    """

    def __init__(
        self, tokenizer, stream: np.ndarray, *, name: str, seed: int, length: int, batch: int,
        mix: dict[str, float], positions: str = "full", target: int | None = None, contiguous_share: float = 0.0,
    ):
        unknown = set(mix) - set(ROW_KINDS)
        if unknown:
            raise ValueError(f"unknown row kinds {sorted(unknown)}; choose from {', '.join(ROW_KINDS)}")
        if len(stream) <= length:
            raise ValueError(f"the text stream has {len(stream)} tokens, fewer than one row of {length}")
        self.builder = ProbeBuilder(tokenizer, stream)
        self.stream, self.length, self.batch, self.name, self.seed = stream, length, batch, name, seed
        self.kinds = list(mix)
        self.weights = np.array(list(mix.values()), dtype=float) / sum(mix.values())
        self.positions, self.target, self.contiguous_share = positions, target or length, contiguous_share
        self.boundaries = BoundaryVocab.from_tokenizer(tokenizer) if positions == "longrecipe" else None

    def example(self, rng: np.random.Generator, kind: str) -> tuple[np.ndarray, np.ndarray]:
        n, b = self.length, self.builder
        if kind == "text":
            start = int(rng.integers(0, len(self.stream) - n))
            ids = np.asarray(self.stream[start : start + n], dtype=np.int64)
            return ids, ids.copy()
        if kind == "random_copy":
            ex = b.copy(rng, n, span=int(rng.integers(n // 4, n // 2 + 1)), random_tokens=True)
        elif kind == "text_copy":
            ex = b.copy(rng, n, span=int(rng.integers(8, n // 2 + 1)))
        elif kind == "passkey":
            ex = b.passkey(rng, n, float(rng.random()))
        else:
            ex = b.needle(rng, n, float(rng.random()))
        return ex.input_ids, ex.labels

    def position_ids(self, rng: np.random.Generator, ids: np.ndarray) -> np.ndarray:
        if self.positions == "full" or rng.random() < self.contiguous_share:
            return np.arange(len(ids), dtype=np.int64)
        ends = self.boundaries.sentence_ends(ids) if self.boundaries is not None else None
        return transform(self.positions, rng, len(ids), self.target, ends)

    def __call__(self, index: int) -> dict[str, torch.Tensor]:
        rng = rng_for(f"{self.name}-{index}", self.seed, evaluation=False)
        ids, labels, pos = [], [], []
        for _ in range(self.batch):
            kind = self.kinds[rng.choice(len(self.kinds), p=self.weights)]
            i, lab = self.example(rng, kind)
            ids.append(i)
            labels.append(lab)
            if self.positions != "full":
                pos.append(self.position_ids(rng, i))
        ids_t = torch.tensor(np.stack(ids))
        pos_t = torch.tensor(np.stack(pos)) if pos else torch.arange(self.length).expand_as(ids_t).clone()
        return {"input_ids": ids_t, "labels": torch.tensor(np.stack(labels)), "position_ids": pos_t,
                "segment_ids": torch.zeros_like(ids_t)}
