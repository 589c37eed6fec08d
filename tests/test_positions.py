import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctxstretch.positions import (
    full_positions,
    longrecipe_positions,
    pose_positions,
    randpos_positions,
    transform,
)

lengths = st.tuples(st.integers(2, 300), st.integers(1, 8)).map(lambda t: (t[0], t[0] * t[1] + 5))


def _valid(pos: np.ndarray, n: int, target: int) -> None:
    assert pos.shape == (n,)
    assert np.all(np.diff(pos) > 0), "strictly increasing"
    assert pos[0] >= 0 and pos[-1] < target


@settings(max_examples=60, deadline=None)
@given(lengths, st.integers(0, 2**32 - 1), st.integers(1, 4))
def test_pose(nl, seed, chunks):
    n, target = nl
    pos = pose_positions(np.random.default_rng(seed), n, target, chunks)
    _valid(pos, n, target)
    assert pos[0] == 0
    # chunks keep consecutive positions inside: at most chunks-1 jumps
    assert np.count_nonzero(np.diff(pos) > 1) <= chunks - 1


@settings(max_examples=60, deadline=None)
@given(lengths, st.integers(0, 2**32 - 1), st.integers(0, 4))
def test_randpos(nl, seed, keep):
    n, target = nl
    pos = randpos_positions(np.random.default_rng(seed), n, target, keep)
    _valid(pos, n, target)
    k = min(keep, n)
    assert list(pos[:k]) == list(range(k))


@settings(max_examples=80, deadline=None)
@given(lengths, st.integers(0, 2**32 - 1), st.floats(0.0, 0.5))
def test_longrecipe(nl, seed, density):
    n, target = nl
    rng = np.random.default_rng(seed)
    ends = rng.random(n) < density
    pos = longrecipe_positions(np.random.default_rng(seed + 1), n, target, ends)
    _valid(pos, n, target)
    # a contiguous prefix starting at 0, of length at least 1 and at most (n+1)//2 before the first gap
    jumps = np.flatnonzero(np.diff(pos) > 1)
    prefix = (jumps[0] + 1) if len(jumps) else n
    assert pos[0] == 0 and prefix >= 1
    # gaps only start right after a sentence end or at the prefix boundary
    for j in jumps[1:]:
        assert ends[j], "a gap opens only after a sentence end"
    # the row spans the whole window: the last position is target - 1 unless the prefix covers the row
    if prefix < n:
        assert pos[-1] == target - 1


def test_full_and_errors():
    assert list(full_positions(4)) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="exceeds"):
        pose_positions(np.random.default_rng(0), 10, 5)
    with pytest.raises(ValueError, match="unknown position transform"):
        transform("nope", np.random.default_rng(0), 4, 8)
    with pytest.raises(ValueError, match="sentence_ends"):
        transform("longrecipe", np.random.default_rng(0), 4, 8)
