"""Lifetime features of the stream: each entity's running state, folded in batch by batch.

A lifetime feature has no lower bound, so it needs none of an entity's old events: ``Lifetime``
keeps a few numbers per entity (for ``count_distinct``, its set of values) and folds each
batch in with the aggregations of ``keel.stream.windows``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from keel.dsl import COLUMN_TYPES, Feature
from keel.features.kernels import dd_add, float_total, sample_stddev, window_reduce
from keel.stream.windows import Events, FloatSums, count, extreme, first_last, int_sum, to_arrow, unrank

_INT_EXTREMES = (np.iinfo(np.int64).max, np.iinfo(np.int64).min)
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
            st["hi"][ents], st["lo"][ents] = dd_add(st["hi"][ents], st["lo"][ents], *sums.sum_parts(lo))
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
        st["h1"][ents], st["l1"][ents] = dd_add(
            np.ldexp(st["h1"][ents], a), np.ldexp(st["l1"][ents], a), np.ldexp(h1, b), np.ldexp(l1, b)
        )
        st["h2"][ents], st["l2"][ents] = dd_add(
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
            sd = sample_stddev(n, *(st[k][eids] for k in ("h1", "l1", "h2", "l2")), st["exp"][eids])
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
