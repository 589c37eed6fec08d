"""RULER-style evaluation: per-task, per-length exact-match accuracy and the effective context length."""

from __future__ import annotations

import numpy as np
from rich.progress import Progress

from ..data.probes import rng_for
from ..data.ruler import TASKS, RulerBuilder
from .passkey import score_examples


def ruler_scores(model, builder: RulerBuilder, lengths: list[int], tasks: tuple[str, ...] = TASKS, trials: int = 4,
                 seed: int = 0, batch_size: int = 2, progress: Progress | None = None) -> dict[str, dict[int, float]]:
    """Accuracy per task and length (evaluation seeds only)."""
    scores: dict[str, dict[int, float]] = {task: {} for task in tasks}
    task_bar = progress.add_task("RULER", total=len(tasks) * len(lengths)) if progress else None
    for n in lengths:
        # every task of one length in one call: fuller batches, one device sync per length
        examples = []
        for task in tasks:
            rng = rng_for(f"ruler-{task}-{n}", seed, evaluation=True)
            examples += [builder.make(task, rng, n) for _ in range(trials)]
        ok = score_examples(model, examples, batch_size).reshape(len(tasks), trials).mean(1)
        for task, acc in zip(tasks, ok, strict=True):
            scores[task][n] = float(acc)
        if progress is not None:
            progress.advance(task_bar, len(tasks))
    return scores


def mean_by_length(scores: dict[str, dict[int, float]]) -> dict[int, float]:
    lengths = sorted({n for per in scores.values() for n in per})
    return {n: float(np.mean([per[n] for per in scores.values() if n in per])) for n in lengths}


def effective_length(by_length: dict[int, float], ratio: float = 0.85, threshold: float | None = None) -> int | None:
    """Longest length up to which every score stays ≥ `threshold` (default: `ratio` × the shortest length's score).

    None when even the shortest length fails."""
    lengths = sorted(by_length)
    if not lengths:
        return None
    bar = threshold if threshold is not None else ratio * by_length[lengths[0]]
    best = None
    for n in lengths:
        if by_length[n] < bar or by_length[n] == 0:
            break
        best = n
    return best
