"""The compiled window kernels against plain Python over the same windows."""

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.features.kernels import (
    Blocks,
    dd_block_moments,
    dd_block_prefix,
    dd_block_prefix_squares,
    dd_block_window,
    sorted_window_distinct,
    sorted_window_extreme,
)


def same_bits(arrays, others) -> bool:
    """Float arrays equal bit for bit (0.0 and -0.0 differ)."""
    return all(np.array_equal(a.view(np.int64), b.view(np.int64)) for a, b in zip(arrays, others, strict=True))


@st.composite
def blocked(draw, values):
    """Values in blocks (one entity's events each), and sorted windows inside the blocks."""
    sizes = draw(st.lists(st.integers(1, 12), min_size=1, max_size=8))
    n = sum(sizes)
    starts = np.cumsum([0, *sizes[:-1]]).astype(np.int64)
    x = np.array(draw(st.lists(values, min_size=n, max_size=n)))
    windows = []
    for b, size in enumerate(sizes):
        ups = sorted(draw(st.lists(st.integers(0, size), max_size=4)))
        lo = 0
        for up in ups:
            lo = draw(st.integers(lo, up))  # never back: probes are in sorted order
            windows.append((starts[b] + lo, starts[b] + up))
    lo = np.array([w[0] for w in windows], np.int64)
    up = np.array([w[1] for w in windows], np.int64)
    seen = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    return x, starts, lo, up, seen


@settings(max_examples=150, deadline=None)
@given(blocked(st.integers(-5, 5)), st.sampled_from(["min", "max"]))
def test_sliding_extremes_match_each_window(case, agg):
    x, _, lo, up, _ = case
    got = sorted_window_extreme(x, lo, up, agg)
    fn = min if agg == "min" else max
    assert got.tolist() == [fn(x[a:b].tolist()) if b > a else 0 for a, b in zip(lo, up, strict=True)]


@settings(max_examples=150, deadline=None)
@given(blocked(st.integers(0, 6)))
def test_sliding_distinct_counts_match_each_window(case):
    codes, _, lo, up, seen = case
    got = sorted_window_distinct(codes, seen, lo, up)
    assert got.tolist() == [len(set(codes[a:b][seen[a:b]].tolist())) for a, b in zip(lo, up, strict=True)]
    everything = sorted_window_distinct(codes, None, lo, up)
    assert everything.tolist() == [len(set(codes[a:b].tolist())) for a, b in zip(lo, up, strict=True)]


def test_windows_moving_back_are_refused():
    x, lo, up = np.arange(4), np.array([2, 1]), np.array([3, 3])
    with pytest.raises(ValueError, match="moved back"):
        sorted_window_extreme(x, lo, up, "max")
    with pytest.raises(ValueError, match="moved back"):
        sorted_window_distinct(x, None, lo, up)


finite = st.floats(-1e12, 1e12, allow_nan=False) | st.sampled_from([0.1, 1e-300, 3.0, 1e15, -1e15])


@settings(max_examples=150, deadline=None)
@given(blocked(finite))
def test_block_sums_are_near_exact_and_depend_on_their_block_alone(case):
    x, starts, lo, up, _ = case
    n = len(x)
    blocks = Blocks(starts, n)
    for prefix, power in ((dd_block_prefix(x, blocks), 1), (dd_block_prefix_squares(x, blocks), 2)):
        terms = [Fraction(v) ** power for v in x.tolist()]  # exact
        hi, err = dd_block_window(prefix, lo, up)
        for a, b, h, e in zip(lo, up, hi, err, strict=True):
            if a == b:
                continue  # an empty window's sum is not read: the features mask it by its count
            exact = sum(terms[a:b], Fraction(0))
            # Double-double prefix differences: off by a few units of 2**-100 of the magnitudes
            # summed from the block's start (a plain float prefix sum is off by 2**-52 of them).
            first = starts[np.searchsorted(starts, a, "right") - 1]
            bound = Fraction(2) ** -98 * (b - first) * sum((abs(t) for t in terms[first:b]), Fraction(0))
            assert abs(Fraction(h) + Fraction(e) - exact) <= bound + Fraction(1e-300)
    # The last block summed alone gives its windows the very bits it gets after the others.
    s = int(starts[-1])
    last = (lo >= s) & (up > lo)
    alone = dd_block_window(dd_block_prefix(x[s:], Blocks(np.zeros(1, np.int64), n - s)), lo[last] - s, up[last] - s)
    among = dd_block_window(dd_block_prefix(x, blocks), lo[last], up[last])
    assert same_bits(alone, among)


@settings(max_examples=100, deadline=None)
@given(blocked(finite))
def test_moments_scale_each_block_and_count_changes_of_value(case):
    x, starts, lo, up, seen = case
    n = len(x)
    blocks = Blocks(starts, n)
    codes = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, n)))
    xs = np.where(seen, x, 0.0)
    sums, squares, exponents, changes, nxt = dd_block_moments(xs, codes, blocks, seen)
    largest = np.maximum.reduceat(np.abs(xs), starts)
    assert exponents.tolist() == np.frexp(largest)[1].tolist()
    y = np.ldexp(xs, -np.repeat(exponents, np.diff(np.append(starts, n))))
    for got, want in ((sums, dd_block_prefix(y, blocks)), (squares, dd_block_prefix_squares(y, blocks))):
        assert same_bits(got[:2], want[:2])
    at = np.flatnonzero(seen)
    moved = [0] * min(len(at), 1) + [
        int(xs[i] != xs[j] or codes[i] != codes[j]) for j, i in zip(at[:-1], at[1:], strict=True)
    ]
    expected = np.zeros(n + 1, np.int64)
    for i, m in zip(at, moved, strict=True):
        expected[i + 1] = m
    assert changes.tolist() == np.cumsum(expected).tolist()
    assert nxt.tolist() == [next((j for j in at if j >= i), n) for i in range(n + 1)]
