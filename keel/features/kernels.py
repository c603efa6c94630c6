"""NumPy kernels of both feature engines: the offline point-in-time join and the stream's windows.

One implementation of each, so offline and online values sort, sum and round alike:

- sorting: a stable argsort of int64 keys (LSD radix passes of np.sort, split across threads);
- prefix sums, and positions: the next seen position, the first / last seen one in a range;
- window reductions: min / max and distinct counts over windows of sorted probes (one pass
  each, compiled: ``keel.features.loops``) and one ``reduceat`` (``window_reduce``);
- compensated arithmetic: TwoSum, FastTwoSum, Dekker's exact product, double-double addition,
  double-double prefix sums of values and of their exact squares (compiled, the same operations
  in the same order) and window differences of them, a sample standard deviation from
  double-double moments, and IEEE totals from counts of NaN and infinities.

Every function works on whole arrays and holds no state; the few single passes NumPy cannot
express as array operations run as compiled loops (``keel.features.loops``).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

_SPLIT = 134217729.0  # 2**27 + 1, Dekker's splitter for exact float64 products


# Sorting ----------------------------------------------------------------------------------


def stable_argsort(x: np.ndarray, threads: int = 1) -> np.ndarray:
    """A stable argsort of int64 keys, split by value range across threads (numpy sorts without the GIL)."""
    x = x - x.min(initial=0) if len(x) and x.min() < 0 else x
    if threads < 2 or len(x) < 1 << 20:
        return radix_argsort(x)
    pivots = np.unique(np.quantile(x[:: max(len(x) // 10_000, 1)], np.linspace(0, 1, threads + 1)[1:-1]))
    part = np.searchsorted(pivots, x, "right")
    chunks = [np.flatnonzero(part == i) for i in range(len(pivots) + 1)]
    del part
    with ThreadPoolExecutor(len(chunks)) as pool:
        return np.concatenate(list(pool.map(lambda ix: ix[radix_argsort(x[ix])], chunks)))


def radix_argsort(x: np.ndarray) -> np.ndarray:
    """Stable argsort of non-negative int64 keys: LSD passes of np.sort on (digit, position) packed in one int64.

    np.sort on plain integers is several times faster than np.argsort; packing the position
    in the low bits makes each pass stable and gives the permutation back.
    """
    n = len(x)
    index_bits = max((n - 1).bit_length(), 1)
    digit_bits = 63 - index_bits
    key_bits = int(x.max(initial=0)).bit_length()
    positions = np.arange(n, dtype=np.int64)
    index_mask = (1 << index_bits) - 1
    perm = None
    for shift in range(0, max(key_bits, 1), digit_bits):
        digit = (x >> shift) & ((1 << digit_bits) - 1)
        if perm is not None:
            digit = digit[perm]
        packed = (digit << index_bits) | positions
        packed.sort()
        step = packed & index_mask
        perm = step if perm is None else perm[step]
    return perm


# Prefix sums and positions ----------------------------------------------------------------


def prefix_sums(x: np.ndarray) -> np.ndarray:
    """Prefix sums with a leading 0 (int64 sums wrap, so differences are exact when they fit)."""
    out = np.zeros(len(x) + 1, np.int64 if x.dtype.kind in "bi" else x.dtype)
    np.cumsum(x, out=out[1:])
    return out


def next_seen(seen: np.ndarray) -> np.ndarray:
    """For each position (and one past the end), the first position at or after it that is seen."""
    n = len(seen)
    out = np.full(n + 1, n, np.int64)
    if n:
        out[:n] = np.minimum.accumulate(np.where(seen, np.arange(n), n)[::-1])[::-1]
    return out


def last_position(seen: np.ndarray | None, lo: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The last seen position in each range ``[lo, end)`` (None: all seen), and whether there is one."""
    if seen is None:
        return end - 1, end > lo
    if not len(seen):
        return np.full(len(end), -1), np.zeros(len(end), bool)
    latest = np.maximum.accumulate(np.where(seen, np.arange(len(seen)), -1))
    pos = latest[np.maximum(end - 1, 0)]
    return pos, (end > lo) & (pos >= lo)


def first_position(seen: np.ndarray | None, lo: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first seen position in each range ``[lo, end)`` (None: all seen), and whether there is one."""
    if seen is None:
        return lo, lo < end
    pos = next_seen(seen)[lo]
    return pos, pos < end


# Range reductions -------------------------------------------------------------------------


def extreme_identity(dtype, agg: str):
    """The value ``min`` (or ``max``) ignores: +inf (-inf) for floats, the dtype's largest (smallest) integer."""
    if dtype.kind == "f":
        return np.inf if agg == "min" else -np.inf
    info = np.iinfo(dtype)
    return info.max if agg == "min" else info.min


def sorted_window_extreme(x: np.ndarray, lo: np.ndarray, up: np.ndarray, agg: str) -> np.ndarray:
    """``agg`` ("min" or "max") of x[lo:up] per window, for bounds that never move back (probes
    in sorted order): one pass with a monotone deque. Empty windows give 0."""
    from keel.features import loops

    out, queue = np.zeros(len(lo), x.dtype), np.empty(len(x), np.int64)
    loops.sliding_extreme(x, lo, up, agg == "max", out, queue)
    return out


def sorted_window_distinct(codes: np.ndarray, seen: np.ndarray | None, lo: np.ndarray, up: np.ndarray) -> np.ndarray:
    """How many distinct ``codes`` (0 .. max) the seen events (None: all) of [lo, up) hold, per
    window, for bounds that never move back: each event enters and leaves a count once."""
    from keel.features import loops

    all_seen = seen is None
    seen = np.zeros(0, bool) if all_seen else seen
    return loops.sliding_distinct(codes, seen, all_seen, lo, up, int(codes.max(initial=0)) + 1)


def window_reduce(x: np.ndarray, lo: np.ndarray, end: np.ndarray, fn, identity) -> np.ndarray:
    """fn-reduction of x[lo:end] per range, by one ``reduceat`` (identity where the range is empty)."""
    if not len(lo):
        return np.zeros(0, x.dtype)
    padded = np.append(x, np.array(identity, x.dtype))  # every bound, end included, is a valid index
    bounds = np.empty(2 * len(lo), np.intp)
    bounds[0::2], bounds[1::2] = lo, end
    out = fn.reduceat(padded, bounds)[0::2]
    return np.where(lo < end, out, np.array(identity, x.dtype))


# Compensated (double-double) arithmetic ---------------------------------------------------


def two_sum(a, b):
    """a + b and its exact rounding error (Knuth's TwoSum)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def fast_two_sum(a, b):
    """a + b and its exact rounding error, for |a| >= |b| (Dekker's FastTwoSum)."""
    s = a + b
    return s, b - (s - a)


def two_product(a, b):
    """a * b and its exact rounding error (Dekker's product, by splitting)."""
    p = a * b
    ca, cb = _SPLIT * a, _SPLIT * b
    ah = ca - (ca - a)
    bh = cb - (cb - b)
    al, bl = a - ah, b - bh
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def dd_add(ah: np.ndarray, al: np.ndarray, bh: np.ndarray, bl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The double-double sum of (ah, al) and (bh, bl), normalised."""
    s, e = two_sum(ah, bh)
    return fast_two_sum(s, e + (al + bl))


# Per-entity prefix sums: each block (one entity's events) is summed from 0, left to right, so a
# window's sum depends on its entity's events alone, whichever other entities share the arrays
# (a shard of entities gets the very bits the whole set gets).


class Blocks:
    """Consecutive blocks of an array (one entity's events each, from ``starts``) for the running
    sums that restart at every block, each block summed left to right (``dd_block_prefix``)."""

    def __init__(self, starts: np.ndarray, n: int) -> None:
        self.starts, self.n = starts, n
        # Where a block's sum before the element is 0: block starts, and one past the end.
        self.fresh = np.zeros(n + 1, bool)
        self.fresh[starts[starts < n]] = True
        self.fresh[n] = True


def dd_block_prefix(x: np.ndarray, blocks: Blocks, *, squares: bool = False):
    """Running sums of x (of its exact squares) restarting at every block, each addition's exact
    rounding error summed the same way: one compiled pass (``keel.features.loops.dd_prefix``).
    ``through[i]`` is the sum of element i-1's block up to and including it; the sum of element
    i's block before it is ``through[i]``, or 0 where ``blocks.fresh``."""
    from keel.features import loops

    s_through, e_through = np.empty(len(x) + 1), np.empty(len(x) + 1)
    loops.dd_prefix(np.asarray(x, np.float64), blocks.fresh, squares, s_through, e_through)
    return s_through, e_through, blocks.fresh


def dd_block_prefix_squares(y: np.ndarray, blocks: Blocks):
    """``dd_block_prefix`` of the exact squares of y: each square's rounding error joins the error sums."""
    return dd_block_prefix(y, blocks, squares=True)


def dd_block_moments(x: np.ndarray, codes: np.ndarray, blocks: Blocks, seen: np.ndarray | None):
    """What a standard deviation over windows needs, in one compiled pass (``loops.scaled_moments``):
    each block's exponent e and the ``dd_block_prefix`` of y = x * 2**-e and of y^2 (a block's
    windows keep their precision whatever other blocks' magnitudes); the prefix count of changes
    of value between consecutive seen events; each position's next seen one."""
    from keel.features import loops

    all_seen = seen is None
    seen = np.zeros(0, bool) if all_seen else seen
    n = len(x)
    s1, e1, s2, e2 = (np.empty(n + 1) for _ in range(4))
    changes, nxt = np.empty(n + 1, np.int64), np.empty(n + 1, np.int64)
    exponents = np.zeros(max(len(blocks.starts), 1), np.int64)
    loops.scaled_moments(
        np.asarray(x, np.float64), codes, blocks.fresh, seen, all_seen, exponents, s1, e1, s2, e2, changes, nxt
    )
    return (s1, e1, blocks.fresh), (s2, e2, blocks.fresh), exponents, changes, nxt


def dd_block_window(prefix, lo: np.ndarray, up: np.ndarray):
    """The sum over [lo, up) (one block's positions) from ``dd_block_prefix``, as a double-double."""
    s_through, e_through, fresh = prefix
    at_start = fresh[lo]
    hi, err = two_sum(s_through[up], -np.where(at_start, 0.0, s_through[lo]))
    return hi, err + (e_through[up] - np.where(at_start, 0.0, e_through[lo]))


def sample_stddev(n: np.ndarray, h1, l1, h2, l2, exps: np.ndarray) -> np.ndarray:
    """Sample standard deviation from moments of values scaled by 2**-exps, given as double-doubles:
    (h1, l1) the sum of y, (h2, l2) the sum of y^2. n * sum(y^2) - sum(y)^2 in double-double, then
    one rounding; NaN or inf where n < 2 (the caller masks those)."""
    nf = n.astype(np.float64)
    a, ae = two_product(nf, h2)
    ae += nf * l2
    b, be = two_product(h1, h1)
    be += 2.0 * h1 * l1 + l1 * l1
    d, de = two_sum(a, -b)
    diff = d + (de + (ae - be))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.ldexp(np.sqrt(np.maximum(diff, 0.0) / (nf * (nf - 1.0))), exps)


def float_total(hi: np.ndarray, lo: np.ndarray, nan, pos, neg) -> np.ndarray:
    """hi + lo, with IEEE's answer where the values summed hold NaN or infinities (counts of each)."""
    total = np.where(pos > 0, np.inf, np.where(neg > 0, -np.inf, hi + lo))
    return np.where((nan > 0) | ((pos > 0) & (neg > 0)), np.nan, total)
