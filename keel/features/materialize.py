"""Feature group tables: each day's values, computed point-in-time and landed through write-audit-publish.

Partition D of ``features.<group>`` holds, for every entity with events recent enough to
matter (within the group's TTL, or its longest window), the features as of the end of D
(``feature_ts`` = D 23:59:59.999999 UTC). The values come from the same engine as
training sets (``keel.features.point_in_time``), so a table row equals the training-set value at its
``feature_ts``. Only the raw partitions the windows need are read. Every snapshot carries
the group's ``keel.version`` and ``keel.fingerprint``; a backfill replaces whole days.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

from keel.compute import ShardReport
from keel.dsl import Column, EventSource, Feature, FeatureGroup
from keel.features.shards import days_values
from keel.features.training_sets import OfflineStore
from keel.lakehouse import wap
from keel.lakehouse.audit import AuditReport, audit_events
from keel.lakehouse.tables import Lakehouse, day_filter

PROP_VERSION = "keel.version"
PROP_FINGERPRINT = "keel.fingerprint"
DAY_END = dt.timedelta(days=1) - dt.timedelta(microseconds=1)
HISTORY_PARTITIONS = 28


class MaterializeError(RuntimeError):
    """A feature group could not be computed; the message says why and what to do."""


@dataclass(frozen=True)
class GroupWrite:
    """A group's days staged on an audit branch."""

    group: str
    staged: wap.StagedWrite
    entities_per_day: dict[dt.date, int]
    shards: ShardReport | None = None


def day_end(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(), dt.UTC) + DAY_END


def days_between(start: dt.date, end: dt.date) -> list[dt.date]:
    if end < start:
        raise MaterializeError(f"end {end} is before start {start}; give start <= end")
    return [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]


def audit_declaration(group: FeatureGroup) -> EventSource:
    """The group's table described as an event source, so the source audit checks it.

    Keys and ``feature_ts`` must not be NULL, counts never are and never go negative, values
    taken from a source column keep that column's declared range and categories, and the
    row count per day (entities covered) is compared with recent days.
    """
    columns = []
    for feat in group.features:
        typ = group.feature_type(feat)
        col: dict = {"nullable": True}
        if isinstance(feat, Feature):
            if feat.agg in ("count", "count_distinct"):
                col = {"nullable": False, "min": 0}
            elif feat.agg == "stddev":
                col["min"] = 0
            elif feat.column is not None and feat.agg in ("min", "max", "first", "last", "avg"):
                declared = group.source.column(feat.column)
                if typ in ("int64", "float64"):
                    col.update(min=declared.min, max=declared.max)
                if typ == "string" and declared.allowed:
                    col["allowed"] = declared.allowed
            elif feat.agg == "sum" and (group.source.column(feat.column).min or -1) >= 0:
                col["min"] = 0
        columns.append(Column(feat.name, typ, **col))
    return EventSource(
        name=group.name,
        entity=group.entity,
        columns=tuple(columns),
        timestamp="feature_ts",
        event_id=None,
        namespace=group.namespace,
    )


def compute_days(
    store: OfflineStore, group: FeatureGroup, days: Sequence[dt.date], pinned: dict | None = None
) -> tuple[pa.Table, dict[str, int | None], ShardReport]:
    """The group's rows for ``days``: one per (entity with recent events, day), as of each day's end,
    computed in entity shards on the store's compute engine; the snapshots read; how the shards ran."""
    days = sorted(set(days))
    ends = pa.array([day_end(d) for d in days], pa.timestamp("us", tz="UTC"))
    reads, snapshots = store.event_reads([group], pa.chunked_array([ends]), pinned or {})
    data, report = days_values(store, group, ends, reads, None)
    return data.cast(group.arrow_schema()), snapshots, report


def stage_days(store: OfflineStore, group: FeatureGroup, days: Sequence[dt.date], run_id: str) -> GroupWrite:
    """Compute ``days`` of the group and stage them on the run's audit branch."""
    lake = store.lake
    lake.ensure_table(group.table_name, group.arrow_schema(), day_column="feature_ts")
    data, snapshots, report = compute_days(store, group, days)
    props = {
        PROP_VERSION: str(group.version),
        PROP_FINGERPRINT: group.fingerprint(),
        "keel.inputs": ",".join(f"{t}@{s}" for t, s in sorted(snapshots.items())),
    }
    staged = wap.stage(
        lake,
        group.table_name,
        [data],
        run_id=run_id,
        source=group.name,
        day_column="feature_ts",
        mode="replace",
        days=days,
        properties=props,
    )
    per_day = {d: 0 for d in sorted(set(days))}
    for day, rows in lake.partition_rows(group.table_name, snapshot_id=staged.snapshot_id).items():
        if day in per_day:
            per_day[day] = rows
    return GroupWrite(group.name, staged, per_day, report)


def audit_group(lake: Lakehouse, group: FeatureGroup, staged: wap.StagedWrite) -> AuditReport:
    """The staged days of a group, audited against its declaration and its recent days on main."""
    recent = wap.recent_partition_rows(lake, group.table_name, staged.days, HISTORY_PARTITIONS)
    data = lake.read(group.table_name, snapshot_id=staged.snapshot_id, row_filter=day_filter("feature_ts", staged.days))
    return audit_events(data, audit_declaration(group), recent_partition_rows=recent)


@dataclass(frozen=True)
class GroupDays:
    """The write-audit-publish writer of a group's days: what ``keel backfill`` and the Dagster
    asset ``features/<group>`` both run. A re-stage recomputes the days from main's inputs."""

    store: OfflineStore
    group: FeatureGroup
    days: tuple[dt.date, ...]

    @property
    def table(self) -> str:
        return self.group.table_name

    def stage(self, run_id: str) -> GroupWrite:
        from keel.features.registry import register

        register(self.store.lake, self.store.project, self.group)
        return stage_days(self.store, self.group, self.days, run_id)

    def audit(self, staged: wap.StagedWrite) -> AuditReport:
        return audit_group(self.store.lake, self.group, staged)


def backfill(
    store: OfflineStore, group: FeatureGroup, start: dt.date, end: dt.date, run_id: str
) -> tuple[GroupWrite, AuditReport, int | None]:
    """Compute, audit and publish ``start..end``: the write, its audit and main's new snapshot (None: not published)."""
    writer = GroupDays(store, group, tuple(days_between(start, end)))
    write = writer.stage(run_id)
    report = writer.audit(write.staged)
    if not report.success:
        return write, report, None
    try:
        return write, report, wap.publish_or_restage(store.lake, writer, write.staged).snapshot_id
    except wap.AuditFailed as exc:
        return write, exc.report, None


def read_version(lake: Lakehouse, group: FeatureGroup, version: int, **read) -> pa.Table:
    """The group's table as the latest snapshot written by ``version`` left it (time travel)."""
    for snap in reversed(lake.snapshots(group.table_name)):
        if snap.properties.get(PROP_VERSION) == str(version):
            return lake.read(group.table_name, snapshot_id=snap.snapshot_id, **read)
    raise MaterializeError(
        f"feature group {group.name!r} has no snapshot written by version {version} on main "
        "(never backfilled, or its snapshots have expired)"
    )
