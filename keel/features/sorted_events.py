"""A source's events sorted by (entity, time), each probe's window as positions among them, and
every aggregation over those windows (the "How" of ``keel.features.point_in_time``'s docstring).
"""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from keel.dsl import COLUMN_TYPES, Feature, window_seconds
from keel.features.encoding import Axis, PointInTimeError, entity_codes, filled_numpy, sortable
from keel.features.kernels import (
    Blocks,
    dd_block_moments,
    dd_block_prefix,
    dd_block_window,
    extreme_identity,
    fast_two_sum,
    first_position,
    float_total,
    last_position,
    prefix_sums,
    sample_stddev,
    sorted_window_distinct,
    sorted_window_extreme,
    stable_argsort,
)

_US = 1_000_000


class SortedEvents:
    """A source's events sorted by (entity, time), and each probe's bounds as positions among them.

    Every per-event array here is in sorted order (index i: the i-th event of the sort);
    every per-probe array is in sorted-probe order.
    """

    def __init__(self, ev: pa.Table, pr: pa.Table, n_keys: int, feats: list[Feature], threads: int):
        self.ev = ev
        self.n = ev.num_rows
        self.threads = threads
        codes, n_codes = entity_codes(ev, pr, n_keys)
        ev_codes, pr_codes = codes[: self.n], codes[self.n :]
        ts = filled_numpy(ev.column("_ts"))
        ok = (pr_codes >= 0) & pr.column("_t").is_valid().to_numpy(zero_copy_only=False)
        t = filled_numpy(pr.column("_t"), fill=int(ts.min()) if self.n else 0)
        back = {f.window_s * _US for f in feats if f.window_s is not None}
        self.axis = Axis(ts, t, sorted(back | {0}), n_codes)
        composite = self.axis.compose(ev_codes, ts)
        self.order = stable_argsort(composite, threads)
        self.composite = composite[self.order]
        self.codes, self.ts = self.axis.split(self.composite, lambda: ts[self.order])
        entity_changes = np.ones(self.n, bool)
        entity_changes[1:] = self.codes[1:] != self.codes[:-1]
        self.block_starts = np.flatnonzero(entity_changes)
        self.block_codes = self.codes[self.block_starts]
        # Probes with no key or time go to a block no event shares (code -1).
        pr_codes = np.where(ok, pr_codes, -1)
        probe_composite = self.axis.compose(pr_codes, t)
        self.probe_order = stable_argsort(probe_composite, threads)
        self.t = t[self.probe_order]
        self.probe_codes = pr_codes[self.probe_order]
        self.upper = np.searchsorted(self.composite, probe_composite[self.probe_order], "right")
        self.start = np.searchsorted(self.composite, self.axis.compose(self.probe_codes, None), "left")
        self._cache: dict = {}
        self._locks: dict = {}
        self._guard = threading.Lock()

    def lower(self, window_us: int | None) -> np.ndarray:
        """Per probe, the position of the first event inside the window (the entity's first for lifetime)."""
        if window_us is None:
            return self.start
        return self._cached(
            ("lower", window_us),
            lambda: np.searchsorted(self.composite, self.axis.compose(self.probe_codes, self.t - window_us), "right"),
        )

    @property
    def blocks(self) -> Blocks:
        """The entities' blocks of events, laid out once for every per-entity sum."""
        return self._cached("blocks", lambda: Blocks(self.block_starts, self.n))

    def alive(self, ttl: str | None) -> np.ndarray | None:
        """Per probe: the entity's latest event at or before t is within the TTL (None: no TTL)."""
        if ttl is None:
            return None
        if not self.n:
            return np.zeros(len(self.upper), bool)
        latest = self.ts[np.maximum(self.upper - 1, 0)]
        return (self.upper > self.start) & (latest >= self.t - window_seconds(ttl) * _US)

    def _cached(self, key, compute):
        """Each shared input computed once, also when features are computed in parallel."""
        if key not in self._cache:
            with self._guard:
                lock = self._locks.setdefault(key, threading.Lock())
            with lock:
                if key not in self._cache:
                    self._cache[key] = compute()
        return self._cache[key]

    # Inputs, in sorted event order -----------------------------------------------------

    def mask(self, column: str | None, where: str | None, by: str | None = None) -> np.ndarray | None:
        """Which events a feature sees (where TRUE, column not NULL; None: all), in sorted order
        (or in the tie order ``by``, see ``_tie_order``)."""

        def compute():
            order = self.order if by is None else self._tie_order(by)
            m = None
            if where is not None:
                m = filled_numpy(self.ev.column(where))[order]
            if column is not None and self.ev.column(column).null_count:
                valid = self.ev.column(column).is_valid().to_numpy(zero_copy_only=False)[order]
                m = valid if m is None else m & valid
            return m

        return self._cached(("mask", column, where, by), compute)

    def values(self, column: str) -> np.ndarray:
        """A numeric column in sorted order (NULL as 0)."""
        return self._cached(("values", column), lambda: filled_numpy(self.ev.column(column))[self.order])

    def seen_values(self, column: str, where: str | None) -> np.ndarray:
        """The column where the feature sees it, 0 elsewhere."""

        def compute():
            x, m = self.values(column), self.mask(column, where)
            return x if m is None else np.where(m, x, np.zeros(1, x.dtype))

        return self._cached(("seen", column, where), compute)

    def prefix(self, key, values) -> np.ndarray:
        """Prefix sums with a leading 0 (int64 sums wrap, so differences are exact when they fit)."""

        return self._cached(("prefix", *key), lambda: prefix_sums(values()))

    # Aggregations ------------------------------------------------------------------------

    def feature(self, feat: Feature, column: str | None, where: str | None, typ: str) -> pa.Array:
        w = None if feat.window_s is None else feat.window_s * _US
        agg = feat.agg
        if agg == "count":
            return pa.array(self.counts(column, where, w), pa.int64())
        if agg == "count_distinct":
            return pa.array(self.count_distinct(column, where, w), pa.int64())
        n = self.counts(column, where, w)
        if agg in ("sum", "avg"):
            total = self.window_sum(column, where, w, feat.name)
            if agg == "avg":
                total = total.astype(np.float64) / np.maximum(n, 1)
            return pa.array(total, COLUMN_TYPES[typ], mask=n == 0)
        if agg == "stddev":
            return pa.array(self.stddev(column, where, w, n), pa.float64(), mask=n < 2)
        if agg in ("min", "max"):
            return self.extreme(column, where, w, n, agg, typ)
        return self.first_last(column, where, w, agg)

    def counts(self, column: str | None, where: str | None, w: int | None) -> np.ndarray:
        m = self.mask(column, where)
        lo = self.lower(w)
        if m is None:
            return self.upper - lo
        prefix = self.prefix(("count", column, where), lambda: m)
        return prefix[self.upper] - prefix[lo]

    def window_sum(self, column: str, where: str | None, w: int | None, name: str) -> np.ndarray:
        x = self.seen_values(column, where)
        lo, up = self.lower(w), self.upper
        if x.dtype.kind == "i":
            prefix = self.prefix(("sum", column, where), lambda: x)
            if float(np.abs(x).max(initial=0)) * self.n >= 2.0**62:
                approx = self.prefix(("fsum", column, where), lambda: x.astype(np.float64))
                if np.any(np.abs(approx[up] - approx[lo]) >= 2.0**62):
                    raise PointInTimeError(
                        f"feature {name!r}: a window's sum of {column!r} overflows int64; "
                        "sum a rescaled column or use avg"
                    )
            return prefix[up] - prefix[lo]
        finite = np.isfinite(x)
        if finite.all():
            dd = self._cached(("dd", column, where), lambda: dd_block_prefix(x, self.blocks))
            hi, lo_part = dd_block_window(dd, lo, up)
            return hi + lo_part
        # IEEE semantics for inf and NaN, from counts of each; the finite rest as above.
        dd = self._cached(("dd", column, where), lambda: dd_block_prefix(np.where(finite, x, 0.0), self.blocks))
        hi, lo_part = dd_block_window(dd, lo, up)
        within = []
        for kind in (np.isnan, np.isposinf, np.isneginf):
            prefix = self.prefix(("nonfinite", kind.__name__, column, where), lambda k=kind: k(x))
            within.append(prefix[up] - prefix[lo])
        return float_total(hi, lo_part, *within)

    def stddev(self, column: str, where: str | None, w: int | None, n: np.ndarray) -> np.ndarray:
        sums, squares, exponents, changes, nxt, nonfinite = self._cached(
            ("moments", column, where), lambda: self._moments(column, where)
        )
        lo, up = self.lower(w), self.upper
        h1, l1 = fast_two_sum(*dd_block_window(sums, lo, up))
        h2, l2 = fast_two_sum(*dd_block_window(squares, lo, up))
        block = np.minimum(np.searchsorted(self.block_codes, self.probe_codes), len(exponents) - 1)
        sd = sample_stddev(n, h1, l1, h2, l2, exponents[block])
        # A window of one repeated value has no spread at all, not a rounding's worth.
        first = nxt[lo]
        sd = np.where(changes[up] - changes[np.minimum(first + 1, up)] == 0, 0.0, sd)
        if nonfinite is not None:
            sd = np.where(nonfinite[up] - nonfinite[lo] > 0, np.nan, sd)
        return sd

    def _moments(self, column: str, where: str | None):
        """Double-double prefix sums of x and x^2, x scaled per entity by a power of two (exact).

        The scale takes away the magnitude an entity's values share, so another entity's
        larger values never limit the precision of this one's windows. Also: prefix counts of
        where the value seen changes, and the next position seen.
        """
        x = self.seen_values(column, where).astype(np.float64, copy=False)
        m = self.mask(column, where)
        seen = m
        finite = np.isfinite(x)
        nonfinite = None
        if not finite.all():
            nonfinite = prefix_sums(~finite)
            seen = finite if seen is None else seen & finite
            x = np.where(finite, x, 0.0)
        sums, squares, exponents, changes, nxt = dd_block_moments(x, self.codes, self.blocks, seen)
        return sums, squares, exponents, changes, nxt, nonfinite

    def extreme(self, column: str, where: str | None, w: int | None, n, agg: str, typ: str) -> pa.Array:
        ranks, decode = self._cached(("ordered", column), lambda: sortable(self.ev.column(column), typ))
        x = ranks[self.order]
        m = self.mask(column, where)
        if m is not None:
            x = np.where(m, x, extreme_identity(x.dtype, agg))
        found = sorted_window_extreme(x, self.lower(w), self.upper, agg)
        return decode(found, n == 0)

    def first_last(self, column: str, where: str | None, w: int | None, agg: str) -> pa.Array:
        by = "_id" if "_id" in self.ev.column_names else column
        order = self._tie_order(by)
        seen = self.mask(column, where, by)
        lo, up = self.lower(w), self.upper
        pos, hit = (last_position if agg == "last" else first_position)(seen, lo, up)
        rows = pa.array(order[np.where(hit, pos, 0)] if self.n else np.zeros(len(up), np.int64), mask=~hit)
        col = self.ev.column(column)
        return col.take(rows).combine_chunks() if self.n else pa.nulls(len(up), col.type)

    def _tie_order(self, by: str) -> np.ndarray:
        """The sorted order with the events at one (entity, time) ordered by column ``by``."""

        def compute():
            same = self.composite[1:] == self.composite[:-1]
            if not same.any():
                return self.order
            tied = np.zeros(self.n, bool)
            tied[1:] |= same
            tied[:-1] |= same
            at = np.flatnonzero(tied)
            rows = self.order[at]
            sub = pa.table({"c": self.composite[at], "k": self.ev.column(by).take(pa.array(rows))})
            perm = pc.sort_indices(sub, sort_keys=[("c", "ascending"), ("k", "ascending")]).to_numpy()
            order = self.order.copy()
            order[at] = rows[perm]
            return order

        return self._cached(("ties", by), compute)

    def count_distinct(self, column: str, where: str | None, w: int | None) -> np.ndarray:
        codes = self._cached(("value codes", column), lambda: self._value_codes(column))
        return sorted_window_distinct(codes, self.mask(column, where), self.lower(w), self.upper)

    def _value_codes(self, column: str) -> np.ndarray:
        """The column's values as dense codes (one per distinct value), in sorted order."""
        values = self.ev.column(column)
        if pa.types.is_floating(values.type):
            values = pc.add(values, 0.0)  # -0.0 and 0.0 are one value
        enc = values.combine_chunks().dictionary_encode()
        return filled_numpy(enc.indices, fill=0).astype(np.int64)[self.order]
