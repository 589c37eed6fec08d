"""Passkey and needle accuracy over a grid of lengths × depths.

A probe counts as solved when greedy decoding reproduces the whole answer. We check it teacher-forced in one
forward pass: greedy decoding emits the answer exactly iff the argmax at every answer position is the answer token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from rich.progress import Progress

from ..data.probes import IGNORE, Example, ProbeBuilder, rng_for


@torch.no_grad()
def score_examples(model, examples: list[Example], batch_size: int = 4) -> np.ndarray:
    """Exact-match (greedy) correctness of each probe, shape (len(examples),). Probes in a batch share a length."""
    device = next(model.parameters()).device
    out = np.zeros(len(examples), dtype=bool)
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        ids = torch.tensor(np.stack([e.input_ids for e in chunk]), device=device)
        labels = torch.tensor(np.stack([e.labels for e in chunk]), device=device)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        pred = logits[:, :-1].argmax(-1)
        target = labels[:, 1:]
        ok = ((pred == target) | (target == IGNORE)).all(1)
        out[i : i + len(chunk)] = ok.cpu().numpy()
    return out


@dataclass
class Grid:
    """Accuracy per (depth, length): `acc[i, j]` for depths[i], lengths[j]."""

    kind: str
    lengths: list[int]
    depths: list[float]
    acc: np.ndarray
    trials: int
    extra: dict = field(default_factory=dict)

    def by_length(self) -> dict[int, float]:
        return {n: float(self.acc[:, j].mean()) for j, n in enumerate(self.lengths)}

    def to_json(self) -> dict:
        return {"kind": self.kind, "lengths": self.lengths, "depths": self.depths, "trials": self.trials,
                "acc": self.acc.round(4).tolist()}


def retrieval_grid(
    model,
    builder: ProbeBuilder,
    kind: str,
    lengths: list[int],
    depths: list[float],
    trials: int,
    seed: int = 0,
    batch_size: int = 4,
    progress: Progress | None = None,
) -> Grid:
    """Accuracy of `kind` ("passkey" or "needle") probes for every (depth, length); evaluation seeds only."""
    make = {"passkey": builder.passkey, "needle": builder.needle}[kind]
    acc = np.zeros((len(depths), len(lengths)))
    task = progress.add_task(f"{kind} grid", total=len(lengths) * len(depths)) if progress else None
    for j, n in enumerate(lengths):
        for i, d in enumerate(depths):
            rng = rng_for(f"{kind}-{n}-{d}", seed, evaluation=True)
            examples = [make(rng, n, d) for _ in range(trials)]
            acc[i, j] = score_examples(model, examples, batch_size).mean()
            if progress is not None:
                progress.advance(task)
    return Grid(kind, list(lengths), list(depths), acc, trials)
