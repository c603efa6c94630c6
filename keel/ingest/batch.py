"""Batch ingestion of event files through write-audit-publish.

``keel.ingest.validation`` checks the files row by row into a staging database; here the rows it
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

from keel.dsl import EventSource
from keel.ingest import validation
from keel.ingest.resent import Resent, settle_resent
from keel.ingest.validation import QUARANTINE_SCHEMA, IngestError, Prepared, group_days, prepare
from keel.lakehouse import wap
from keel.lakehouse.audit import AuditReport, audit_events, combine_reports
from keel.lakehouse.buckets import BUCKETED_ROWS_PER_DAY
from keel.lakehouse.tables import Lakehouse, day_filter

__all__ = [
    "QUARANTINE_TABLE",
    "FileIngest",
    "IngestError",
    "IngestReport",
    "NothingToLand",
    "StagedFiles",
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
    replaced: int = 0
    unchanged: int = 0

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
        if self.replaced or self.unchanged:
            new = self.rows_valid - self.replaced - self.unchanged
            lines.append(
                f"  of the valid rows: {new} new, {self.replaced} replaced (corrections of landed events), "
                f"{self.unchanged} unchanged (landed already as they are)"
            )
        if self.rows_outside_window:
            lines.append(f"  skipped {self.rows_outside_window} rows outside the run's partitions")
        if self.staged:
            lines.append(f"  staged {self.staged.partition} on branch {self.staged.branch} ({self.staged.rows} rows)")
        if self.audit:
            lines.append("  audit: " + self.audit.summary().replace("\n", "\n    "))
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
    lake.replace_on_main(QUARANTINE_TABLE, rows, scope, props)
    return rows.num_rows


def stage_prepared(
    lake: Lakehouse, prepared: Prepared, run_id: str, resent: Resent | None = None
) -> wap.StagedWrite | None:
    """Land the good rows on the run's audit branch (None when there are none); the old copies of
    corrected events leave their days in the same staging."""
    source = prepared.source
    if prepared.rows_valid == 0:
        return None
    days = prepared.days()
    # Days this full are split into entity buckets (keel.lakehouse.buckets): a file per (day,
    # bucket) still holds thousands of rows, and a shard of entities opens only its buckets' files.
    busy = max(days.values()) >= BUCKETED_ROWS_PER_DAY
    lake.ensure_table(
        source.table_name,
        source.arrow_schema(),
        day_column=source.timestamp,
        bucket_column=source.key_columns[0] if busy else None,
    )
    resent = resent or Resent()
    return wap.stage(
        lake,
        source.table_name,
        prepared.chunks(),
        run_id=run_id,
        source=f"ingest:{source.name}",
        day_column=source.timestamp,
        mode="merge" if source.event_id else "replace",
        key=source.event_id,
        removals=resent.removals,
        properties=resent.properties() if source.event_id else None,
    )


def audit_staged(lake: Lakehouse, source: EventSource, staged: wap.StagedWrite) -> AuditReport:
    """Audit what main would hold for the staged days, against main's partitions before them."""
    recent = wap.recent_partition_rows(lake, source.table_name, staged.days, HISTORY_PARTITIONS)
    staged_rows = lake.partition_rows(source.table_name, snapshot_id=staged.snapshot_id)
    reports = []
    for group in group_days({d: staged_rows.get(d, 0) for d in staged.days}, validation.CHUNK_ROWS):
        data = lake.read(
            source.table_name, snapshot_id=staged.snapshot_id, row_filter=day_filter(source.timestamp, group)
        )
        reports.append(audit_events(data, source, recent_partition_rows=recent))
    return combine_reports(reports)


class NothingToLand(IngestError):
    """The files held no valid row for the run's days; the quarantine says why."""

    def __init__(self, message: str, files: list[str], rows_read: int, rows_outside_window: int, quarantined: dict):
        super().__init__(message)
        self.files, self.rows_read, self.rows_outside_window = files, rows_read, rows_outside_window
        self.quarantined = quarantined


@dataclass(frozen=True)
class StagedFiles:
    """Files validated, their bad rows quarantined and their good rows staged on the run's branch.

    Every row read is accounted for: ``rows_read`` = ``rows_valid`` + quarantined + outside the
    window, and of the valid rows, ``replaced`` corrected a landed event and ``unchanged`` were
    landed already as they are (keel.ingest.resent).
    """

    staged: wap.StagedWrite
    files: list[str]
    rows_read: int
    rows_valid: int
    rows_outside_window: int
    quarantined: dict[str, int]
    replaced: int = 0
    unchanged: int = 0
    duplicates: int = 0  # re-sent with other values and refused (among the quarantined)


@dataclass(frozen=True)
class FileIngest:
    """The write-audit-publish writer of a source's files: what ``keel ingest`` and the Dagster
    asset ``raw/<source>`` both run. Staging reads the files afresh, so a re-stage after a
    publish conflict merges them into main's new head."""

    lake: Lakehouse
    source: EventSource
    paths: tuple[str | Path, ...]
    window: tuple[dt.date, dt.date] | None = None
    now: dt.datetime | None = None
    # Where validation keeps its staging database while the files are read (KEEL_HOME/staging).
    staging_root: Path | None = None
    # Of CSV and JSONL files; None reads UTF-8, or as a file's byte order mark says.
    encoding: str | None = None

    @property
    def table(self) -> str:
        return self.source.table_name

    def stage(self, run_id: str) -> StagedFiles:
        with prepare(
            self.source,
            self.paths,
            now=self.now,
            window=self.window,
            staging_root=self.staging_root,
            encoding=self.encoding,
        ) as prepared:
            self.lake.ensure_table(self.source.table_name, self.source.arrow_schema(), day_column=self.source.timestamp)
            resent = settle_resent(self.lake, self.source, prepared.con, self.lake.head(self.source.table_name))
            prepared.quarantined = dict(
                prepared.con.execute("SELECT reason_code, count(*) FROM bad GROUP BY 1 ORDER BY 1").fetchall()
            )
            prepared.check_accounted()  # again: settling re-sent ids moved rows to the quarantine
            write_quarantine(self.lake, prepared, run_id, self.now)
            staged = stage_prepared(self.lake, prepared, run_id, resent)
            if staged is None:
                raise NothingToLand(
                    f"source '{self.source.name}': no valid rows to land from {len(prepared.files)} file(s) "
                    f"({prepared.rows_read} read, {sum(prepared.quarantined.values())} quarantined "
                    f"{_reasons(prepared.quarantined)}, {prepared.rows_outside_window} outside the run's days); "
                    f"see `keel quarantine --source {self.source.name}`",
                    list(prepared.files),
                    prepared.rows_read,
                    prepared.rows_outside_window,
                    dict(prepared.quarantined),
                )
            return StagedFiles(
                staged,
                list(prepared.files),
                prepared.rows_read,
                prepared.rows_valid,
                prepared.rows_outside_window,
                dict(prepared.quarantined),
                resent.replaced,
                resent.unchanged,
                resent.duplicates,
            )

    def audit(self, staged: wap.StagedWrite) -> AuditReport:
        return audit_staged(self.lake, self.source, staged)


def _reasons(quarantined: dict[str, int]) -> str:
    return "(" + ", ".join(f"{code} {n}" for code, n in sorted(quarantined.items())) + ")" if quarantined else ""


def ingest_files(
    lake: Lakehouse,
    source: EventSource,
    paths: Sequence[str | Path],
    *,
    run_id: str | None = None,
    now: dt.datetime | None = None,
    window: tuple[dt.date, dt.date] | None = None,
    max_attempts: int = wap.PUBLISH_ATTEMPTS,
    staging_root: Path | None = None,
    encoding: str | None = None,
) -> IngestReport:
    """Validate, quarantine, stage, audit and publish; the report says what happened.

    ``staging_root``: the folder validation's staging database lives under (KEEL_HOME/staging
    for ``keel ingest``); ``encoding``: of CSV and JSONL files.

    When another writer moves main between staging and publishing, the ingest stages again
    on the new head (up to ``max_attempts`` stagings) rather than overwrite that write.
    """
    run_id = run_id or f"ingest-{uuid.uuid4().hex[:12]}"
    now = now or dt.datetime.now(dt.UTC)
    writer = FileIngest(
        lake, source, tuple(paths), window=window, now=now, staging_root=staging_root, encoding=encoding
    )
    try:
        staging = writer.stage(run_id)
    except NothingToLand as exc:
        return IngestReport(
            source.name,
            run_id,
            exc.files,
            exc.rows_read,
            0,
            exc.rows_outside_window,
            exc.quarantined,
            lake.head(source.table_name),
            error=str(exc),
        )
    previous = lake.head(source.table_name)  # staging leaves main where it was
    report = IngestReport(
        source=source.name,
        run_id=run_id,
        files=staging.files,
        rows_read=staging.rows_read,
        rows_valid=staging.rows_valid,
        rows_outside_window=staging.rows_outside_window,
        quarantined=staging.quarantined,
        previous_snapshot=previous,
        staged=staging.staged,
        replaced=staging.replaced,
        unchanged=staging.unchanged,
    )
    report.audit = writer.audit(staging.staged)
    if not report.audit.success:
        report.error = (
            f"audit failed, main left at snapshot {previous}; branch {staging.staged.branch} kept for inspection"
        )
        return report
    try:
        published = wap.publish_or_restage(lake, writer, staging.staged, attempts=max_attempts)
    except wap.AuditFailed as exc:
        report.staged, report.audit, report.error = exc.staged, exc.report, str(exc)
        return report
    except wap.PublishConflict as exc:
        report.error = str(exc)
        return report
    report.staged = published.staged
    if published.staging is not None:  # staged again on main's new head: its own counts
        report.replaced, report.unchanged = published.staging.replaced, published.staging.unchanged
    report.previous_snapshot = published.previous_snapshot_id
    report.published_snapshot = published.snapshot_id
    return report
