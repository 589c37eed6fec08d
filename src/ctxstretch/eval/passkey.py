"""Passkey and needle accuracy over a grid of lengths × depths.

A probe counts as solved when greedy decoding reproduces the whole answer. We check it teacher-forced in one
forward pass: greedy decoding emits the answer exactly iff the argmax at every answer position is the answer token.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import numpy as np
import torch
from rich.progress import Progress

from ..data.probes import IGNORE, Example, ProbeBuilder, rng_for


def _accepts_logits_to_keep(model) -> bool:
    """Whether `model.forward` names `logits_to_keep` (every transformers causal LM does; remote code may not).
    Models that do not get the full logits, of which only the tail is read."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def score_examples(model, examples: list[Example], batch_size: int = 4) -> np.ndarray:
    """Exact-match (greedy) correctness of each probe, shape (len(examples),) bool."""
    return answer_scores(model, examples, batch_size)[0]


@torch.no_grad()
def answer_scores(model, examples: list[Example], batch_size: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Per probe: greedy exact match (bool) and the share of answer tokens that are the argmax (float), both of
    shape (len(examples),). Probes in a batch share a length.

    The answer is the labelled tail, so only the last `k` positions need logits (`logits_to_keep`): the LM head
    over a (batch, length, vocab) tensor would otherwise cost as much as a layer. Results stay on the device until
    the end, so the next batch is built while an accelerator still runs the previous one."""
    device = next(model.parameters()).device
    keep_kw = _accepts_logits_to_keep(model)
    oks, fracs = [], []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        ids = torch.from_numpy(np.stack([e.input_ids for e in chunk])).to(device, torch.long)
        labels = np.stack([e.labels for e in chunk])
        # k positions: the one before the answer's first token, through the last one
        k = labels.shape[1] - int(np.argmax((labels != IGNORE).any(0))) + 1
        k = min(k, labels.shape[1])
        kw = {"logits_to_keep": k} if keep_kw else {}
        logits = model(input_ids=ids, use_cache=False, **kw).logits[:, -k:]
        pred = logits[:, :-1].argmax(-1)
        target = torch.from_numpy(labels[:, labels.shape[1] - k + 1 :]).to(device)
        scored = target != IGNORE
        hit = (pred == target) & scored
        oks.append((hit | ~scored).all(1))
        fracs.append(hit.sum(1).float() / scored.sum(1).clamp(min=1))
    if not oks:
        return np.zeros(0, dtype=bool), np.zeros(0)
    return torch.cat(oks).cpu().numpy(), torch.cat(fracs).cpu().numpy()


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
        # every depth of one length in one call: fuller batches, one device sync per length
        examples = []
        for d in depths:
            rng = rng_for(f"{kind}-{n}-{d}", seed, evaluation=True)
            examples += [make(rng, n, d) for _ in range(trials)]
        acc[:, j] = score_examples(model, examples, batch_size).reshape(len(depths), trials).mean(1)
        if progress is not None:
            progress.advance(task, len(depths))
    return Grid(kind, list(lengths), list(depths), acc, trials)
