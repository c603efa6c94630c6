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

- ``count``, ``sum``, ``avg`` are differences of prefix sums. Float sums restart at every
  entity (each entity's events summed left to right, in padded matrices by size class) and
  carry the exact rounding error of every addition (TwoSum) in a second running sum, so a
  window's sum depends on its entity's events alone: a shard of entities gets the very bits
  the whole set gets; int64 sums wrap and come out exact. ``stddev`` uses the same per-entity
  sums of values and of their exact squares (Dekker) in double-double arithmetic, each
  entity scaled by a power of two, and a window of one repeated value gives exactly 0.
- ``last`` / ``first``: the latest / earliest qualifying position inside the window, from a
  running maximum / minimum of positions.
- ``min`` / ``max``: a sparse table, built one level at a time (O(n log n) work, O(n) memory).
- ``count_distinct``: an event is the earliest occurrence of its value in ``(t - w, t]``
  exactly when ``t`` lies in ``[max(ts, ts_prev + w), ts + w)``, ``ts_prev`` being the previous
  occurrence of the same value; so the count is the number of those intervals holding ``t``:
  two sorted arrays of interval ends and two binary searches.

Features are computed in parallel threads (NumPy releases the GIL). ``bench/pit_join.py``
measures all this against a bare DuckDB ASOF join of the same data.

This module reads the events and probes through DuckDB and assembles the relation;
``keel.features.encoding`` turns keys and columns into numbers, ``keel.features.sorted_events``
sorts the events and computes each aggregation, with the array kernels of
``keel.features.kernels`` (shared with ``keel.stream.windows``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from keel.dsl import COLUMN_TYPES, DUCKDB_TYPES, Derived, Feature, FeatureGroup
from keel.features.encoding import PointInTimeError, filled_numpy
from keel.features.sorted_events import SortedEvents


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
    e = SortedEvents(ev, pr, len(keys), feats, _threads(con))
    ids = filled_numpy(pr.column("_probe"))[e.probe_order]
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


def _threads(con: duckdb.DuckDBPyConnection) -> int:
    """Threads for numpy work: as many as DuckDB may use on ``con``, within the CPUs we have, at most 4."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    allowed = int(con.sql("SELECT current_setting('threads')").fetchall()[0][0])
    return max(1, min(cpus, allowed, 4))
