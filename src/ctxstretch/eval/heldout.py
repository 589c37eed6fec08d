"""Held-out families (`data/heldout.py`) scored over lengths × depths: counts, not just rates, so a report can show
how many probes stand behind each number and how sure it is."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.progress import Progress

from ..data.families import HELD_OUT
from ..data.heldout import HeldoutBuilder
from ..data.probes import rng_for
from .passkey import answer_scores

# {"correct": int, "n": int, "token_acc": float, "token_sd": float}: exact matches, probes, and the mean and standard
# deviation over probes of the answer-token accuracy (the share of answer tokens that are the greedy argmax,
# teacher-forced) — the headline score, since a whole answer exactly right is rare for small models
Tally = dict


def heldout_scores(model, tokenizer, lengths: list[int], families: tuple[str, ...] = HELD_OUT,
                   depths: tuple[float, ...] = (0.1, 0.5, 0.9), trials: int = 4, seed: int = 0, batch_size: int = 2,
                   progress: Progress | None = None, partial: Path | None = None) -> dict[str, dict[int, Tally]]:
    """Per family and length: `trials` probes at each depth (evaluation seeds only), greedy exact match.
    partial: a JSON file keeping finished (family, length) cells, so an interrupted evaluation (a 32K probe of a
    real model takes minutes on a CPU) resumes where it stopped."""
    builder = HeldoutBuilder(tokenizer)
    done = json.loads(partial.read_text()) if partial is not None and partial.exists() else {}
    out: dict[str, dict[int, Tally]] = {f: {} for f in families}
    bar = progress.add_task("held-out families", total=len(families) * len(lengths)) if progress else None
    for n in lengths:
        for family in families:
            key = f"{family}/{n}/{','.join(map(str, depths))}/{trials}/{seed}"
            if key not in done:
                examples = []
                for d in depths:
                    rng = rng_for(f"heldout-{family}-{n}-{d}", seed, evaluation=True)
                    examples += [builder.make(family, rng, n, d) for _ in range(trials)]
                ok, frac = answer_scores(model, examples, batch_size)
                done[key] = {"correct": int(ok.sum()), "n": len(ok), "token_acc": round(float(frac.mean()), 4),
                             "token_sd": round(float(frac.std(ddof=1)) if len(frac) > 1 else 0.0, 4)}
                if partial is not None:
                    partial.parent.mkdir(parents=True, exist_ok=True)
                    tmp = partial.with_suffix(".tmp")
                    tmp.write_text(json.dumps(done))
                    tmp.replace(partial)
            out[family][n] = done[key]
            if progress is not None:
                progress.advance(bar)
    return out


def pooled(scores: dict[str, dict[int, Tally]]) -> dict[int, tuple[int, int]]:
    """(correct, probes) per length, summed over families."""
    lengths = sorted({n for per in scores.values() for n in per})
    return {n: (sum(per[n]["correct"] for per in scores.values() if n in per),
                sum(per[n]["n"] for per in scores.values() if n in per)) for n in lengths}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion k/n (95% for z = 1.96); (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def pooled_token(scores: dict[str, dict[int, Tally]], z: float = 1.96) -> dict[int, tuple[float, float, int]]:
    """Per length, over the probes of every family: (mean answer-token accuracy, half-width of its 95% normal
    interval, probes)."""
    out = {}
    for n in sorted({n for per in scores.values() for n in per}):
        cells = [per[n] for per in scores.values() if n in per]
        total = sum(c["n"] for c in cells)
        mean = sum(c["n"] * c["token_acc"] for c in cells) / total
        ss = sum((c["n"] - 1) * c.get("token_sd", 0.0) ** 2 + c["n"] * (c["token_acc"] - mean) ** 2 for c in cells)
        sd = math.sqrt(ss / (total - 1)) if total > 1 else 0.0
        out[n] = (mean, z * sd / math.sqrt(total), total)
    return out


def ratio_interval(a: tuple[float, float, int], b: tuple[float, float, int]) -> tuple[float, float]:
    """The 95% interval of the ratio of two pooled scores a/b (`pooled_token` entries, independent probes), by the
    delta method: r ± sqrt((ha/b)² + (a·hb/b²)²), i.e. r·sqrt((ha/a)² + (hb/b)²) when a > 0. (0, inf) when b is 0."""
    (ma, ha, _), (mb, hb, _) = a, b
    if mb <= 0:
        return 0.0, float("inf")
    r = ma / mb
    half = math.hypot(ha / mb, ma * hb / mb**2)
    return max(0.0, r - half), r + half
