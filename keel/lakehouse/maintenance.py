"""Maintenance: expire old snapshots, compact small files, drop stale audit branches, and remove
the staging folders killed ingests left behind."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyiceberg.table import Table
from pyiceberg.transforms import DayTransform

from keel.ingest.validation import OWNER_FILE, STAGING_PREFIX, process_start
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
        result.removed_branches = lake.remove_branches(name, BRANCH_PREFIX, branch_max_age)
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


@dataclass
class StagingCleanup:
    """What ``clean_staging`` did: the folders it removed, the bytes they held, the folders it kept."""

    root: Path
    removed: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    kept: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"staging {self.root}: removed {len(self.removed)} folder(s) left by killed ingests, "
            f"freed {self.bytes_freed:,} bytes; kept {len(self.kept)} of running ingests"
        )


def clean_staging(
    root: Path, *, max_age: dt.timedelta = dt.timedelta(hours=24), now: float | None = None
) -> StagingCleanup:
    """Remove the staging folders under ``root`` whose ingest is gone.

    An ingest removes its folder when it ends, so a folder left is a killed run's. A folder made
    on this host goes as soon as its owning process has (a pid reused by another process does not
    count: the process start time must match). The processes of another host sharing KEEL_HOME
    cannot be seen, so a folder made there, or one without an owner record, goes once nothing in
    it has changed for ``max_age``: a running ingest writes its staging database batch by batch.
    """
    if max_age <= dt.timedelta(0):
        raise ValueError(f"staging max_age {max_age} must be positive (e.g. 24 hours)")
    result = StagingCleanup(Path(root))
    if not result.root.is_dir():
        return result
    now = time.time() if now is None else now
    for folder in sorted(result.root.iterdir()):
        if not folder.name.startswith(STAGING_PREFIX) or not folder.is_dir():
            continue
        size, changed = _size_and_last_change(folder)
        if _owner_alive(folder, changed, now - max_age.total_seconds()):
            result.kept.append(folder.name)
            continue
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            result.removed.append(folder.name)
            result.bytes_freed += size
    return result


def _owner_alive(folder: Path, changed: float, stale_before: float) -> bool:
    try:
        owner = json.loads((folder / OWNER_FILE).read_text())
        pid, host = int(owner["pid"]), str(owner["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return changed >= stale_before
    if host != socket.gethostname():
        return changed >= stale_before
    if not _process_exists(pid):
        return False
    started = owner.get("process_start")
    return started is None or process_start(pid) in (None, started)


def _process_exists(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    if Path("/proc/self/stat").exists():
        try:
            # A killed process its parent has not reaped yet is a zombie (state Z): gone all the same.
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _size_and_last_change(folder: Path) -> tuple[int, float]:
    size, changed = 0, folder.stat().st_mtime
    for path in folder.rglob("*"):
        try:
            info = path.stat()
        except OSError:
            continue
        changed = max(changed, info.st_mtime)
        if path.is_file():
            size += info.st_size
    return size, changed
