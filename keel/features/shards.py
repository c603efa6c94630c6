"""Entity shards: training sets and feature-group days computed one shard of entities at a time.

Every feature of an entity depends on that entity's events alone, so the point-in-time engine
can run on any subset of entities and give those entities the very values (bit for bit: its
sums restart at every entity, see ``keel.features.kernels``) it gives them among all the others.
A shard is the entities whose key's Iceberg bucket hash falls in it (``keel.lakehouse.buckets``),
so a shard's scan opens only the files of its buckets. Each shard is one task of
``keel.compute.Compute``: in this process, or on a Dask worker that reads the lakehouse itself.

The number of shards is explicit (``KEEL_SHARDS``, ``--shards``) or the smallest power of two
that fits the estimated memory (the events the scans would read, at ``EVENT_BYTES`` each, plus
the probes) into ``KEEL_MAX_MEMORY`` (default: half the machine's memory) less what the process
holds before any data (``PROCESS_BYTES``).
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyiceberg.expressions import And, BooleanExpression, GreaterThan, LessThanOrEqual
from pyiceberg.io import load_file_io

from keel.compute import ComputeError, ShardReport, TaskStats, machine_memory
from keel.config import Settings, hide_password
from keel.dsl import EventSource, FeatureGroup, window_seconds
from keel.features.point_in_time import point_in_time
from keel.lakehouse.buckets import plan, read_shard, shard_of
from keel.lakehouse.tables import Lakehouse

# Memory the engine takes per event read, by what it keeps: the Arrow columns, the sort's keys
# and permutation, and per feature a few int64/float64 arrays (bench/scale.py measures it).
EVENT_BYTES = 96
FEATURE_BYTES = 40
MAX_SHARDS = 4096
# What a Keel process holds before any data (interpreter, Arrow, DuckDB, pyiceberg): not a shard's to use.
PROCESS_BYTES = 512 << 20
MIN_SHARD_BYTES = 32 << 20


def lookback(group: FeatureGroup) -> dt.timedelta | None:
    """How far before a probe time the group's source events matter; None means from the start."""
    if group.source is None:
        spans = [lookback(u) for u in group.upstream]
        return None if any(s is None for s in spans) else max(spans)
    seconds = group.max_window_s
    if seconds is None:
        return None
    if group.ttl:
        seconds = max(seconds, window_seconds(group.ttl))
    # Windows are (t - w, t]; first/last also need the events just inside the lower edge.
    return dt.timedelta(seconds=seconds)


def sources_of(groups: Iterable[FeatureGroup]) -> dict[str, tuple[EventSource, dt.timedelta | None]]:
    """Every source the groups read (through upstream groups too), with the longest lookback each needs."""
    out: dict[str, tuple[EventSource, dt.timedelta | None]] = {}

    def visit(group: FeatureGroup) -> None:
        if group.source is not None:
            need = lookback(group)
            prev = out.get(group.source.name)
            if prev is not None:
                need = None if prev[1] is None or need is None else max(prev[1], need)
            out[group.source.name] = (group.source, need)
        for up in group.upstream:
            visit(up)

    for group in groups:
        visit(group)
    return out


@dataclass(frozen=True)
class EventRead:
    """What a shard reads of one source: the table at a snapshot, events in ``(lower, upper]``."""

    source: str
    table: str
    key: str
    timestamp: str
    snapshot: int | None
    lower: dt.datetime | None
    upper: dt.datetime
    empty: pa.Schema

    def row_filter(self) -> BooleanExpression:
        expr: BooleanExpression = LessThanOrEqual(self.timestamp, self.upper.isoformat())
        if self.lower is not None:
            expr = And(GreaterThan(self.timestamp, self.lower.isoformat()), expr)
        return expr

    def scan(self, lake: Lakehouse):
        table = lake.table(self.table)
        return table, table.scan(snapshot_id=self.snapshot, row_filter=self.row_filter())

    def read(self, lake: Lakehouse, shard: int, shards: int) -> pa.Table:
        if self.snapshot is None:
            return self.empty.empty_table()
        table, scan = self.scan(lake)
        return read_shard(table, scan, self.row_filter(), self.key, shard, shards)

    def rows(self, lake: Lakehouse) -> int:
        """The rows the scan would read (its files' record counts, from the manifests)."""
        return 0 if self.snapshot is None else plan(self.scan(lake)[1]).rows

    def total_rows(self, lake: Lakehouse) -> int:
        """All the table's rows at the snapshot, from its summary: no manifest read."""
        if self.snapshot is None:
            return 0
        snap = lake.table(self.table).snapshot_by_id(self.snapshot)
        summary = snap.summary.additional_properties if snap is not None and snap.summary else {}
        return int(summary.get("total-records", 1 << 62))


def event_read(source: EventSource, snapshot: int | None, lower, upper) -> EventRead:
    return EventRead(
        source.name, source.table_name, source.key_columns[0], source.timestamp, snapshot, lower, upper,
        source.arrow_schema(),
    )  # fmt: skip


def register_events(con: duckdb.DuckDBPyConnection, lake: Lakehouse, reads: Sequence[EventRead], shard, shards):
    """Each source's events of the shard as ``events_<source>`` on ``con``."""
    for read in reads:
        con.register(f"events_{read.source}", read.read(lake, shard, shards))


def shard_count(store, reads: Sequence[EventRead], groups: Sequence[FeatureGroup], probes: int) -> int:
    """The explicit shard count, else the fewest (a power of two) that fit the memory budget."""
    if store.shards:
        return store.shards
    features = sum(len(g.features) for g in groups)
    budget = store.max_memory or machine_memory() // 2
    budget = max(budget - PROCESS_BYTES, MIN_SHARD_BYTES)

    def need(rows: int) -> float:
        return rows * (EVENT_BYTES + FEATURE_BYTES * features) + probes * (EVENT_BYTES + 2 * FEATURE_BYTES * features)

    # The tables' whole row counts (in their snapshots' summaries) bound what the scans read: when
    # those fit, no manifest is read to count more closely.
    if need(sum(r.total_rows(store.lake) for r in reads)) <= budget:
        return 1
    return min(
        MAX_SHARDS, 1 << max(0, math.ceil(math.log2(max(need(sum(r.rows(store.lake) for r in reads)) / budget, 1))))
    )


def lakehouse_of(settings: Settings) -> tuple[str, str, str]:
    """What names a lakehouse and a project, with no secret in it: what a task carries to a worker."""
    return hide_password(settings.catalog_uri), settings.warehouse, settings.project


def _store(ref):
    """The offline store a task runs against: the caller's own in this process; on a worker, one
    made from the worker's own environment (``KEEL_*``, as every Keel process is configured), which
    must name the caller's lakehouse and project. No credential travels with a task."""
    if not isinstance(ref, tuple):
        return ref
    if ref not in _stores:
        cls, wanted = ref
        settings = Settings.from_env()
        if lakehouse_of(settings) != wanted:
            raise ComputeError(
                f"this Dask worker is configured for catalog {lakehouse_of(settings)[0]!r}, warehouse "
                f"{settings.warehouse!r}, project {settings.project!r}, but the task reads catalog {wanted[0]!r}, "
                f"warehouse {wanted[1]!r}, project {wanted[2]!r}; start the workers with the same KEEL_* "
                "environment as the Dagster runs"
            )
        _stores[ref] = cls.from_settings(settings)
    return _stores[ref]


_stores: dict = {}


def _run(store, fn, label: str, tasks: list[tuple]) -> tuple[list, list[TaskStats]]:
    """``fn`` for each task's arguments (after the store) on the store's compute engine."""
    ref = store if store.compute.address is None else (type(store), lakehouse_of(store.settings))
    results, stats = store.compute.map(fn, [(f"{label} {i + 1}/{len(tasks)}", (ref, *a)) for i, a in enumerate(tasks)])
    return results, stats


# Training sets ----------------------------------------------------------------------------------------


def training_shard(ref, wanted: list[tuple[FeatureGroup, str]], probes, reads, shard: int, shards: int) -> pa.Table:
    """``_probe`` and the wanted features of one shard's probes (a table, or a Parquet file to read)."""
    store = _store(ref)
    if isinstance(probes, str):
        with _file_io(store, probes).new_input(probes).open() as f:
            probes = pq.read_table(f)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.register("probes", probes)
    register_events(con, store.lake, reads, shard, shards)
    result = con.sql("SELECT _probe FROM probes")
    groups = list(dict.fromkeys(g for g, _ in wanted))
    for i, group in enumerate(groups):
        rel = point_in_time(con, group, {r.source: f"events_{r.source}" for r in reads}, "probes")
        alias = f"g{i}"
        con.register(alias, rel.to_arrow_table())
        cols = ", ".join(f'{alias}."{n}"' for g, n in wanted if g is group)
        result = con.sql(f"SELECT r.*, {cols} FROM ({result.sql_query()}) r JOIN {alias} USING (_probe)")
    values = con.sql(f"SELECT * FROM ({result.sql_query()}) ORDER BY _probe").to_arrow_table()
    con.close()
    return values


def training_values(store, wanted, probes: pa.Table, reads, shards: int | None) -> tuple[pa.Table, ShardReport]:
    """Every probe's wanted features, computed shard by shard and put back in ``_probe`` order."""
    groups = list(dict.fromkeys(g for g, _ in wanted))
    k = shards or shard_count(store, reads, groups, probes.num_rows)
    ids = shard_of(probes.column(0), k) if k > 1 else np.zeros(probes.num_rows, np.int64)
    ids[ids < 0] = 0  # a NULL key sees no events in any shard
    parts = [(s, probes.filter(pa.array(ids == s))) for s in range(k)]
    parts = [(s, p) for s, p in parts if p.num_rows] or [(0, probes)]
    staged = _stage_probes(store, parts)
    try:
        tasks = [(wanted, staged[s], reads, s, k) for s, _ in parts]
        results, stats = _run(store, training_shard, "training set shard", tasks)
    finally:
        _drop_probes(store, staged)
    values = pa.concat_tables(results)
    values = values.take(pa.array(np.argsort(values.column("_probe").to_numpy(), kind="stable")))
    return values, ShardReport(k, store.compute.engine, stats)


def _stage_probes(store, parts: list[tuple[int, pa.Table]]) -> dict[int, object]:
    """In this process, the probes themselves; for a cluster, Parquet files beside the warehouse
    that the workers read (so the spine never travels through the scheduler)."""
    if store.compute.address is None:
        return dict(parts)
    root = f"{store.settings.warehouse.rstrip('/')}/_keel_shards/{uuid.uuid4().hex}"
    out = {}
    for shard, part in parts:
        path = f"{root}/probes-{shard}.parquet"
        with _file_io(store, path).new_output(path).create(overwrite=True) as f:
            pq.write_table(part, f)
        out[shard] = path
    return out


def _drop_probes(store, staged: dict[int, object]) -> None:
    for path in staged.values():
        if isinstance(path, str):
            _file_io(store, path).delete(path)


def _file_io(store, location: str):
    return load_file_io(dict(store.lake.catalog.properties), location)


# Feature-group days -----------------------------------------------------------------------------------


def days_shard(ref, group: FeatureGroup, ends: pa.Array, reads, shard: int, shards: int) -> pa.Table:
    """The group's rows for one shard: one per (entity of the shard with recent events, day end)."""
    store = _store(ref)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.register("day_ends", pa.table({"_t": ends}))
    register_events(con, store.lake, reads, shard, shards)
    try:
        return day_rows(con, group)
    finally:
        con.close()


def days_values(store, group: FeatureGroup, ends: pa.Array, reads, shards: int | None) -> tuple[pa.Table, ShardReport]:
    """The group's rows for every day end, shard by shard, ordered by (feature_ts, keys)."""
    k = shards or shard_count(store, reads, [group], 0)
    tasks = [(group, ends, reads, s, k) for s in range(k)]
    results, stats = _run(store, days_shard, f"{group.name} shard", tasks)
    data = pa.concat_tables(results)
    order = pc.sort_indices(data, [("feature_ts", "ascending")] + [(c, "ascending") for c in group.key_columns])
    return data.take(order), ShardReport(k, store.compute.engine, stats)


def day_rows(con: duckdb.DuckDBPyConnection, group: FeatureGroup) -> pa.Table:
    """The group's rows for the ``day_ends`` on ``con`` from the ``events_<source>`` there: one per
    (entity with events recent enough to matter, day end), in no particular order."""
    keys = ", ".join(f'"{k}"' for k in group.key_columns)
    e_keys = ", ".join(f'e."{k}"' for k in group.key_columns)
    p_keys = ", ".join(f'p."{k}"' for k in group.key_columns)
    active = []
    for name, (source, need) in sources_of([group]).items():
        span = _activity_span(group, source, need)
        # >=: an entity whose last event is exactly ttl old is still alive (its values are not NULL).
        lower = f"AND e.\"{source.timestamp}\" >= d._t - INTERVAL '{span} seconds'" if span is not None else ""
        active.append(
            f"SELECT DISTINCT {e_keys}, d._t FROM events_{name} e "
            f'JOIN day_ends d ON e."{source.timestamp}" <= d._t {lower}'
        )
    con.execute(
        f"CREATE TEMP TABLE probes AS SELECT *, (row_number() OVER () - 1)::BIGINT AS _probe "
        f"FROM ({' UNION '.join(active)}) ORDER BY _t, {keys}"
    )
    values = point_in_time(con, group, {name: f"events_{name}" for name in sources_of([group])}, "probes")
    con.register("vals", values.to_arrow_table())
    names = ", ".join(f'v."{f.name}"' for f in group.features)
    return con.sql(
        f"SELECT {p_keys}, p._t AS feature_ts, {names} FROM probes p JOIN vals v USING (_probe)"
    ).to_arrow_table()


def _activity_span(group: FeatureGroup, source: EventSource, need: dt.timedelta | None) -> int | None:
    """Seconds before a day's end an entity's last event may lie for the entity to get a row."""
    ttl_groups = [group] if group.source is not None else [u for u in _all_upstream(group) if u.source is source]
    ttls = [window_seconds(g.ttl) for g in ttl_groups if g.ttl]
    if ttls and len(ttls) == len(ttl_groups):
        return max(ttls)
    return None if need is None else int(need.total_seconds())


def _all_upstream(group: FeatureGroup) -> list[FeatureGroup]:
    out = []
    for up in group.upstream:
        out.append(up)
        out += _all_upstream(up)
    return out
