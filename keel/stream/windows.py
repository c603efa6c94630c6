"""Aggregations over windows that end at each probe's entity's latest event: keel.stream.state's kernels.

Events of several probes lie end to end in one array, one run per probe, each run in time
order (then event id). A probe's time is never before its entity's latest event, so every
window ``(t - w, t]`` is a suffix ``[lo, end)`` of the probe's run and lifetime is the whole
run. That makes each aggregation a handful of whole-array NumPy passes, never a loop per event:

- counts and integer sums: differences of prefix sums (int64 sums wrap, so they come out exact);
- float sums and ``stddev``: double-double prefix sums of the values and of their exact squares,
  each run scaled by its own power of two (``keel.features.kernels``, the arithmetic of
  ``keel.features.point_in_time``), so no other run's magnitude costs this one precision and
  one repeated value gives exactly 0;
- ``min`` / ``max``: one ``reduceat`` over the runs' window bounds;
- ``first`` / ``last``: the first / last seen position inside the window;
- ``count_distinct``: the window is a suffix, so a value occurs in it exactly when its last
  occurrence in the run does; counting those last occurrences is a prefix-sum difference.

Lifetime features fold the same aggregations into a running state (``keel.stream.lifetime``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from keel.dsl import COLUMN_TYPES, Feature

# One set of kernels for both engines, so offline and online round alike.
from keel.features.kernels import (
    Blocks,
    dd_block_prefix,
    dd_block_prefix_squares,
    dd_block_window,
    extreme_identity,
    fast_two_sum,
    first_position,
    float_total,
    last_position,
    prefix_sums,
    sample_stddev,
    window_reduce,
)

EMPTY = np.zeros(0, np.int64)


class Runs:
    """Event times laid out as one run per probe (``start``/``end`` positions), and the probe times ``t``."""

    def __init__(self, ts: np.ndarray, lengths: np.ndarray, t: np.ndarray | None = None):
        self.ts = ts
        self.end = np.cumsum(lengths)
        self.start = self.end - lengths
        self.size = len(ts)
        self.run = np.repeat(np.arange(len(lengths)), lengths)
        self.t = t
        self._lower: dict[int, np.ndarray] = {}

    def lower(self, window_us: int | None) -> np.ndarray:
        """Per probe, the first position inside ``(t - window, t]`` (the run's start for lifetime)."""
        if window_us is None:
            return self.start
        if window_us not in self._lower:
            inside = self.ts > (self.t - window_us)[self.run]
            self._lower[window_us] = self.end - np.bincount(self.run[inside], minlength=len(self.end))
        return self._lower[window_us]


class Events:
    """The columns and ``where`` masks of events laid out in runs: what every aggregation reads.

    ``columns`` maps a source column to (values as numbers, valid); strings are codes into
    ``vocabs[column]``, timestamps microseconds, dates days, bools 0/1. ``ids``: event ids when
    the source has them (runs are then already in (time, id) order).
    """

    def __init__(
        self,
        runs: Runs,
        columns: dict,
        wheres: dict,
        types: dict,
        vocabs: dict,
        has_ids: bool,
        ids: np.ndarray | None = None,
    ):
        self.runs = runs
        self.columns = columns
        self.wheres = wheres
        self.types = types
        self.vocabs = vocabs
        self.has_ids = has_ids
        self.ids = ids
        self._cache: dict = {}

    def cached(self, key, compute):
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def seen(self, column: str | None, where: str | None) -> np.ndarray | None:
        """Events a feature sees: ``where`` TRUE and the column not NULL (None: all of them)."""

        def compute():
            mask = None if where is None else self.wheres[where]
            if column is not None:
                valid = self.columns[column][1]
                if not valid.all():
                    mask = valid if mask is None else mask & valid
            return mask

        return self.cached(("seen", column, where), compute)

    def ranks(self, column: str) -> tuple[np.ndarray, np.ndarray]:
        """A column as numbers that sort like its values, and (for strings) rank -> code."""

        def compute():
            values, typ = self.columns[column][0], self.types[column]
            if typ != "string":
                return values, EMPTY
            vocab = self.vocabs[column]
            codes = np.unique(values)
            by_word = sorted(range(len(codes)), key=lambda i: vocab[codes[i]] if vocab else "")
            code_of_rank = codes[np.array(by_word, np.int64)] if len(codes) else EMPTY
            rank = np.empty(len(codes), np.int64)
            rank[by_word] = np.arange(len(codes))
            return (rank[np.searchsorted(codes, values)] if len(codes) else values), code_of_rank

        return self.cached(("ranks", column), compute)

    def distinct_codes(self, column: str) -> np.ndarray:
        """Equal values, equal codes: -0.0 and 0.0 are one value, and so are all NaNs."""
        values = self.columns[column][0]
        if self.types[column] != "float64":
            return values
        return np.where(np.isnan(values), np.nan, values + 0.0).view(np.int64)

    def tie_order(self, column: str) -> np.ndarray | None:
        """Without event ids, events at one time are ordered by the value itself (None: no ties)."""
        if self.has_ids:
            return None

        def compute():
            runs = self.runs
            same = (runs.run[1:] == runs.run[:-1]) & (runs.ts[1:] == runs.ts[:-1])
            if not same.any():
                return None
            return np.lexsort((self.ranks(column)[0], runs.ts, runs.run))

        return self.cached(("ties", column), compute)

    def floats(self, column: str, where: str | None) -> FloatSums:
        return self.cached(("floats", column, where), lambda: FloatSums(self, column, where))

    def last_occurrences(self, column: str, where: str | None) -> np.ndarray:
        """Positions holding the last seen occurrence of their value within their run."""

        def compute():
            seen = self.seen(column, where)
            at = np.arange(self.runs.size) if seen is None else np.flatnonzero(seen)
            if not len(at):
                return at
            codes = self.distinct_codes(column)[at]
            if codes.min() < 0 or int(codes.max()) * len(self.runs.end) >= 1 << 62:
                codes = np.unique(codes, return_inverse=True)[1].reshape(-1)  # dense, so pairs fit one int64
            key = self.runs.run[at] * (int(codes.max()) + 1) + codes
            order = np.argsort(key, kind="stable")  # keeps time order within a value
            key = key[order]
            last = np.ones(len(key), bool)
            last[:-1] = key[1:] != key[:-1]
            return at[order][last]

        return self.cached(("distinct", column, where), compute)

    def arrow(self, column: str, values: np.ndarray, null: np.ndarray, typ: str) -> pa.Array:
        return to_arrow(values, null, typ, self.vocabs.get(column))

    def python(self, column: str, positions: np.ndarray) -> list:
        """Values at ``positions`` as Python objects in the engine's encoding (strings as str)."""
        values = self.columns[column][0][positions].tolist()
        if self.types[column] == "string":
            vocab = self.vocabs[column]
            return [vocab[c] for c in values]
        return values

    def distinct_keys(self, column: str, positions: np.ndarray) -> list:
        """Hashable values that are equal exactly when count_distinct counts them as one."""
        if self.types[column] == "string":
            return self.python(column, positions)
        return self.distinct_codes(column)[positions].tolist()


class FloatSums:
    """Double-double sums of seen finite values and of their squares, restarting at every run (as
    the offline engine's restart at every entity), scaled per run.

    Each run is scaled by the power of two that brings its largest magnitude into [0.5, 1):
    exact, and it keeps another run's large values from limiting this one's precision.
    """

    def __init__(self, events: Events, column: str, where: str | None):
        runs = events.runs
        self.runs = runs
        x = events.columns[column][0].astype(np.float64, copy=False)
        seen = events.seen(column, where)
        finite = np.isfinite(x)
        self.ok = finite if seen is None else finite & seen
        self.x = np.where(self.ok, x, 0.0)
        largest = window_reduce(np.abs(self.x), runs.start, runs.end, np.maximum, 0.0)
        self.exps = np.frexp(largest)[1].astype(np.int64)
        self.y = np.ldexp(self.x, -self.exps[runs.run])
        self.blocks = Blocks(np.unique(runs.start[runs.end > runs.start]), len(self.y))
        self.s1 = dd_block_prefix(self.y, self.blocks)
        self._s2 = None
        bad = ~finite if seen is None else seen & ~finite
        self.nonfinite = None
        if bad.any():
            self.nonfinite = [prefix_sums(bad & kind(x)) for kind in (np.isnan, np.isposinf, np.isneginf)]

    def sum_parts(self, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The window's sum as an unscaled double-double (hi, lo)."""
        hi, low = fast_two_sum(*dd_block_window(self.s1, lo, self.runs.end))
        return np.ldexp(hi, self.exps), np.ldexp(low, self.exps)

    def nonfinite_counts(self, lo: np.ndarray) -> list[np.ndarray]:
        """NaN, +inf and -inf among the window's seen values."""
        if self.nonfinite is None:
            return [np.zeros(len(lo), np.int64)] * 3
        return [p[self.runs.end] - p[lo] for p in self.nonfinite]

    def moments(self, lo: np.ndarray) -> tuple[np.ndarray, ...]:
        """Scaled double-double sums of y and y^2 over the window: (h1, l1, h2, l2)."""
        if self._s2 is None:
            self._s2 = dd_block_prefix_squares(self.y, self.blocks)
        end = self.runs.end
        h1, l1 = fast_two_sum(*dd_block_window(self.s1, lo, end))
        h2, l2 = fast_two_sum(*dd_block_window(self._s2, lo, end))
        return h1, l1, h2, l2

    def spread(self, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The smallest and largest seen finite value in the window."""
        end = self.runs.end
        low = window_reduce(np.where(self.ok, self.x, np.inf), lo, end, np.minimum, np.inf)
        high = window_reduce(np.where(self.ok, self.x, -np.inf), lo, end, np.maximum, -np.inf)
        return low, high


# Aggregations -----------------------------------------------------------------------------


def count(seen: np.ndarray | None, lo: np.ndarray, end: np.ndarray) -> np.ndarray:
    if seen is None:
        return end - lo
    c = prefix_sums(seen)
    return c[end] - c[lo]


def int_sum(x: np.ndarray, seen: np.ndarray | None, lo: np.ndarray, end: np.ndarray, name: str) -> np.ndarray:
    x = x if seen is None else np.where(seen, x, 0)
    if len(x) and float(np.abs(x.astype(np.float64)).max()) * len(x) >= 2.0**62:
        approx = prefix_sums(x.astype(np.float64))
        if np.any(np.abs(approx[end] - approx[lo]) >= 2.0**62):
            raise ValueError(f"feature {name!r}: a window's sum overflows int64; sum a rescaled column or use avg")
    c = prefix_sums(x)
    return c[end] - c[lo]


def first_last(events: Events, feat: Feature, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Position (in run order) of the first / last seen value in each window, and whether there is one."""
    order = events.tie_order(feat.column)
    seen = events.seen(feat.column, feat.where)
    if order is not None and seen is not None:
        seen = seen[order]
    pick = last_position if feat.agg == "last" else first_position
    pos, hit = pick(seen, lo, events.runs.end)
    pos = np.where(hit, pos, 0)
    return (pos if order is None else order[pos]), hit


def extreme(events: Events, feat: Feature, lo: np.ndarray) -> np.ndarray:
    """min / max of the window's seen values, as ranks for strings (see ``Events.ranks``)."""
    ranks = events.ranks(feat.column)[0]
    identity = extreme_identity(ranks.dtype, feat.agg)
    seen = events.seen(feat.column, feat.where)
    x = ranks if seen is None else np.where(seen, ranks, np.array(identity, ranks.dtype))
    return window_reduce(x, lo, events.runs.end, np.minimum if feat.agg == "min" else np.maximum, identity)


def unrank(events: Events, column: str, found: np.ndarray, empty: np.ndarray) -> np.ndarray:
    """Ranks back to the column's numbers (codes for strings)."""
    code_of_rank = events.ranks(column)[1]
    if events.types[column] != "string" or not len(code_of_rank):
        return found
    return code_of_rank[np.where(empty, 0, found)]


def window_feature(events: Events, feat: Feature, typ: str) -> pa.Array:
    """One feature's values over each probe's window ``(t - w, t]``."""
    runs = events.runs
    lo, end = runs.lower(None if feat.window_s is None else feat.window_s * 1_000_000), runs.end
    agg, column = feat.agg, feat.column
    if agg == "count":
        return pa.array(count(events.seen(column, feat.where), lo, end), pa.int64())
    if agg == "count_distinct":
        flags = np.zeros(runs.size, np.int64)
        flags[events.last_occurrences(column, feat.where)] = 1
        c = prefix_sums(flags)
        return pa.array(c[end] - c[lo], pa.int64())
    n = count(events.seen(column, feat.where), lo, end)
    empty = n == 0
    if agg in ("sum", "avg") and events.types[column] == "int64":
        total = int_sum(events.columns[column][0], events.seen(column, feat.where), lo, end, feat.name)
        values = total.astype(np.float64) / np.maximum(n, 1) if agg == "avg" else total
        return pa.array(values, COLUMN_TYPES[typ], mask=empty)
    if agg in ("sum", "avg", "stddev"):
        sums = events.floats(column, feat.where)
        nan, pos, neg = sums.nonfinite_counts(lo)
        if agg == "stddev":
            sd = sample_stddev(n, *sums.moments(lo), sums.exps)
            low, high = sums.spread(lo)
            sd = np.where(low == high, 0.0, sd)  # one repeated value: no spread at all
            sd = np.where(nan + pos + neg > 0, np.nan, sd)
            return pa.array(sd, pa.float64(), mask=n < 2)
        total = float_total(*sums.sum_parts(lo), nan, pos, neg)
        values = total / np.maximum(n, 1) if agg == "avg" else total
        return pa.array(values, pa.float64(), mask=empty)
    if agg in ("min", "max"):
        found = unrank(events, column, extreme(events, feat, lo), empty)
        return events.arrow(column, found, empty, typ)
    pos, hit = first_last(events, feat, lo)
    values = events.columns[column][0][pos] if runs.size else np.zeros(len(pos), np.int64)
    return events.arrow(column, values, ~hit, typ)


def to_arrow(values: np.ndarray, null: np.ndarray, typ: str, vocab: list | None) -> pa.Array:
    """Numbers in the engine's encoding (codes, microseconds, days, 0/1) as an Arrow array of ``typ``."""
    null = np.asarray(null, bool)
    if typ == "string":
        return pa.array(
            [None if z else vocab[c] for c, z in zip(values.tolist(), null.tolist(), strict=True)], pa.string()
        )
    if typ == "bool":
        return pa.array(values.astype(bool), pa.bool_(), mask=null)
    if typ == "date":
        return pa.array(values.astype(np.int32), pa.int32(), mask=null).cast(pa.date32())
    if typ == "timestamp":
        return pa.array(values.astype(np.int64), pa.int64(), mask=null).cast(COLUMN_TYPES["timestamp"])
    return pa.array(values, COLUMN_TYPES[typ], mask=null)
