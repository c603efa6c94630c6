"""Aggregations over windows that end at each probe's entity's latest event: keel.stream.state's kernels.

Events of several probes lie end to end in one array, one run per probe, each run in time
order (then event id). A probe's time is never before its entity's latest event, so every
window ``(t - w, t]`` is a suffix ``[lo, end)`` of the probe's run and lifetime is the whole
run. That makes each aggregation a handful of whole-array NumPy passes, never a loop per event:

- counts and integer sums: differences of prefix sums (int64 sums wrap, so they come out exact);
- float sums and ``stddev``: double-double prefix sums of the values and of their exact squares,
  each run scaled by its own power of two (the arithmetic of ``keel.features.point_in_time``), so no other
  run's magnitude costs this one precision and one repeated value gives exactly 0;
- ``min`` / ``max``: one ``reduceat`` over the runs' window bounds;
- ``first`` / ``last``: the first / last seen position inside the window;
- ``count_distinct``: the window is a suffix, so a value occurs in it exactly when its last
  occurrence in the run does; counting those last occurrences is a prefix-sum difference.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from keel.dsl import COLUMN_TYPES, Feature

# One set of double-double primitives for both engines, so offline and online round alike.
from keel.features.point_in_time import _dd_prefix, _dd_window, _fast_two_sum, _next_seen, _two_product, _two_sum

EMPTY = np.zeros(0, np.int64)
_INT_EXTREMES = (np.iinfo(np.int64).max, np.iinfo(np.int64).min)


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
    """Double-double prefix sums of seen finite values and of their squares, scaled per run.

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
        self.s1 = _dd_prefix(self.y)
        self._s2 = None
        bad = ~finite if seen is None else seen & ~finite
        self.nonfinite = None
        if bad.any():
            self.nonfinite = [prefix(bad & kind(x)) for kind in (np.isnan, np.isposinf, np.isneginf)]

    def sum_parts(self, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The window's sum as an unscaled double-double (hi, lo)."""
        hi, low = _fast_two_sum(*_dd_window(*self.s1, lo, self.runs.end))
        return np.ldexp(hi, self.exps), np.ldexp(low, self.exps)

    def nonfinite_counts(self, lo: np.ndarray) -> list[np.ndarray]:
        """NaN, +inf and -inf among the window's seen values."""
        if self.nonfinite is None:
            return [np.zeros(len(lo), np.int64)] * 3
        return [p[self.runs.end] - p[lo] for p in self.nonfinite]

    def moments(self, lo: np.ndarray) -> tuple[np.ndarray, ...]:
        """Scaled double-double sums of y and y^2 over the window: (h1, l1, h2, l2)."""
        if self._s2 is None:
            p, err = _two_product(self.y, self.y)
            s2, e2 = _dd_prefix(p)
            e2[1:] += np.cumsum(err)
            self._s2 = (s2, e2)
        end = self.runs.end
        h1, l1 = _fast_two_sum(*_dd_window(*self.s1, lo, end))
        h2, l2 = _fast_two_sum(*_dd_window(*self._s2, lo, end))
        return h1, l1, h2, l2

    def spread(self, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The smallest and largest seen finite value in the window."""
        end = self.runs.end
        low = window_reduce(np.where(self.ok, self.x, np.inf), lo, end, np.minimum, np.inf)
        high = window_reduce(np.where(self.ok, self.x, -np.inf), lo, end, np.maximum, -np.inf)
        return low, high


# Kernels ----------------------------------------------------------------------------------


def prefix(x: np.ndarray) -> np.ndarray:
    """Prefix sums with a leading 0 (int64 sums wrap, so differences are exact when they fit)."""
    out = np.zeros(len(x) + 1, np.int64 if x.dtype.kind in "bi" else x.dtype)
    np.cumsum(x, out=out[1:])
    return out


def count(seen: np.ndarray | None, lo: np.ndarray, end: np.ndarray) -> np.ndarray:
    if seen is None:
        return end - lo
    c = prefix(seen)
    return c[end] - c[lo]


def window_reduce(x: np.ndarray, lo: np.ndarray, end: np.ndarray, fn, identity) -> np.ndarray:
    """fn-reduction of x[lo:end] per probe (identity where the window is empty)."""
    if not len(lo):
        return np.zeros(0, x.dtype)
    padded = np.append(x, np.array(identity, x.dtype))  # every bound, end included, is a valid index
    bounds = np.empty(2 * len(lo), np.intp)
    bounds[0::2], bounds[1::2] = lo, end
    out = fn.reduceat(padded, bounds)[0::2]
    return np.where(lo < end, out, np.array(identity, x.dtype))


def int_sum(x: np.ndarray, seen: np.ndarray | None, lo: np.ndarray, end: np.ndarray, name: str) -> np.ndarray:
    x = x if seen is None else np.where(seen, x, 0)
    if len(x) and float(np.abs(x.astype(np.float64)).max()) * len(x) >= 2.0**62:
        approx = prefix(x.astype(np.float64))
        if np.any(np.abs(approx[end] - approx[lo]) >= 2.0**62):
            raise ValueError(f"feature {name!r}: a window's sum overflows int64; sum a rescaled column or use avg")
    c = prefix(x)
    return c[end] - c[lo]


def float_total(hi: np.ndarray, lo: np.ndarray, nan, pos, neg) -> np.ndarray:
    """hi + lo, with IEEE's answer where the values summed hold NaN or infinities."""
    total = np.where(pos > 0, np.inf, np.where(neg > 0, -np.inf, hi + lo))
    return np.where((nan > 0) | ((pos > 0) & (neg > 0)), np.nan, total)


def stddev(n: np.ndarray, h1, l1, h2, l2, exps: np.ndarray) -> np.ndarray:
    """Sample standard deviation from scaled double-double moments: n * sum(y^2) - sum(y)^2, rounded once."""
    nf = n.astype(np.float64)
    a, ae = _two_product(nf, h2)
    ae = ae + nf * l2
    b, be = _two_product(h1, h1)
    be = be + 2.0 * h1 * l1 + l1 * l1
    d, de = _two_sum(a, -b)
    diff = d + (de + (ae - be))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.ldexp(np.sqrt(np.maximum(diff, 0.0) / (nf * (nf - 1.0))), exps)


def last_position(seen: np.ndarray | None, lo: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if seen is None:
        return end - 1, end > lo
    if not len(seen):
        return np.full(len(end), -1), np.zeros(len(end), bool)
    latest = np.maximum.accumulate(np.where(seen, np.arange(len(seen)), -1))
    pos = latest[np.maximum(end - 1, 0)]
    return pos, (end > lo) & (pos >= lo)


def first_position(seen: np.ndarray | None, lo: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if seen is None:
        return lo, lo < end
    pos = _next_seen(seen)[lo]
    return pos, pos < end


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
    if ranks.dtype.kind == "f":
        identity = np.inf if feat.agg == "min" else -np.inf
    else:
        identity = _INT_EXTREMES[0] if feat.agg == "min" else _INT_EXTREMES[1]
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
        c = prefix(flags)
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
            sd = stddev(n, *sums.moments(lo), sums.exps)
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


# Lifetime state ------------------------------------------------------------------------------

_NO_EVENT = np.iinfo(np.int64).min
_FIELDS = {
    "count": {},
    "count_distinct": {"sets": None},
    "int_sum": {"total": 0, "approx": 0.0},
    "float_sum": {"hi": 0.0, "lo": 0.0, "nan": 0, "pos": 0, "neg": 0},
    "stddev": {
        "exp": -(1 << 20),
        "h1": 0.0,
        "l1": 0.0,
        "h2": 0.0,
        "l2": 0.0,
        "low": np.inf,
        "high": -np.inf,
        "bad": 0,
    },
    "first_last": {"ts": _NO_EVENT, "tie": None, "value": None},
}


class Lifetime:
    """A lifetime aggregation's running state per entity (index: entity id), folded in as events arrive.

    Arrival order does not matter: counts and sums add (float sums and moments stay
    double-double, moments scaled per entity by a power of two that only grows, so rescaling is
    exact); min / max fold with their identities; first / last keep the (time, tie, value) of
    their event; count_distinct keeps each entity's set of values. Evicting buffered events
    never touches this state.
    """

    def __init__(self, feat: Feature, column_type: str | None, has_ids: bool):
        self.feat = feat
        self.column_type = column_type
        self.has_ids = has_ids
        agg = feat.agg
        if agg in ("sum", "avg"):
            self.kind = "int_sum" if column_type == "int64" else "float_sum"
        elif agg in ("first", "last"):
            self.kind = "first_last"
        elif agg in ("min", "max"):
            self.kind = "extreme"
        else:
            self.kind = agg
        fields = dict(_FIELDS.get(self.kind, {}))
        if self.kind == "extreme":
            identity = {"float64": np.inf, "string": None}.get(column_type, _INT_EXTREMES[0])
            if agg == "max" and identity is not None:
                identity = -np.inf if column_type == "float64" else _INT_EXTREMES[1]
            fields["value"] = identity
        self.fills = {"n": 0, **fields}
        self.state = {name: _column(fill, 0) for name, fill in self.fills.items()}

    def grow(self, size: int) -> None:
        current = len(self.state["n"])
        if size > current:
            size = max(size, 2 * current, 64)
            for name, fill in self.fills.items():
                grown = _column(fill, size)
                grown[:current] = self.state[name]
                self.state[name] = grown

    def fold(self, ents: np.ndarray, events: Events) -> None:
        """Add a batch: ``events`` holds one run per entity of ``ents`` (distinct ids)."""
        feat, st, runs = self.feat, self.state, events.runs
        lo, end = runs.start, runs.end
        seen = events.seen(feat.column, feat.where)
        n = count(seen, lo, end)
        st["n"][ents] += n
        if self.kind == "int_sum":
            st["total"][ents] += int_sum(events.columns[feat.column][0], seen, lo, end, feat.name)
            x = events.columns[feat.column][0].astype(np.float64)
            st["approx"][ents] += window_reduce(x if seen is None else np.where(seen, x, 0.0), lo, end, np.add, 0.0)
        elif self.kind == "float_sum":
            sums = events.floats(feat.column, feat.where)
            for name, c in zip(("nan", "pos", "neg"), sums.nonfinite_counts(lo), strict=True):
                st[name][ents] += c
            st["hi"][ents], st["lo"][ents] = _dd_add(st["hi"][ents], st["lo"][ents], *sums.sum_parts(lo))
        elif self.kind == "stddev":
            self._fold_moments(ents, events.floats(feat.column, feat.where), lo)
        elif self.kind == "extreme":
            self._fold_extreme(ents, events, lo, n)
        elif self.kind == "first_last":
            self._fold_first_last(ents, events, lo)
        elif self.kind == "count_distinct":
            at = events.last_occurrences(feat.column, feat.where)
            keys = events.distinct_keys(feat.column, at)
            owners = ents[runs.run[at]].tolist()
            sets = st["sets"]
            for owner, key in zip(owners, keys, strict=True):
                if sets[owner] is None:
                    sets[owner] = set()
                sets[owner].add(key)

    def _fold_moments(self, ents: np.ndarray, sums: FloatSums, lo: np.ndarray) -> None:
        st = self.state
        old = st["exp"][ents]
        new = np.maximum(old, sums.exps)
        h1, l1, h2, l2 = sums.moments(lo)
        a, b = old - new, sums.exps - new  # rescale both sides to the larger power of two: exact
        st["h1"][ents], st["l1"][ents] = _dd_add(
            np.ldexp(st["h1"][ents], a), np.ldexp(st["l1"][ents], a), np.ldexp(h1, b), np.ldexp(l1, b)
        )
        st["h2"][ents], st["l2"][ents] = _dd_add(
            np.ldexp(st["h2"][ents], 2 * a), np.ldexp(st["l2"][ents], 2 * a), np.ldexp(h2, 2 * b), np.ldexp(l2, 2 * b)
        )
        st["exp"][ents] = new
        low, high = sums.spread(lo)
        st["low"][ents] = np.minimum(st["low"][ents], low)
        st["high"][ents] = np.maximum(st["high"][ents], high)
        st["bad"][ents] += sum(sums.nonfinite_counts(lo))

    def _fold_extreme(self, ents: np.ndarray, events: Events, lo: np.ndarray, n: np.ndarray) -> None:
        feat, values = self.feat, self.state["value"]
        found = extreme(events, feat, lo)
        if self.column_type != "string":
            values[ents] = (np.minimum if feat.agg == "min" else np.maximum)(values[ents], found)
            return
        hit = np.flatnonzero(n > 0)
        vocab = events.vocabs[feat.column]
        words = [vocab[c] for c in unrank(events, feat.column, found[hit], np.zeros(len(hit), bool)).tolist()]
        pick = min if feat.agg == "min" else max
        for owner, word in zip(ents[hit].tolist(), words, strict=True):
            values[owner] = word if values[owner] is None else pick(values[owner], word)

    def _fold_first_last(self, ents: np.ndarray, events: Events, lo: np.ndarray) -> None:
        feat, st = self.feat, self.state
        pos, hit = first_last(events, feat, lo)
        at = np.flatnonzero(hit)
        pos, owners = pos[at], ents[at]
        ts, held = events.runs.ts[pos], st["ts"][owners]
        later = ts > held if feat.agg == "last" else ts < held
        unsure = np.flatnonzero((ts == held) | (held == _NO_EVENT))
        values = events.python(feat.column, pos)
        ties = events.ids[pos].tolist() if self.has_ids else values
        take = later.tolist()
        for i in unsure.tolist():
            old = st["tie"][owners[i]]
            if held[i] == _NO_EVENT or old is None:
                take[i] = True
            else:
                take[i] = ties[i] > old if feat.agg == "last" else ties[i] < old
        for i, owner in enumerate(owners.tolist()):
            if take[i]:
                st["ts"][owner], st["tie"][owner], st["value"][owner] = ts[i], ties[i], values[i]

    def values(self, eids: np.ndarray, typ: str) -> pa.Array:
        """The feature as of any time at or after each entity's latest event."""
        self.grow(int(eids.max(initial=-1)) + 1)
        st, feat = self.state, self.feat
        n = st["n"][eids]
        empty = n == 0
        if feat.agg == "count":
            return pa.array(n, pa.int64())
        if self.kind == "count_distinct":
            return pa.array([0 if s is None else len(s) for s in st["sets"][eids].tolist()], pa.int64())
        if self.kind == "int_sum":
            if np.any(np.abs(st["approx"][eids]) >= 2.0**62):
                raise ValueError(
                    f"feature {feat.name!r}: a lifetime sum overflows int64; sum a rescaled column or use avg"
                )
            total = st["total"][eids]
            values = total.astype(np.float64) / np.maximum(n, 1) if feat.agg == "avg" else total
            return pa.array(values, COLUMN_TYPES[typ], mask=empty)
        if self.kind == "float_sum":
            total = float_total(*(st[k][eids] for k in ("hi", "lo", "nan", "pos", "neg")))
            return pa.array(total / np.maximum(n, 1) if feat.agg == "avg" else total, pa.float64(), mask=empty)
        if self.kind == "stddev":
            sd = stddev(n, *(st[k][eids] for k in ("h1", "l1", "h2", "l2")), st["exp"][eids])
            sd = np.where(st["low"][eids] == st["high"][eids], 0.0, sd)
            sd = np.where(st["bad"][eids] > 0, np.nan, sd)
            return pa.array(sd, pa.float64(), mask=n < 2)
        held = st["value"][eids]
        if typ == "string":
            return pa.array([None if e else v for v, e in zip(held.tolist(), empty.tolist(), strict=True)], pa.string())
        if held.dtype == object:
            numbers = np.array(
                [0 if v is None else v for v in held.tolist()], np.float64 if typ == "float64" else np.int64
            )
            return to_arrow(numbers, empty, typ, None)
        return to_arrow(held, empty, typ, None)


def _column(fill, size: int) -> np.ndarray:
    if fill is None:
        return np.full(size, None, object)
    return np.full(size, fill, np.float64 if isinstance(fill, float) else np.int64)


def _dd_add(ah: np.ndarray, al: np.ndarray, bh: np.ndarray, bl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s, e = _two_sum(ah, bh)
    return _fast_two_sum(s, e + (al + bl))
