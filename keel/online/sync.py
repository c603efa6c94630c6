"""Sync a published feature table into the online store, incrementally and idempotently.

The online store remembers, per group, the table snapshot it last synced. A sync reads the
keys of the rows appended to ``features.<group>`` between that snapshot and main's head (an
Iceberg incremental append scan: a backfill's replacement days come in as appended files),
then each such entity's latest row at the head, and writes it. The write keeps whichever
value is newer per entity, so re-running a sync, or a sync racing the stream worker, never
puts an older value back. With no watermark, or one that is no longer in main's history
(expired, or the table was rewritten), the whole table is synced.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import asdict, dataclass

import duckdb
import pyarrow as pa
from pyiceberg.expressions import In

from keel.dsl import FeatureGroup
from keel.lakehouse.tables import Lakehouse
from keel.online.store import OnlineStore, OnlineStoreError

# Above this many changed entities one read of the whole table beats a long IN filter.
IN_FILTER_LIMIT = 5_000


@dataclass(frozen=True)
class SyncResult:
    group: str
    mode: str  # "full", "incremental" or "up to date"
    snapshot_id: int
    previous_snapshot_id: int | None
    entities_changed: int
    keys_written: int
    duration_s: float
    store: str

    def as_dict(self) -> dict:
        return asdict(self)


def sync_group(
    lake: Lakehouse, online: OnlineStore, group: FeatureGroup, *, full: bool = False, now: dt.datetime | None = None
) -> SyncResult:
    """Push each changed entity's latest published values of ``group`` to ``online``."""
    t0 = time.perf_counter()
    if not group.online:
        raise OnlineStoreError(
            f"feature group {group.name!r} is not online; declare it with online=True to serve it from the online store"
        )
    head = lake.head(group.table_name) if lake.exists(group.table_name) else None
    if head is None:
        raise OnlineStoreError(
            f"feature group {group.name!r} has no published table yet ({group.table_name}); materialize it first "
            f"(keel backfill {group.name} --start YYYY-MM-DD --end YYYY-MM-DD, or the features/{group.name} asset)"
        )
    state = None if full else online.sync_state(group)
    previous = state["snapshot_id"] if state else None

    def result(mode: str, changed: int, written: int) -> SyncResult:
        return SyncResult(
            group.name, mode, head, previous, changed, written, round(time.perf_counter() - t0, 3), online.location
        )

    if previous == head:
        return result("up to date", 0, 0)
    changed = _changed_keys(lake, group, previous, head) if previous is not None else None
    if changed is not None and changed.num_rows == 0:
        online.set_sync_state(group, head)
        return result("incremental", 0, 0)
    keys = group.key_columns
    if changed is not None and len(keys) == 1 and changed.num_rows <= IN_FILTER_LIMIT:
        rows = lake.read(group.table_name, snapshot_id=head, row_filter=In(keys[0], changed.column(0).to_pylist()))
    else:
        rows = lake.read(group.table_name, snapshot_id=head)
    latest = _latest_per_entity(rows, keys, changed)
    written = online.write(group, latest, now=now)
    online.set_sync_state(group, head)
    return result("full" if changed is None else "incremental", latest.num_rows, written)


def _changed_keys(lake: Lakehouse, group: FeatureGroup, previous: int, head: int) -> pa.Table | None:
    """Distinct keys of rows appended after ``previous`` up to ``head``; None when ``previous`` is not in main's history."""
    table = lake.table(group.table_name)
    lineage = set()
    snap = table.snapshot_by_id(head)
    while snap is not None:
        lineage.add(snap.snapshot_id)
        snap = table.snapshot_by_id(snap.parent_snapshot_id) if snap.parent_snapshot_id is not None else None
    if previous not in lineage:
        return None
    scan = table.incremental_append_scan(
        from_snapshot_id_exclusive=previous,
        to_snapshot_id_inclusive=head,
        selected_fields=tuple(group.key_columns),
    )
    keys = scan.to_arrow()
    return keys.group_by(group.key_columns).aggregate([]) if keys.num_rows else keys


def _latest_per_entity(rows: pa.Table, keys: list[str], changed: pa.Table | None) -> pa.Table:
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.register("rows_", rows)
    key_list = ", ".join(f'"{k}"' for k in keys)
    only = ""
    if changed is not None:
        con.register("changed_", changed)
        only = f"SEMI JOIN changed_ USING ({key_list})"
    latest = con.sql(
        f"SELECT rows_.* FROM rows_ {only} QUALIFY row_number() OVER (PARTITION BY {key_list} ORDER BY feature_ts DESC) = 1 "
        f"ORDER BY {key_list}"
    ).to_arrow_table()
    con.close()
    return latest.cast(rows.schema) if latest.num_rows else rows.schema.empty_table()


def sync_all(lake: Lakehouse, online: OnlineStore, groups, *, full: bool = False) -> list[SyncResult]:
    """Sync every given online group whose table is published, upstream groups first."""
    return [sync_group(lake, online, g, full=full) for g in groups if g.online]
