"""Position-index transforms: a row of `n` real tokens gets `position_ids` spread over a longer window `[0, L)`.

All functions are pure: they take an explicit `numpy.random.Generator` and return an int64 array of shape (n,),
strictly increasing, with values in `[0, L)`.
"""

from __future__ import annotations

import numpy as np

METHODS = ("full", "pose", "randpos", "longrecipe")


def _check(n: int, target: int) -> None:
    if n <= 0 or target <= 0:
        raise ValueError(f"row length and target must be positive (got n={n}, target={target})")
    if n > target:
        raise ValueError(f"row length {n} exceeds the target window {target}")


def full_positions(n: int) -> np.ndarray:
    """Contiguous positions 0..n-1 (full-length training)."""
    return np.arange(n, dtype=np.int64)


def pose_positions(rng: np.random.Generator, n: int, target: int, chunks: int = 2) -> np.ndarray:
    """PoSE (Zhu et al., 2023, §3): cut the row into `chunks` pieces; chunk 0 starts at 0, every later chunk is shifted
    by a skip bias; biases are non-decreasing and the last position stays < `target`."""
    _check(n, target)
    chunks = max(1, min(chunks, n))
    cuts = np.sort(rng.choice(np.arange(1, n), size=chunks - 1, replace=False)) if chunks > 1 else []
    biases = np.sort(rng.integers(0, target - n + 1, size=chunks - 1))
    pos = np.arange(n, dtype=np.int64)
    for cut, bias in zip(cuts, biases, strict=True):
        pos[cut:] = np.arange(cut, n) + bias
    return pos


def randpos_positions(rng: np.random.Generator, n: int, target: int, keep_first: int = 0) -> np.ndarray:
    """RandPos (Ruoss et al., 2023): a sorted random sample of `n` distinct positions from `[0, target)`, the first
    `keep_first` fixed at 0, 1, … so attention sinks stay put."""
    _check(n, target)
    keep_first = min(keep_first, n)
    rest = rng.choice(np.arange(keep_first, target), size=n - keep_first, replace=False)
    return np.concatenate([np.arange(keep_first), np.sort(rest)]).astype(np.int64)


def longrecipe_positions(
    rng: np.random.Generator,
    n: int,
    target: int,
    sentence_ends: np.ndarray,
    min_units: int = 1,
    max_units: int = 1,
) -> np.ndarray:
    """LongRecipe sentence-level skips (Hu et al., 2024, Alg. 1).

    A contiguous prefix of random length r ~ U[1, (n+1)//2] keeps positions 0..r-1; the rest of the row is split
    into units of `min_units..max_units` sentences (a sentence ends where `sentence_ends`, shape (n,), is True);
    units keep consecutive positions inside and are placed in order at sorted random offsets over `[r, target)`;
    the last unit ends at `target - 1`, so the row spans the whole window.
    """
    _check(n, target)
    sentence_ends = np.asarray(sentence_ends, dtype=bool)
    if sentence_ends.shape != (n,):
        raise ValueError(f"sentence_ends must have shape ({n},), got {sentence_ends.shape}")
    r = int(rng.integers(1, (n + 1) // 2 + 1))
    pos = np.arange(n, dtype=np.int64)
    if r == n:
        return pos
    # unit starts: after every sentence end inside [r, n), grouped min..max sentences per unit
    ends = np.flatnonzero(sentence_ends[r : n - 1]) + r + 1
    starts, k = [r], 0
    while k < len(ends):
        k += int(rng.integers(min_units, max_units + 1))
        if k <= len(ends):
            starts.append(int(ends[k - 1]))
    starts = sorted(set(starts))
    gap = target - n  # free positions to distribute between units
    offsets = np.sort(rng.integers(0, gap + 1, size=len(starts)))
    offsets[-1] = gap
    for start, stop, off in zip(starts, [*starts[1:], n], offsets, strict=True):
        pos[start:stop] += off
    return pos


def transform(
    method: str,
    rng: np.random.Generator,
    n: int,
    target: int,
    sentence_ends: np.ndarray | None = None,
) -> np.ndarray:
    """Dispatch by name: one of `METHODS`."""
    if method == "full":
        return full_positions(n)
    if method == "pose":
        return pose_positions(rng, n, target)
    if method == "randpos":
        return randpos_positions(rng, n, target, keep_first=4)
    if method == "longrecipe":
        if sentence_ends is None:
            raise ValueError("longrecipe positions need sentence_ends")
        return longrecipe_positions(rng, n, target, sentence_ends)
    raise ValueError(f"unknown position transform {method!r}; choose one of {', '.join(METHODS)}")
