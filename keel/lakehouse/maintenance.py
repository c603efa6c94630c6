"""Maintenance: expire old snapshots, compact small files, drop stale audit branches, and remove
the staging folders killed ingests left behind."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from pyiceberg.table import Table
from pyiceberg.transforms import DayTransform

from keel.lakehouse.tables import Lakehouse
from keel.lakehouse.wap import BRANCH_PREFIX


@dataclass
class TableMaintenance:
    table: str
    expired_snapshots: int = 0
    compacted_days: dict[dt.date, int] = field(default_factory=dict)
    removed_branches: list[str] = field(default_factory=list)
    files_before: int = 0
    files_after: int = 0


def day_column(table: Table) -> str | None:
    """The column a table is partitioned by day on, if any."""
    for part in table.spec().fields:
        if isinstance(part.transform, DayTransform):
            return table.schema().find_column_name(part.source_id)
    return None


def maintain(
    lake: Lakehouse,
    *,
    run_id: str,
    tables: list[str] | None = None,
    expire_after: dt.timedelta = dt.timedelta(days=7),
    compact_min_files: int = 4,
    branch_max_age: dt.timedelta = dt.timedelta(days=7),
) -> list[TableMaintenance]:
    """Compact, then drop audit branches and snapshots older than the limits, table by table.

    Compaction runs first so the small files it replaces can expire in the same pass once
    they are old enough; main's head and every remaining branch head are always kept.
    """
    if compact_min_files < 2:
        raise ValueError(f"compact_min_files={compact_min_files}: compaction needs at least 2 files per day")
    known = lake.tables()
    names = tables or known
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"no such table(s): {', '.join(unknown)} (known: {', '.join(known) or 'none'})")
    out = []
    for name in names:
        result = TableMaintenance(name, files_before=_file_count(lake, name))
        column = day_column(lake.table(name))
        if column:
            result.compacted_days = lake.compact(name, day_column=column, run_id=run_id, min_files=compact_min_files)
        result.removed_branches = remove_branches(lake, name, BRANCH_PREFIX, branch_max_age)
        result.expired_snapshots = len(lake.expire_snapshots(name, expire_after))
        result.files_after = _file_count(lake, name)
        out.append(result)
    return out


def _file_count(lake: Lakehouse, name: str) -> int:
    table = lake.table(name)
    head = table.current_snapshot()
    if head is None or not head.manifests(table.io):  # no data files yet, which inspect.files cannot read
        return 0
    return table.inspect.files(snapshot_id=head.snapshot_id).num_rows


def remove_branches(lake: Lakehouse, name: str, prefix: str, older_than: dt.timedelta) -> list[str]:
    """Delete the table's branches named ``prefix*`` whose head is older than ``older_than``."""
    table = lake.table(name)
    cutoff_ms = (dt.datetime.now(dt.UTC) - older_than).timestamp() * 1000
    stale = []
    for ref_name, ref in table.refs().items():
        snap = table.snapshot_by_id(ref.snapshot_id)
        if ref_name.startswith(prefix) and snap is not None and snap.timestamp_ms < cutoff_ms:
            stale.append(ref_name)
    if stale:
        manage = table.manage_snapshots()
        for ref_name in stale:
            manage = manage.remove_branch(ref_name)
        manage.commit()
    return stale
