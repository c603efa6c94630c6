"""Point-in-time feature values: a feature group evaluated at arbitrary (entity, time) probes.

The contract, shared by training sets and feature tables: at probe time t a Feature sees
the source events of the probe's entity with ``event_ts <= t`` and, for a windowed
feature, ``event_ts > t - window`` (the half-open ``(t - w, t]``; lifetime has no lower
bound), and only the events whose ``where`` is TRUE. ``count`` without a column counts
events, with a column its non-NULL values; sum, avg, min, max, stddev (sample; NULL under
two values) and count_distinct use non-NULL values; first and last take the value of the
earliest / latest event (by event_ts, then event id) whose value is not NULL. No events
give NULL, except count and count_distinct, which give 0. With a TTL, when the entity's
latest source event at or before t (whatever ``where`` says) is missing or older than
``t - ttl``, every feature is NULL (counts 0). Derived features are evaluated after that,
in declaration order; a group reading other groups evaluates its expressions over theirs,
each computed at the same probes.

This implementation joins each probe to the events inside each distinct window (a range
join DuckDB runs as an IEJoin) and aggregates per probe: exact for every aggregation, and
no Python loop per row.
"""

from __future__ import annotations

from collections.abc import Mapping

import duckdb

from keel.dsl import Derived, Feature, FeatureGroup, window_seconds

DUCK_TYPES = {
    "string": "VARCHAR",
    "int64": "BIGINT",
    "float64": "DOUBLE",
    "bool": "BOOLEAN",
    "timestamp": "TIMESTAMPTZ",
    "date": "DATE",
}
_COUNTS = ("count", "count_distinct")


def point_in_time(
    con: duckdb.DuckDBPyConnection, group: FeatureGroup, events: Mapping[str, str], probes: str
) -> duckdb.DuckDBPyRelation:
    """``_probe`` and every feature of ``group`` at each probe's ``_t``, one row per probe."""
    if group.source is None:
        return _from_upstream(con, group, events, probes)
    source = group.source
    if source.name not in events:
        raise KeyError(f"feature group {group.name!r}: no events given for source {source.name!r}")
    ev, ts = events[source.name], f'"{source.timestamp}"'
    keys = group.key_columns
    on_keys = " AND ".join(f'e."{k}" = p."{k}"' for k in keys)
    order = f"struct_pack(t := e.{ts}, i := {_event_id(source)})"
    base = [f for f in group.features if isinstance(f, Feature)]

    parts = []
    by_window: dict[int | None, list[Feature]] = {}
    for feat in base:
        by_window.setdefault(feat.window_s, []).append(feat)
    for i, (seconds, feats) in enumerate(by_window.items()):
        lower = f"AND e.{ts} > p._t - INTERVAL '{seconds} seconds'" if seconds is not None else ""
        aggs = ", ".join(f'{_aggregate(f, order)} AS "{f.name}"' for f in feats)
        parts.append(
            (
                f"w{i}",
                feats,
                f"SELECT p._probe, {aggs} FROM {probes} p JOIN {ev} e ON {on_keys} "
                f"AND e.{ts} <= p._t {lower} GROUP BY p._probe",
            )
        )
    if group.ttl:
        ttl = window_seconds(group.ttl)
        parts.append(
            (
                "latest",
                [],
                f"SELECT p._probe, max(e.{ts}) AS _latest FROM {probes} p JOIN {ev} e ON {on_keys} "
                f"AND e.{ts} <= p._t AND e.{ts} >= p._t - INTERVAL '{ttl} seconds' GROUP BY p._probe",
            )
        )
    joins = " ".join(f"LEFT JOIN ({sql}) {alias} USING (_probe)" for alias, _, sql in parts)
    fresh = "latest._latest IS NOT NULL" if group.ttl else "TRUE"
    cols = []
    for alias, feats, _ in parts:
        for feat in feats:
            value = f'{alias}."{feat.name}"'
            if feat.agg in _COUNTS:
                cols.append(f'CASE WHEN {fresh} THEN coalesce({value}, 0) ELSE 0 END AS "{feat.name}"')
            else:
                cols.append(f'CASE WHEN {fresh} THEN {value} END AS "{feat.name}"')
    inner = f"SELECT p._probe, {', '.join(cols)} FROM {probes} p {joins}"
    return _with_derived(con, group, inner)


def _event_id(source) -> str:
    return f'e."{source.event_id}"' if source.event_id else "NULL::VARCHAR"


def _aggregate(feat: Feature, order: str) -> str:
    col = f'e."{feat.column}"' if feat.column else None
    # A predicate names the source's payload columns, which only the events (e) have.
    cond = f"coalesce(({feat.where}), FALSE)" if feat.where else "TRUE"
    if feat.agg == "count":
        return f"count({col or '*'}) FILTER (WHERE {cond})"
    if feat.agg == "count_distinct":
        return f"count(DISTINCT {col}) FILTER (WHERE {cond})"
    if feat.agg in ("first", "last"):
        fn = "arg_min" if feat.agg == "first" else "arg_max"
        return f"{fn}({col}, {order}) FILTER (WHERE {cond} AND {col} IS NOT NULL)"
    fn = {"sum": "sum", "avg": "avg", "min": "min", "max": "max", "stddev": "stddev_samp"}[feat.agg]
    return f"{fn}({col}) FILTER (WHERE {cond})"


def _with_derived(con: duckdb.DuckDBPyConnection, group: FeatureGroup, inner: str) -> duckdb.DuckDBPyRelation:
    """Add the derived features one by one (later ones may use earlier ones), then order the columns."""
    sql = inner
    for feat in group.features:
        if isinstance(feat, Derived):
            sql = f'SELECT *, CAST(({feat.expr}) AS {DUCK_TYPES[feat.type]}) AS "{feat.name}" FROM ({sql}) AS {group.name}'
    cols = ", ".join(f'CAST("{f.name}" AS {DUCK_TYPES[group.feature_type(f)]}) AS "{f.name}"' for f in group.features)
    return con.sql(f"SELECT _probe, {cols} FROM ({sql}) ORDER BY _probe")


def _from_upstream(
    con: duckdb.DuckDBPyConnection, group: FeatureGroup, events: Mapping[str, str], probes: str
) -> duckdb.DuckDBPyRelation:
    """Each upstream group at the same probes, joined, then this group's expressions over theirs."""
    names = []
    for up in group.upstream:
        name = f"_up_{group.name}_{up.name}"
        con.register(name, point_in_time(con, up, events, probes).to_arrow_table())
        names.append((up.name, name))
    joins = " ".join(f"JOIN {table} AS {alias} USING (_probe)" for alias, table in names)
    cols = ", ".join(
        f'CAST(({f.expr}) AS {DUCK_TYPES[f.type]}) AS "{f.name}"' for f in group.features if isinstance(f, Derived)
    )
    return con.sql(f"SELECT p._probe, {cols} FROM {probes} p {joins} ORDER BY p._probe")
