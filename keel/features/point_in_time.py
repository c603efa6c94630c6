"""Point-in-time feature values: every feature of a group as it stood at each probe time.

The contract (DESIGN.md's point-in-time rule, in full):

- A probe is an entity (its join keys) and a time ``t``. A ``Feature`` at ``t`` sees the
  source events of that entity with ``event_ts <= t`` and, when windowed, ``event_ts > t - w``:
  windows are half-open, ``(t - w, t]``; ``lifetime`` has no lower bound. Only events whose
  ``where`` predicate is TRUE take part (NULL is not TRUE).
- ``count`` without a column counts events, ``count(column)`` the column's non-NULL values;
  ``sum``, ``avg``, ``min``, ``max``, ``stddev`` (sample: NULL under two values) and
  ``count_distinct`` aggregate non-NULL values. ``first`` / ``last`` are the value of the
  earliest / latest event, ordered by ``event_ts`` then event id, among the events whose value
  is not NULL. A source without event ids breaks such ties by the value itself (``last``
  takes the largest, ``first`` the smallest), so the answer never depends on row order.
- An entity with no such events gets NULL, except ``count`` and ``count_distinct``: 0.
- TTL: when the group has one and the entity's latest event with ``event_ts <= t`` (whatever
  ``where`` says) is missing or older than ``t - ttl``, every feature is NULL (counts 0).
- ``Derived`` features are SQL over the group's own features, evaluated after TTL masking in
  declaration order, so later ones may use earlier ones. A group reading upstream groups
  computes each of them at the same probes and evaluates its expressions over
  ``upstream_group.feature``.
- A probe whose key or time is NULL matches no events.

How, with no Python loop per row, event or entity: the source's events are read once, the
entity keys dictionary-encoded, and the events sorted (an LSD radix sort built on np.sort,
split across threads) by one int64 composite of (entity code, time in microseconds) -- or
(entity code, rank of the time among all the times involved) when microseconds would not
fit, so the composite is always exact. Each probe bound (``t``; ``t - w`` for each window; the
entity's first event) then becomes a position in that sorted array by one binary search, the
probes sorted first so the searches stream. Between two positions:

- ``count``, ``sum``, ``avg`` are differences of prefix sums. Float prefix sums carry the
  exact rounding error of every addition (TwoSum) in a second prefix array, so a window's sum
  keeps its own precision unless everything summed before it (all entities) is some 1e16
  times larger (its last bit can depend on those other events); int64 sums wrap and come
  out exact. ``stddev`` uses prefix sums of values and
  of their exact squares (Dekker) in double-double arithmetic, each entity scaled by a power
  of two, so neither another entity's values nor sums of squares cancel its precision away,
  and a window of one repeated value gives exactly 0.
- ``last`` / ``first``: the latest / earliest qualifying position inside the window, from a
  running maximum / minimum of positions.
- ``min`` / ``max``: a sparse table, built one level at a time (O(n log n) work, O(n) memory).
- ``count_distinct``: an event is the earliest occurrence of its value in ``(t - w, t]``
  exactly when ``t`` lies in ``[max(ts, ts_prev + w), ts + w)``, ``ts_prev`` being the previous
  occurrence of the same value; so the count is the number of those intervals holding ``t``:
  two sorted arrays of interval ends and two binary searches.

Features are computed in parallel threads (NumPy releases the GIL). ``bench/pit_join.py``
measures all this against a bare DuckDB ASOF join of the same data.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from keel.dsl import COLUMN_TYPES, DUCKDB_TYPES, Derived, Feature, FeatureGroup, window_seconds

_US = 1_000_000
# Composite sort keys stay below this; a test lowers it to exercise the rank-of-time path.
COMPOSITE_LIMIT = 1 << 62
_SPLIT = 134217729.0  # 2**27 + 1, Dekker's splitter for exact float64 products


class PointInTimeError(ValueError):
    """Feature values cannot be computed as asked; the message says why and what to do."""


def point_in_time(
    con: duckdb.DuckDBPyConnection, group: FeatureGroup, events: Mapping[str, str], probes: str
) -> duckdb.DuckDBPyRelation:
    """``_probe`` and one column per feature of ``group`` (declaration order), one row per probe.

    ``events`` maps each source name the group reads (through upstream groups too) to a table
    or view on ``con`` with that source's rows; ``probes`` names a table or view with the
    entity's join keys, ``_t`` (TIMESTAMPTZ) and a unique ``_probe`` (BIGINT). Rows come in
    ``_probe`` order. NumPy work uses as many threads as DuckDB may use on ``con`` (at most 4).
    """
    return _group_values(con, group, events, probes, {})


def _group_values(con, group: FeatureGroup, events, probes: str, done: dict) -> duckdb.DuckDBPyRelation:
    if group.name in done:
        return done[group.name]
    if group.source is None:
        rel = _from_upstream(con, group, events, probes, done)
    else:
        view = events.get(group.source.name)
        if view is None:
            raise PointInTimeError(
                f"feature group {group.name!r} reads source {group.source.name!r}, but events names no table "
                f"for it (has: {', '.join(events) or 'none'}); pass events={{'{group.source.name}': '<table>'}}"
            )
        rel = con.from_arrow(_source_values(con, group, view, probes))
        for feat in group.features:
            if isinstance(feat, Derived):
                # Aliased as the group, so expressions may also say group.feature (as the DSL's check allows).
                expr = f'*, CAST(({feat.expr}) AS {DUCKDB_TYPES[feat.type]}) AS "{feat.name}"'
                rel = _project(rel.set_alias(group.name), group, feat, expr)
        rel = rel.project(", ".join(["_probe"] + [f'"{f.name}"' for f in group.features]))
    done[group.name] = rel
    return rel


def _from_upstream(con, group: FeatureGroup, events, probes: str, done: dict) -> duckdb.DuckDBPyRelation:
    joined = None
    for up in group.upstream:
        if not isinstance(up, FeatureGroup):
            raise PointInTimeError(
                f"feature group {group.name!r}: upstream {up!r} is a name, not a group; "
                "load the project (keel.project) so upstream names resolve to FeatureGroup objects"
            )
        part = _group_values(con, up, events, probes, done).set_alias(up.name)
        joined = part if joined is None else joined.join(part, "_probe")
    exprs = [f'CAST(({f.expr}) AS {DUCKDB_TYPES[f.type]}) AS "{f.name}"' for f in group.features]
    return _project(joined, group, None, ", ".join(["_probe", *exprs])).order("_probe")


def _project(rel, group: FeatureGroup, feat: Derived | None, exprs: str) -> duckdb.DuckDBPyRelation:
    try:
        return rel.project(exprs)
    except duckdb.Error as exc:
        what = f"feature {feat.name!r}" if feat else "derived features"
        raise PointInTimeError(
            f"feature group {group.name!r}, {what}: expression does not evaluate ({str(exc).splitlines()[0]}); "
            "name the group's own features, or upstream features as group.feature"
        ) from None


# One source group ------------------------------------------------------------------------


def _source_values(con, group: FeatureGroup, view: str, probes: str) -> pa.Table:
    """``_probe`` and the group's aggregations (not its derived features) as Arrow, in ``_probe`` order."""
    source = group.source
    feats = [f for f in group.features if isinstance(f, Feature)]
    keys = [f'"{k}"' for k in group.key_columns]
    columns = list(dict.fromkeys(f.column for f in feats if f.column))
    wheres = list(dict.fromkeys(f.where for f in feats if f.where))
    ordered = source.event_id is not None and any(f.agg in ("first", "last") for f in feats)
    select = [f'{k} AS "_k{i}"' for i, k in enumerate(keys)] + [f'epoch_us("{source.timestamp}") AS "_ts"']
    select += [f'"{c}" AS "_c{i}"' for i, c in enumerate(columns)]
    select += [f'coalesce(CAST(({w}) AS BOOLEAN), false) AS "_w{i}"' for i, w in enumerate(wheres)]
    if ordered:
        select.append(f'"{source.event_id}" AS "_id"')
    present = " AND ".join(f"{c} IS NOT NULL" for c in [*keys, f'"{source.timestamp}"'])
    try:
        ev = con.sql(f"SELECT {', '.join(select)} FROM {view} WHERE {present}").to_arrow_table()
        pr = con.sql(
            f"SELECT {', '.join(f'{k} AS _k{i}' for i, k in enumerate(keys))}, epoch_us(_t) AS _t, _probe FROM {probes}"
        ).to_arrow_table()
    except duckdb.Error as exc:
        raise PointInTimeError(
            f"feature group {group.name!r}: cannot read events {view!r} or probes {probes!r} "
            f"({str(exc).splitlines()[0]}); events need the source's keys, {source.timestamp!r} and the "
            f"columns the features use; probes need {', '.join(group.key_columns)}, _t and _probe"
        ) from None
    if pr.num_rows == 0:
        return pa.table(
            [pa.array([], pa.int64())] + [pa.array([], COLUMN_TYPES[group.feature_type(f)]) for f in feats],
            names=["_probe"] + [f.name for f in feats],
        )
    e = _Events(ev, pr, len(keys), feats, _threads(con))
    ids = _numpy(pr.column("_probe"))[e.probe_order]
    by_id = np.argsort(ids, kind="stable")  # rows leave in _probe order
    out = {"_probe": pa.array(ids[by_id], pa.int64())}
    col = {c: f"_c{i}" for i, c in enumerate(columns)}
    whr = {w: f"_w{i}" for i, w in enumerate(wheres)}
    alive = e.alive(group.ttl)

    def value(feat: Feature) -> pa.Array:
        values = e.feature(feat, col.get(feat.column), whr.get(feat.where), group.feature_type(feat))
        if alive is not None:
            values = _expire(values, alive, feat.agg in ("count", "count_distinct"))
        return values.take(pa.array(by_id))

    with ThreadPoolExecutor(e.threads) as pool:
        out.update(zip([f.name for f in feats], pool.map(value, feats), strict=True))
    return pa.table(out)


def _expire(values: pa.Array, alive: np.ndarray, count: bool) -> pa.Array:
    """TTL: values of probes whose entity is not alive become NULL (counts 0)."""
    if count:
        return pa.array(np.where(alive, values.to_numpy(), 0), pa.int64())
    return pc.if_else(pa.array(alive), values, pa.nulls(len(values), values.type))


class _Events:
    """A source's events sorted by (entity, time), and each probe's bounds as positions among them.

    Every per-event array here is in sorted order (index i: the i-th event of the sort);
    every per-probe array is in sorted-probe order.
    """

    def __init__(self, ev: pa.Table, pr: pa.Table, n_keys: int, feats: list[Feature], threads: int):
        self.ev = ev
        self.n = ev.num_rows
        self.threads = threads
        codes, n_codes = _entity_codes(ev, pr, n_keys)
        ev_codes, pr_codes = codes[: self.n], codes[self.n :]
        ts = _numpy(ev.column("_ts"))
        ok = (pr_codes >= 0) & pr.column("_t").is_valid().to_numpy(zero_copy_only=False)
        t = _numpy(pr.column("_t"), fill=int(ts.min()) if self.n else 0)
        back = {f.window_s * _US for f in feats if f.window_s is not None}
        forward = {f.window_s * _US for f in feats if f.window_s is not None and f.agg == "count_distinct"}
        self.axis = _Axis(ts, t, sorted(back | {0}), sorted(forward), n_codes)
        composite = self.axis.compose(ev_codes, ts)
        self.order = _argsort(composite, threads)
        self.composite = composite[self.order]
        self.codes, self.ts = self.axis.split(self.composite, lambda: ts[self.order])
        entity_changes = np.ones(self.n, bool)
        entity_changes[1:] = self.codes[1:] != self.codes[:-1]
        self.block_starts = np.flatnonzero(entity_changes)
        self.block_codes = self.codes[self.block_starts]
        # Probes with no key or time go to a block no event shares (code -1).
        pr_codes = np.where(ok, pr_codes, -1)
        probe_composite = self.axis.compose(pr_codes, t)
        self.probe_order = _argsort(probe_composite, threads)
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
                m = _numpy(self.ev.column(where))[order]
            if column is not None and self.ev.column(column).null_count:
                valid = self.ev.column(column).is_valid().to_numpy(zero_copy_only=False)[order]
                m = valid if m is None else m & valid
            return m

        return self._cached(("mask", column, where, by), compute)

    def values(self, column: str) -> np.ndarray:
        """A numeric column in sorted order (NULL as 0)."""
        return self._cached(("values", column), lambda: _numpy(self.ev.column(column))[self.order])

    def seen_values(self, column: str, where: str | None) -> np.ndarray:
        """The column where the feature sees it, 0 elsewhere."""

        def compute():
            x, m = self.values(column), self.mask(column, where)
            return x if m is None else np.where(m, x, np.zeros(1, x.dtype))

        return self._cached(("seen", column, where), compute)

    def prefix(self, key, values) -> np.ndarray:
        """Prefix sums with a leading 0 (int64 sums wrap, so differences are exact when they fit)."""

        def compute():
            x = values()
            out = np.zeros(len(x) + 1, np.int64 if x.dtype.kind in "bi" else x.dtype)
            np.cumsum(x, out=out[1:])
            return out

        return self._cached(("prefix", *key), compute)

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
            s, e = self._cached(("dd", column, where), lambda: _dd_prefix(x))
            hi, lo_part = _dd_window(s, e, lo, up)
            return hi + lo_part
        # IEEE semantics for inf and NaN, from counts of each; the finite rest as above.
        s, e = self._cached(("dd", column, where), lambda: _dd_prefix(np.where(finite, x, 0.0)))
        hi, lo_part = _dd_window(s, e, lo, up)
        within = {}
        for kind in (np.isnan, np.isposinf, np.isneginf):
            prefix = self.prefix(("nonfinite", kind.__name__, column, where), lambda k=kind: k(x))
            within[kind] = prefix[up] - prefix[lo]
        nan, pos, neg = within[np.isnan] > 0, within[np.isposinf] > 0, within[np.isneginf] > 0
        total = np.where(pos, np.inf, np.where(neg, -np.inf, hi + lo_part))
        return np.where(nan | (pos & neg), np.nan, total)

    def stddev(self, column: str, where: str | None, w: int | None, n: np.ndarray) -> np.ndarray:
        (s1, e1), (s2, e2), exponents, changes, nxt, nonfinite = self._cached(
            ("moments", column, where), lambda: self._moments(column, where)
        )
        lo, up = self.lower(w), self.upper
        h1, l1 = _fast_two_sum(*_dd_window(s1, e1, lo, up))
        h2, l2 = _fast_two_sum(*_dd_window(s2, e2, lo, up))
        # n * sum(y^2) - sum(y)^2 in double-double, then one rounding.
        nf = n.astype(np.float64)
        a, ae = _two_product(nf, h2)
        ae += nf * l2
        b, be = _two_product(h1, h1)
        be += 2.0 * h1 * l1 + l1 * l1
        d, de = _two_sum(a, -b)
        diff = d + (de + (ae - be))
        block = np.minimum(np.searchsorted(self.block_codes, self.probe_codes), len(exponents) - 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            sd = np.ldexp(np.sqrt(np.maximum(diff, 0.0) / (nf * (nf - 1.0))), exponents[block])
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
            nonfinite = np.concatenate([[0], np.cumsum(~finite)])
            seen = finite if seen is None else seen & finite
            x = np.where(finite, x, 0.0)
        sizes = np.diff(np.append(self.block_starts, self.n))
        largest = np.maximum.reduceat(np.abs(x), self.block_starts) if self.n else np.zeros(1)
        exponents = np.frexp(largest)[1].astype(np.int64)
        y = np.ldexp(x, np.repeat(-exponents[: len(sizes)], sizes))
        p, err = _two_product(y, y)
        s2, e2 = _dd_prefix(p)
        del p
        e2[1:] += np.cumsum(err)
        del err
        # Changes of value between consecutive seen events (a new entity counts as a change).
        at = None if seen is None else np.flatnonzero(seen)
        xs, cs = (x, self.codes) if at is None else (x[at], self.codes[at])
        change = np.zeros(self.n, np.int64)
        moved = (xs[1:] != xs[:-1]) | (cs[1:] != cs[:-1])
        if at is None:
            change[1:] = moved
        else:
            change[at[1:]] = moved
        changes = np.concatenate([[0], np.cumsum(change)])
        nxt = np.arange(self.n + 1) if seen is None else _next_seen(seen)
        return _dd_prefix(y), (s2, e2), exponents, changes, nxt, nonfinite

    def extreme(self, column: str, where: str | None, w: int | None, n, agg: str, typ: str) -> pa.Array:
        ranks, decode = self._cached(("ordered", column), lambda: _ordered(self.ev.column(column), typ))
        x = ranks[self.order]
        m = self.mask(column, where)
        if m is not None:
            x = np.where(m, x, _identity(x.dtype, agg))
        found = _range_extreme(x, self.lower(w), self.upper, np.minimum if agg == "min" else np.maximum)
        return decode(found, n == 0)

    def first_last(self, column: str, where: str | None, w: int | None, agg: str) -> pa.Array:
        by = "_id" if "_id" in self.ev.column_names else column
        order = self._tie_order(by)
        seen = self.mask(column, where, by)
        lo, up = self.lower(w), self.upper
        if seen is None:
            pos, hit = (up - 1, up > lo) if agg == "last" else (lo, lo < up)
        elif agg == "last":
            latest = np.maximum.accumulate(np.where(seen, np.arange(self.n), -1))
            pos = latest[np.maximum(up - 1, 0)] if self.n else up
            hit = (up > lo) & (pos >= lo)
        else:
            pos = _next_seen(seen)[lo]
            hit = pos < up
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
        seen, by_value, first = self._cached(("distinct", column, where), lambda: self._occurrences(column, where))
        if w is None:
            flags = np.zeros(self.n, bool)
            flags[by_value[first]] = True
            prefix = self.prefix(("first seen", column, where), lambda: flags)
            return prefix[self.upper] - prefix[self.start]
        # Event i is the earliest of its value in (t - w, t] exactly for t in [begin_i, end_i),
        # begin_i = max(ts_i, previous occurrence + w), end_i = ts_i + w.
        ts = self.ts[by_value]
        begin = np.maximum(ts, np.concatenate([[0], ts[:-1]]) + w)
        begin[first] = ts[first]
        starts = np.sort(self.axis.compose(self.codes[by_value], begin))
        ends = self.axis.compose(self.codes[seen], self.ts[seen] + w)  # already in order
        probe = self.axis.compose(self.probe_codes, self.t)
        return np.searchsorted(starts, probe, "right") - np.searchsorted(ends, probe, "right")

    def _occurrences(self, column: str, where: str | None):
        """Positions seen; the same, ordered by (entity, value, time); which of those start a value."""
        m = self.mask(column, where)
        values = self.ev.column(column)
        if pa.types.is_floating(values.type):
            values = pc.add(values, 0.0)  # -0.0 and 0.0 are one value
        enc = values.combine_chunks().dictionary_encode()
        codes = _numpy(enc.indices, fill=0).astype(np.int64)[self.order]
        seen = np.arange(self.n) if m is None else np.flatnonzero(m)
        n_values = max(len(enc.dictionary), 1)
        pair, _ = _combine(self.codes[seen], int(self.codes.max(initial=0)) + 1, codes[seen], n_values)
        by_pair = _argsort(pair, self.threads)  # stable: keeps time order within a pair
        pair = pair[by_pair]
        first = np.ones(len(pair), bool)
        first[1:] = pair[1:] != pair[:-1]
        return seen, seen[by_pair], first


class _Axis:
    """(entity code, time) as one int64 that sorts like the pair and keeps every comparison made.

    Time is microseconds from a base when (entities x 2^bits) fits; otherwise it is the rank
    of the time among every time the engine will compare (events, probe bounds, interval ends).
    """

    def __init__(self, ts: np.ndarray, t: np.ndarray, back: list[int], forward: list[int], n_codes: int):
        lows, highs = [], []
        if len(ts):
            lows.append(int(ts.min()))
            highs.append(int(ts.max()) + max(forward, default=0))
        if len(t):
            lows.append(int(t.min()) - back[-1])
            highs.append(int(t.max()))
        lo, hi = min(lows, default=0), max(highs, default=0)
        self.lo = lo - 1  # offset 0 lies before every event
        self.bits = max(hi - self.lo, 1).bit_length()
        self.ranks = None
        if n_codes << self.bits >= COMPOSITE_LIMIT:
            times = [ts, *(ts + f for f in forward), *(t - b for b in back)]
            self.ranks = np.unique(np.concatenate(times))
            self.width = len(self.ranks) + 1
            if n_codes * self.width >= 1 << 63:
                raise PointInTimeError(f"{n_codes} entities x {self.width} distinct times do not fit int64 keys")

    def compose(self, codes: np.ndarray, times: np.ndarray | None) -> np.ndarray:
        """Composite keys; times None gives each entity's lowest key."""
        if self.ranks is None:
            out = np.left_shift(codes, self.bits)
            if times is not None:
                out += times
                out -= self.lo
            return out
        base = codes * self.width
        return base if times is None else base + np.searchsorted(self.ranks, times, "left") + 1

    def split(self, composite: np.ndarray, times) -> tuple[np.ndarray, np.ndarray]:
        """Entity codes and times back from sorted composites (``times()``: the times if ranks were used)."""
        if self.ranks is None:
            return composite >> self.bits, (composite & ((1 << self.bits) - 1)) + self.lo
        return composite // self.width, times()


# Kernels ---------------------------------------------------------------------------------


def _entity_codes(ev: pa.Table, pr: pa.Table, n_keys: int) -> tuple[np.ndarray, int]:
    """One int64 per event and probe naming its entity (events first); -1 where a key is NULL."""
    codes, size = None, 1
    for i in range(n_keys):
        e, p = ev.column(f"_k{i}"), pr.column(f"_k{i}")
        if p.type != e.type:
            try:
                p = p.cast(e.type)
            except pa.ArrowInvalid as exc:
                raise PointInTimeError(
                    f"probe key {i + 1} has type {p.type} but the events' has {e.type} ({exc}); "
                    "cast the probes' keys to the entity's declared types"
                ) from None
        enc = pa.chunked_array(e.chunks + p.chunks, type=e.type).dictionary_encode()
        idx = _numpy(pa.chunked_array([c.indices for c in enc.chunks], type=enc.chunks[0].indices.type), fill=-1)
        idx = idx.astype(np.int64)
        n = len(enc.chunks[0].dictionary) if enc.num_chunks else 0
        if codes is None:
            codes, size = idx, max(n, 1)
        else:
            missing = (codes < 0) | (idx < 0)
            codes, size = _combine(codes, size, idx, max(n, 1))
            codes[missing] = -1
    return codes, size


def _combine(a: np.ndarray, na: int, b: np.ndarray, nb: int) -> tuple[np.ndarray, int]:
    """Pairs of codes as one code, made dense first when the product would overflow."""
    if na * nb >= 1 << 62:
        _, a = np.unique(a, return_inverse=True)
        _, b = np.unique(b, return_inverse=True)
        na, nb = int(a.max(initial=0)) + 1, int(b.max(initial=0)) + 1
    return a * nb + b, na * nb


def _threads(con: duckdb.DuckDBPyConnection) -> int:
    """Threads for numpy work: as many as DuckDB may use on ``con``, within the CPUs we have, at most 4."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    allowed = int(con.sql("SELECT current_setting('threads')").fetchall()[0][0])
    return max(1, min(cpus, allowed, 4))


def _argsort(x: np.ndarray, threads: int = 1) -> np.ndarray:
    """A stable argsort of int64 keys, split by value range across threads (numpy sorts without the GIL)."""
    x = x - x.min(initial=0) if len(x) and x.min() < 0 else x
    if threads < 2 or len(x) < 1 << 20:
        return _radix_argsort(x)
    pivots = np.unique(np.quantile(x[:: max(len(x) // 10_000, 1)], np.linspace(0, 1, threads + 1)[1:-1]))
    part = np.searchsorted(pivots, x, "right")
    chunks = [np.flatnonzero(part == i) for i in range(len(pivots) + 1)]
    del part
    with ThreadPoolExecutor(len(chunks)) as pool:
        return np.concatenate(list(pool.map(lambda ix: ix[_radix_argsort(x[ix])], chunks)))


def _radix_argsort(x: np.ndarray) -> np.ndarray:
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


def _next_seen(seen: np.ndarray) -> np.ndarray:
    """For each position (and one past the end), the first position at or after it that is seen."""
    n = len(seen)
    out = np.full(n + 1, n, np.int64)
    if n:
        out[:n] = np.minimum.accumulate(np.where(seen, np.arange(n), n)[::-1])[::-1]
    return out


def _numpy(arr, fill=0) -> np.ndarray:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if arr.null_count:
        arr = pc.fill_null(arr, fill)
    return arr.to_numpy(zero_copy_only=False)


def _two_sum(a, b):
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _fast_two_sum(a, b):
    s = a + b
    return s, b - (s - a)


def _two_product(a, b):
    p = a * b
    ca, cb = _SPLIT * a, _SPLIT * b
    ah = ca - (ca - a)
    bh = cb - (cb - b)
    al, bl = a - ah, b - bh
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def _dd_prefix(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Prefix sums (with a leading 0) and the running sum of every addition's exact rounding error."""
    s = np.zeros(len(x) + 1)
    np.cumsum(x, out=s[1:])  # a sequential accumulate: s[i+1] = fl(s[i] + x[i])
    # TwoSum of (s[i], x[i]) with its sum known, in place: err = (a - (s - bb)) + (x - bb), bb = s - a.
    a, total = s[:-1], s[1:]
    bb = np.subtract(total, a)
    err = np.subtract(total, bb)
    np.subtract(a, err, out=err)
    np.subtract(x, bb, out=bb)
    np.add(err, bb, out=err)
    del bb
    e = np.zeros(len(x) + 1)
    np.cumsum(err, out=e[1:])
    return s, e


def _dd_window(s, e, lo, up):
    hi, err = _two_sum(s[up], -s[lo])
    return hi, err + (e[up] - e[lo])


def _identity(dtype, agg: str):
    if dtype.kind == "f":
        return np.inf if agg == "min" else -np.inf
    info = np.iinfo(dtype)
    return info.max if agg == "min" else info.min


def _range_extreme(x: np.ndarray, lo: np.ndarray, up: np.ndarray, fn) -> np.ndarray:
    """fn-reduction of x[lo:up] for every non-empty range, by a sparse table built level by level."""
    length = up - lo
    out = np.zeros(len(lo), x.dtype)
    todo = np.flatnonzero(length > 0)
    if not len(todo):
        return out
    level = np.frexp(length[todo].astype(np.float64))[1] - 1  # floor(log2(length)), exact
    by_level = np.argsort(level, kind="stable")
    todo, level = todo[by_level], level[by_level]
    edges = np.searchsorted(level, np.arange(int(level[-1]) + 2))
    table = x
    for j in range(int(level[-1]) + 1):
        if j:
            half = 1 << (j - 1)
            table = fn(table[:-half], table[half:])
        q = todo[edges[j] : edges[j + 1]]
        if len(q):
            out[q] = fn(table[lo[q]], table[up[q] - (1 << j)])
    return out


def _ordered(col: pa.ChunkedArray, typ: str):
    """The column as sortable numbers, and a decoder from those numbers back to Arrow values."""
    arrow_type = COLUMN_TYPES[typ]
    col = col.combine_chunks()
    if typ == "string":
        enc = col.dictionary_encode()
        by_value = pc.sort_indices(enc.dictionary).to_numpy()
        rank = np.empty(len(by_value), np.int64)
        rank[by_value] = np.arange(len(by_value))
        idx = _numpy(enc.indices, fill=0).astype(np.int64)
        ranks = rank[idx] if len(rank) else idx

        def decode(found, empty):
            return enc.dictionary.take(
                pa.array(by_value[np.where(empty, 0, found)] if len(by_value) else found, mask=empty)
            )

        return ranks, decode
    if typ in ("timestamp", "date"):
        raw = col.cast(arrow_type).cast(pa.int64() if typ == "timestamp" else pa.int32())
        ranks = _numpy(raw).astype(np.int64)
        storage = pa.int64() if typ == "timestamp" else pa.int32()

        def decode(found, empty):
            return pa.array(found.astype(storage.to_pandas_dtype()), storage, mask=empty).cast(arrow_type)

        return ranks, decode
    ranks = _numpy(col)

    def decode(found, empty):
        return pa.array(found, arrow_type, mask=empty)

    return ranks, decode
