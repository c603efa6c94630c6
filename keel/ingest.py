"""Batch ingestion of event files through write-audit-publish.

``keel.validation`` checks the files row by row into a staging database; here the rows it
rejected replace the files' earlier rows in the quarantine table (with the reason and the
file row), and the good rows land day by day on an audit branch, are audited there, and
are published to main by fast-forward.

Landing a day merges by event id: re-ingesting a file leaves the table as it was, and two
files with events of the same day both keep their rows.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pyiceberg.expressions import And, EqualTo, In

from keel import validation, wap
from keel.dsl import EventSource
from keel.lakehouse import Lakehouse, day_filter, replace_rows
from keel.quality import AuditReport, audit_events, combine_reports
from keel.validation import QUARANTINE_SCHEMA, IngestError, Prepared, group_days, prepare

__all__ = [
    "QUARANTINE_TABLE",
    "IngestError",
    "IngestReport",
    "audit_staged",
    "group_days",
    "ingest_files",
    "prepare",
    "stage_prepared",
    "write_quarantine",
]

QUARANTINE_TABLE = "keel.quarantine"
HISTORY_PARTITIONS = 28


@dataclass
class IngestReport:
    source: str
    run_id: str
    files: list[str]
    rows_read: int
    rows_valid: int
    rows_outside_window: int
    quarantined: dict[str, int]
    previous_snapshot: int | None
    staged: wap.StagedWrite | None = None
    audit: AuditReport | None = None
    published_snapshot: int | None = None
    error: str | None = None

    @property
    def published(self) -> bool:
        return self.published_snapshot is not None

    def summary(self) -> str:
        lines = [
            f"source {self.source}: {len(self.files)} file(s), {self.rows_read} rows read, "
            f"{self.rows_valid} valid, {sum(self.quarantined.values())} quarantined"
        ]
        for code, count in sorted(self.quarantined.items()):
            lines.append(f"  quarantined {count:>8}  {code}")
        if self.rows_outside_window:
            lines.append(f"  skipped {self.rows_outside_window} rows outside the run's partitions")
        if self.staged:
            lines.append(f"  staged {self.staged.partition} on branch {self.staged.branch} ({self.staged.rows} rows)")
        if self.audit:
            lines.append(f"  audit: {self.audit.summary()}")
        if self.published:
            lines.append(f"  published: main {self.previous_snapshot} -> {self.published_snapshot}")
        else:
            lines.append(f"  NOT published: {self.error}")
        return "\n".join(lines)


def write_quarantine(lake: Lakehouse, prepared: Prepared, run_id: str, now: dt.datetime | None = None) -> int:
    """Replace the quarantine rows of these (source, files) with this ingest's; returns the count."""
    now = now or dt.datetime.now(dt.UTC)
    lake.ensure_table(QUARANTINE_TABLE, QUARANTINE_SCHEMA, identity_column="source")
    rows = prepared.quarantine_rows(run_id, now)
    scope = And(EqualTo("source", prepared.source.name), In("file", prepared.files))
    props = lake.snapshot_properties(prepared.source.name, [], run_id)
    replace_rows(lake.table(QUARANTINE_TABLE), rows, scope, props)
    return rows.num_rows


def stage_prepared(lake: Lakehouse, prepared: Prepared, run_id: str) -> wap.StagedWrite | None:
    """Land the good rows on the run's audit branch (None when there are none)."""
    source = prepared.source
    lake.ensure_table(source.table_name, source.arrow_schema(), day_column=source.timestamp)
    if prepared.rows_valid == 0:
        return None
    return wap.stage(
        lake,
        source.table_name,
        prepared.chunks(),
        run_id=run_id,
        source=f"ingest:{source.name}",
        day_column=source.timestamp,
        mode="merge" if source.event_id else "replace",
        key=source.event_id,
    )


def audit_staged(lake: Lakehouse, source: EventSource, staged: wap.StagedWrite) -> AuditReport:
    """Audit what main would hold for the staged days, against main's recent partitions."""
    recent = wap.recent_partition_rows(lake, source.table_name, staged.days, HISTORY_PARTITIONS)
    staged_rows = lake.partition_rows(source.table_name, snapshot_id=staged.snapshot_id)
    reports = []
    for group in group_days({d: staged_rows.get(d, 0) for d in staged.days}, validation.CHUNK_ROWS):
        data = lake.read(
            source.table_name, snapshot_id=staged.snapshot_id, row_filter=day_filter(source.timestamp, group)
        )
        reports.append(audit_events(data, source, recent_partition_rows=recent))
    return combine_reports(reports)


def ingest_files(
    lake: Lakehouse,
    source: EventSource,
    paths: Sequence[str | Path],
    *,
    run_id: str | None = None,
    now: dt.datetime | None = None,
    window: tuple[dt.date, dt.date] | None = None,
    max_attempts: int = 3,
) -> IngestReport:
    """Validate, quarantine, stage, audit and publish; the report says what happened.

    When another writer moves main between staging and publishing, the ingest stages again
    on the new head (up to ``max_attempts`` times) rather than overwrite that write.
    """
    run_id = run_id or f"ingest-{uuid.uuid4().hex[:12]}"
    now = now or dt.datetime.now(dt.UTC)
    with prepare(source, paths, now=now, window=window) as prepared:
        write_quarantine(lake, prepared, run_id, now)
        lake.ensure_table(source.table_name, source.arrow_schema(), day_column=source.timestamp)
        report = IngestReport(
            source=source.name,
            run_id=run_id,
            files=prepared.files,
            rows_read=prepared.rows_read,
            rows_valid=prepared.rows_valid,
            rows_outside_window=prepared.rows_outside_window,
            quarantined=prepared.quarantined,
            previous_snapshot=lake.head(source.table_name),
        )
        for attempt in range(1, max_attempts + 1):
            report.previous_snapshot = lake.head(source.table_name)
            staged = stage_prepared(lake, prepared, run_id)
            report.staged = staged
            if staged is None:
                report.error = "no valid rows to land (see the quarantine counts)"
                return report
            report.audit = audit_staged(lake, source, staged)
            if not report.audit.success:
                report.error = (
                    f"audit failed, main left at snapshot {report.previous_snapshot}; branch "
                    f"{staged.branch} kept for inspection"
                )
                return report
            try:
                report.published_snapshot = wap.publish(lake, staged)
                return report
            except wap.PublishConflict as exc:
                report.error = str(exc)
                if attempt == max_attempts:
                    return report
    return report
