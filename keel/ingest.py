"""Batch ingestion of event files through write-audit-publish.

Files are read in bounded batches and validated in DuckDB against the source's declared
schema. Rows with missing keys, values of the wrong type, unparsable or far-future
timestamps, or an event id seen earlier in the same ingest go to the quarantine table with
the reason and the file row. Good rows wait in an on-disk DuckDB staging database (so a
file larger than memory spills to disk), then land day by day on an audit branch, are
audited there, and are published to main by fast-forward.

Landing a day merges by event id: re-ingesting a file leaves the table as it was, and two
files with events of the same day both keep their rows.
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa
from pyiceberg.expressions import And, EqualTo, In

from keel import wap
from keel.dsl import Column, EventSource
from keel.lakehouse import Lakehouse, day_filter, replace_rows
from keel.quality import AuditReport, audit_events, combine_reports
from keel.readers import read_batches

QUARANTINE_TABLE = "keel.quarantine"
QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("file", pa.string(), nullable=False),
        pa.field("row_number", pa.int64(), nullable=False),
        pa.field("reason_code", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("record", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("quarantined_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)
CHUNK_ROWS = 1_000_000
HISTORY_PARTITIONS = 28

_SQL_TYPES = {
    "string": "VARCHAR",
    "int64": "BIGINT",
    "float64": "DOUBLE",
    "bool": "BOOLEAN",
    "timestamp": "TIMESTAMPTZ",
    "date": "DATE",
}
_TYPE_WORDS = {
    "int64": "an integer",
    "float64": "a number",
    "bool": "true/false",
    "timestamp": "a timestamp (ISO 8601, e.g. 2026-01-31T12:00:00Z)",
    "date": "a date (YYYY-MM-DD)",
}


class IngestError(RuntimeError):
    """Nothing was published; the message says why."""


@dataclass
class Prepared:
    """Validated rows of one ingest, waiting in a DuckDB staging database."""

    source: EventSource
    files: list[str]
    con: duckdb.DuckDBPyConnection
    workdir: Path
    window: tuple[dt.date, dt.date] | None = None
    rows_read: int = 0
    rows_outside_window: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)

    @property
    def rows_valid(self) -> int:
        return self.con.execute("SELECT count(*) FROM good").fetchone()[0]

    def days(self) -> dict[dt.date, int]:
        rows = self.con.execute(
            f'SELECT CAST("{self.source.timestamp}" AS DATE) AS d, count(*) FROM good GROUP BY d ORDER BY d'
        ).fetchall()
        return dict(rows)

    def chunks(self, max_rows: int | None = None) -> Iterator[pa.Table]:
        """The good rows, whole days at a time, about ``max_rows`` (default CHUNK_ROWS) per chunk, typed as the source."""
        schema = self.source.arrow_schema()
        cols = ", ".join(f'"{c}"' for c in schema.names)
        for group in group_days(self.days(), max_rows or CHUNK_ROWS):
            days = ", ".join(f"DATE '{d.isoformat()}'" for d in group)
            table = self.con.sql(
                f'SELECT {cols} FROM good WHERE CAST("{self.source.timestamp}" AS DATE) IN ({days}) '
                f'ORDER BY "{self.source.timestamp}", _file, _row'
            ).to_arrow_table()
            yield table.cast(schema)

    def quarantine_rows(self, run_id: str, now: dt.datetime) -> pa.Table:
        table = self.con.sql(
            "SELECT f.name AS file, b._row AS row_number, b.reason_code, b.reason, b.record "
            "FROM bad b JOIN files f ON f.idx = b._file ORDER BY b._file, b._row"
        ).to_arrow_table()
        n = table.num_rows
        return pa.table(
            {
                "source": pa.array([self.source.name] * n, pa.string()),
                "file": table.column("file"),
                "row_number": table.column("row_number"),
                "reason_code": table.column("reason_code"),
                "reason": table.column("reason"),
                "record": table.column("record"),
                "run_id": pa.array([run_id] * n, pa.string()),
                "quarantined_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
            },
            schema=QUARANTINE_SCHEMA,
        )

    def close(self) -> None:
        self.con.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Prepared:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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


def group_days(counts: dict[dt.date, int], max_rows: int) -> list[list[dt.date]]:
    """Consecutive days grouped so each group holds about ``max_rows`` rows (a bigger day stands alone)."""
    groups: list[list[dt.date]] = []
    size = 0
    for day, rows in sorted(counts.items()):
        if groups and size + rows <= max_rows:
            groups[-1].append(day)
            size += rows
        else:
            groups.append([day])
            size = rows
    return groups


def prepare(
    source: EventSource,
    paths: Sequence[str | Path],
    *,
    now: dt.datetime | None = None,
    window: tuple[dt.date, dt.date] | None = None,
) -> Prepared:
    """Read and validate ``paths``; good rows and quarantined rows wait in a staging database.

    ``window`` (first day, last day), when given, keeps only events of those days: the rest
    are counted as outside the window, neither landed nor quarantined.
    """
    if not paths:
        raise IngestError(f"source {source.name!r}: no files given to ingest")
    now = now or dt.datetime.now(dt.UTC)
    workdir = Path(tempfile.mkdtemp(prefix=f"keel-ingest-{source.name}-"))
    con = duckdb.connect(str(workdir / "staging.duckdb"))
    con.execute("SET TimeZone = 'UTC'")
    con.execute(f"SET temp_directory = '{workdir / 'spill'}'")
    prepared = Prepared(source, [str(Path(p).resolve()) for p in paths], con, workdir, window)
    try:
        _create_staging(con, source, prepared.files)
        names = [c.name for c in source.all_columns()]
        for idx, path in enumerate(prepared.files):
            for batch in read_batches(Path(path), names):
                prepared.rows_read += batch.num_rows
                _validate_into(con, source, batch, idx, now)
        if source.event_id:
            _quarantine_duplicates(con, source)
        if window is not None:
            prepared.rows_outside_window = _drop_outside(con, source, window)
        prepared.quarantined = dict(
            con.execute("SELECT reason_code, count(*) FROM bad GROUP BY 1 ORDER BY 1").fetchall()
        )
    except BaseException:
        prepared.close()
        raise
    return prepared


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
    history = {
        day: rows
        for day, rows in lake.partition_rows(source.table_name).items()
        if isinstance(day, dt.date) and day not in staged.days
    }
    recent = [rows for _, rows in sorted(history.items())[-HISTORY_PARTITIONS:]]
    staged_rows = lake.partition_rows(source.table_name, snapshot_id=staged.snapshot_id)
    reports = []
    for group in group_days({d: staged_rows.get(d, 0) for d in staged.days}, CHUNK_ROWS):
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


def _create_staging(con: duckdb.DuckDBPyConnection, source: EventSource, files: list[str]) -> None:
    cols = ", ".join(f'"{c.name}" {_SQL_TYPES[c.type]}' for c in source.all_columns())
    con.execute(f"CREATE TABLE good (_file INTEGER, _row BIGINT, {cols})")
    con.execute("CREATE TABLE bad (_file INTEGER, _row BIGINT, reason_code VARCHAR, reason VARCHAR, record VARCHAR)")
    con.execute("CREATE TABLE files (idx INTEGER, name VARCHAR)")
    con.executemany("INSERT INTO files VALUES (?, ?)", list(enumerate(files)))


def _convert(col: Column, raw: str, batch_type: pa.DataType) -> str:
    """SQL turning a raw value into the declared type, NULL where it does not parse."""
    if batch_type == col.arrow_type:
        return raw
    text = f"trim(CAST({raw} AS VARCHAR))"
    if col.type == "int64":
        # TRY_CAST('1.5' AS BIGINT) rounds to 2; an integer column must hold integers.
        return f"CASE WHEN regexp_full_match({text}, '[+-]?[0-9]+') THEN TRY_CAST({text} AS BIGINT) END"
    if col.type == "string":
        return f"CAST({raw} AS VARCHAR)"
    return f"TRY_CAST({text} AS {_SQL_TYPES[col.type]})"


def _validate_into(
    con: duckdb.DuckDBPyConnection, source: EventSource, batch: pa.Table, file_idx: int, now: dt.datetime
) -> None:
    keys = set(source.key_columns) | {source.timestamp} | ({source.event_id} if source.event_id else set())
    converted, codes, messages, raw_json = [], [], [], []
    if "_malformed" in batch.column_names:
        codes.append("CASE WHEN _malformed THEN 'malformed_record' END")
    for col in source.all_columns():
        raw = f'"{col.name}"'
        if col.name in keys and col.type == "string":
            raw = f"NULLIF(trim({raw}), '')"
        conv = _convert(col, raw, batch.schema.field(col.name).type)
        converted.append(f'{conv} AS "{col.name}"')
        raw_json.append(f'"{col.name}" := CAST("{col.name}" AS VARCHAR)')
        if not col.nullable:
            code = "missing_key" if col.name in keys else "missing_value"
            codes.append(f"CASE WHEN {raw} IS NULL THEN '{code}' END")
            messages.append(f"CASE WHEN {raw} IS NULL THEN 'missing {col.name}' END")
        bad_code = "bad_timestamp" if col.type == "timestamp" else "wrong_type"
        bad = f"({raw} IS NOT NULL AND {conv} IS NULL)"
        codes.append(f"CASE WHEN {bad} THEN '{bad_code}' END")
        messages.append(
            f"CASE WHEN {bad} THEN '{col.name}: ' || to_json(CAST({raw} AS VARCHAR)) || ' is not {_TYPE_WORDS.get(col.type, col.type)}' END"
        )
    limit = now + dt.timedelta(seconds=source.max_future_skew_s)
    ts = _convert(source.column(source.timestamp), f'"{source.timestamp}"', batch.schema.field(source.timestamp).type)
    future = f"({ts} > TIMESTAMPTZ '{limit.isoformat()}')"
    codes.append(f"CASE WHEN {future} THEN 'future_timestamp' END")
    messages.append(
        f"CASE WHEN {future} THEN '{source.timestamp}: ' || CAST({ts} AS VARCHAR) || "
        f"' is after the ingest time plus {source.max_future_skew_s}s ({limit.isoformat()})' END"
    )
    # VARCHAR, not JSON: coalesced with a malformed line's text, JSON would make DuckDB parse that text.
    record = "CAST(to_json(struct_pack(" + ", ".join(raw_json) + ")) AS VARCHAR)"
    reason = f"concat_ws('; ', {', '.join(messages)})"
    if "_malformed" in batch.column_names:
        # A line that is no object has no fields: every column's "missing" would only repeat that.
        reason = f"CASE WHEN _malformed THEN 'line is not a JSON object' ELSE {reason} END"
    con.register("batch", batch)
    try:
        con.execute(
            "CREATE OR REPLACE TEMP TABLE checked AS SELECT _row, "
            + ", ".join(converted)
            + f", coalesce({', '.join(codes)}) AS _code, {reason} AS _reason, "
            + (f"coalesce(_raw, {record})" if "_raw" in batch.column_names else record)
            + " AS _record FROM batch"
        )
    finally:
        con.unregister("batch")
    names = ", ".join(f'"{c.name}"' for c in source.all_columns())
    con.execute(f"INSERT INTO good SELECT {file_idx}, _row, {names} FROM checked WHERE _code IS NULL")
    con.execute(
        f"INSERT INTO bad SELECT {file_idx}, _row, _code, _reason, _record FROM checked WHERE _code IS NOT NULL"
    )


def _quarantine_duplicates(con: duckdb.DuckDBPyConnection, source: EventSource) -> None:
    eid = f'"{source.event_id}"'
    names = ", ".join(f'"{c.name}"' for c in source.all_columns())
    raw_json = ", ".join(f'"{c.name}" := CAST("{c.name}" AS VARCHAR)' for c in source.all_columns())
    con.execute(
        "CREATE OR REPLACE TEMP TABLE ranked AS SELECT *, "
        f"row_number() OVER (PARTITION BY {eid} ORDER BY _file, _row) AS _n, "
        f"first_value(_file) OVER (PARTITION BY {eid} ORDER BY _file, _row) AS _f0, "
        f"first_value(_row) OVER (PARTITION BY {eid} ORDER BY _file, _row) AS _r0 FROM good"
    )
    con.execute(
        "INSERT INTO bad SELECT r._file, r._row, 'duplicate_event_id', "
        f"'duplicate {source.event_id} ' || to_json(r.{eid}) || ' (first at ' || f.name || ' row ' || r._r0 || ')', "
        f"to_json(struct_pack({raw_json})) FROM ranked r JOIN files f ON f.idx = r._f0 WHERE r._n > 1"
    )
    con.execute(f"CREATE OR REPLACE TABLE good AS SELECT _file, _row, {names} FROM ranked WHERE _n = 1")


def _drop_outside(con: duckdb.DuckDBPyConnection, source: EventSource, window: tuple[dt.date, dt.date]) -> int:
    day = f'CAST("{source.timestamp}" AS DATE)'
    bounds = f"DATE '{window[0].isoformat()}' AND DATE '{window[1].isoformat()}'"
    outside = con.execute(f"SELECT count(*) FROM good WHERE {day} NOT BETWEEN {bounds}").fetchone()[0]
    if outside:
        con.execute(f"DELETE FROM good WHERE {day} NOT BETWEEN {bounds}")
    return outside
