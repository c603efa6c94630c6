"""Loading the inference log: whole UTC days from the sinks onto an audit branch of
``monitoring.inference_log``, the audit of the branch, and the numbers shown for it.

``stage_inference_log`` reads a day's JSONL files and, when Kafka is configured, the
topic's records of that day, removes exact copies (both sinks are at-least-once), sends
unreadable records to ``keel.quarantine`` and stages the day (a reload replaces it);
``audit_inference_log`` checks the branch, and ``keel.lakehouse.wap.publish`` moves main.
Reading and parsing the sinks' records is ``keel.inference_log.sink_readers``.
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.expressions import And, EqualTo, In, Or

from keel.dsl import Column, Entity, EventSource
from keel.features.materialize import HISTORY_PARTITIONS
from keel.inference_log.records import TABLE, TOPIC, InferenceLogError
from keel.inference_log.sink_readers import KAFKA_LATENESS, TopicReader, concat_lines, file_lines, parse_lines
from keel.inference_log.sinks import log_root
from keel.ingest.batch import QUARANTINE_TABLE
from keel.ingest.validation import CHUNK_ROWS, QUARANTINE_SCHEMA, group_days
from keel.lakehouse import wap
from keel.lakehouse.audit import AuditReport, ExpectationOutcome, audit_events, combine_reports
from keel.lakehouse.tables import Lakehouse, day_filter
from keel.stream.kafka_io import quarantine_rows

if TYPE_CHECKING:
    from keel.config import Settings

log = logging.getLogger(__name__)

SOURCE = "inference_log"  # the quarantine table's ``source`` for unreadable records
ALIASES = ("champion", "challenger")

# The table described as an event source, so the source audit (keel.lakehouse.audit) checks it.
DECLARATION = EventSource(
    name="inference_log",
    namespace="monitoring",
    entity=Entity(name="served_entity", join_keys={"entity_id": "string"}),
    timestamp="ts",
    event_id="log_id",
    description="Every answer of the serving process: model, version, role, features, prediction, latency.",
    columns=(
        Column("request_id", "string", nullable=False),
        Column("model", "string", nullable=False),
        Column("version", "int64", nullable=False, min=1),
        Column("alias", "string", nullable=False, allowed=ALIASES),
        Column("shadow", "bool", nullable=False),
        Column("features", "string", nullable=False, description="JSON object in the model's feature order"),
        Column("prediction", "float64", nullable=False),
        Column("latency_ms", "float64", nullable=False, min=0),
        Column("degraded", "bool", nullable=False),
        Column("missing_features", "string", nullable=False, description="JSON list of feature names"),
    ),
)


@dataclass(frozen=True)
class LoadedLog:
    """Days of the log staged on a run's audit branch, and what the read found."""

    staged: wap.StagedWrite
    rows_per_day: dict[dt.date, int]
    records_read: int
    duplicates: int
    bad_records: dict[str, int]
    files: int
    kafka_records: int | None  # None: Kafka is not configured
    notes: list[str] = field(default_factory=list)

    @property
    def quarantined(self) -> int:
        return sum(self.bad_records.values())


def stage_inference_log(
    lake: Lakehouse,
    settings: Settings,
    days: Sequence[dt.date],
    run_id: str,
    *,
    topic: str = TOPIC,
    lateness: dt.timedelta = KAFKA_LATENESS,
    timeout_s: float = 60.0,
) -> LoadedLog:
    """Read every record of ``days`` (UTC) and stage the days on the run's audit branch.

    Records come from the files under ``settings.home`` and, when ``settings.kafka_bootstrap``
    is set, from ``topic`` (read once for all the days, however late a record reached it). Each day is replaced whole, so a reload gives the same rows. Exact
    copies (a retried batch) are kept once; records sharing a log_id but differing are kept,
    for the audit to flag. Unreadable records go to keel.quarantine.

    A day with no records is staged empty rather than skipped: the reload then says what the
    log holds for that day (a skipped day would leave an earlier load in place), and the audit
    fails on it unless told the day is legitimately empty, so a silent serving outage or a
    broken log pipeline does not publish as "no traffic".
    """
    days = sorted(set(days))
    if not days:
        raise InferenceLogError("inference log: no days to load; give at least one day")
    schema = DECLARATION.arrow_schema()
    lake.ensure_table(TABLE, schema, day_column="ts")
    root = log_root(settings)
    reader = (
        TopicReader(settings.kafka_bootstrap, topic, lateness, timeout_s, days) if settings.kafka_bootstrap else None
    )
    rows_per_day: dict[dt.date, int] = {}
    bad: list[pa.Table] = []
    files: list[str] = []
    read = duplicates = 0
    kafka_records = 0 if reader else None

    def chunks() -> Iterator[pa.Table]:
        nonlocal read, duplicates, kafka_records
        waiting: list[pa.Table] = []
        for day in days:
            lines, day_files = file_lines(root, day)
            files.extend(day_files)
            if reader is not None:
                from_topic = reader.read_day(day)
                kafka_records += from_topic.num_rows
                lines = concat_lines([lines, from_topic])
            good, rejected, copies = parse_lines(lines, day, schema)
            read += lines.num_rows
            duplicates += copies
            rows_per_day[day] = good.num_rows
            if rejected.num_rows:
                bad.append(rejected)
            # Whole days go together into one commit up to CHUNK_ROWS: a commit per day of a
            # long range would cost more than the rows.
            waiting.append(good)
            if sum(t.num_rows for t in waiting) >= CHUNK_ROWS:
                yield pa.concat_tables(waiting)
                waiting.clear()
        if waiting:
            yield pa.concat_tables(waiting)

    try:
        staged = wap.stage(
            lake,
            TABLE,
            chunks(),
            run_id=run_id,
            source="serving:inference_log",
            day_column="ts",
            mode="replace",
            days=days,
        )
    finally:
        if reader is not None:
            reader.close()
    notes = list(reader.notes) if reader else []
    bad_table = concat_lines(bad) if bad else None
    by_reason = _write_quarantine(lake, bad_table, files, run_id) if bad_table is not None else {}
    return LoadedLog(staged, rows_per_day, read, duplicates, by_reason, len(files), kafka_records, notes)


def audit_inference_log(lake: Lakehouse, staged: wap.StagedWrite, *, allow_empty_days: bool = False) -> AuditReport:
    """The staged days audited: columns set, log_id unique, alias a known role, version >= 1,
    latency >= 0, rows per day against main's recent days, and no day empty (unless allowed)."""
    recent = wap.recent_partition_rows(lake, TABLE, staged.days, HISTORY_PARTITIONS)
    counts = lake.partition_rows(TABLE, snapshot_id=staged.snapshot_id)
    per_day = {d: counts.get(d, 0) for d in staged.days}
    # Days with rows, in parts of about CHUNK_ROWS; an empty part would fail on its own emptiness.
    groups = group_days({d: n for d, n in per_day.items() if n}, CHUNK_ROWS) or [list(staged.days)]
    reports = []
    for group in groups:
        data = lake.read(TABLE, snapshot_id=staged.snapshot_id, row_filter=day_filter("ts", group))
        reports.append(audit_events(data, DECLARATION, recent_partition_rows=recent))
    report = combine_reports(reports)
    empty = [d for d, n in per_day.items() if n == 0]
    outcomes = list(report.outcomes)
    if allow_empty_days and report.row_count == 0:
        outcomes = [
            ExpectationOutcome(o.expectation, o.column, True, 0, "no rows; empty days are allowed for this run", [])
            if o.expectation == "expect_table_row_count_to_be_between"
            else o
            for o in outcomes
        ]
    shown = ", ".join(d.isoformat() for d in empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
    if not empty:
        detail = f"all {len(per_day)} days hold rows"
    elif allow_empty_days:
        detail = f"no rows on {shown}; allowed for this run"
    else:
        detail = (
            f"no rows on {shown}: serving logged nothing those days, or its log did not reach the files/topic. "
            "If the service really had no traffic, rerun with allow_empty_days"
        )
    outcomes.append(
        ExpectationOutcome(
            "expect_each_day_to_have_rows",
            "ts",
            allow_empty_days or not empty,
            len(empty),
            detail,
            [d.isoformat() for d in empty[:5]],
        )
    )
    return AuditReport(report.table, report.row_count, tuple(outcomes))


@dataclass(frozen=True)
class LogDays:
    """The write-audit-publish writer of days of the inference log: what the Dagster asset
    ``monitoring/inference_log`` runs. ``allow_empty_days`` lets days with no traffic publish."""

    lake: Lakehouse
    settings: Settings
    days: tuple[dt.date, ...]
    allow_empty_days: bool = False

    @property
    def table(self) -> str:
        return TABLE

    def stage(self, run_id: str) -> LoadedLog:
        return stage_inference_log(self.lake, self.settings, self.days, run_id)

    def audit(self, staged: wap.StagedWrite) -> AuditReport:
        return audit_inference_log(self.lake, staged, allow_empty_days=self.allow_empty_days)


@dataclass(frozen=True)
class LogSummary:
    """What a person checks on a load: answers per model, version and role, latency, degraded share."""

    per_model: list[dict]  # model, version, alias, shadow, rows
    latency_ms: dict[str, float]  # p50, p95, p99 (empty without rows)
    degraded_share: float | None


def summarize(data: pa.Table) -> LogSummary:
    con = duckdb.connect()
    try:
        con.register("log", data.select(["model", "version", "alias", "shadow", "latency_ms", "degraded"]))
        per_model = con.sql(
            "SELECT model, version, alias, shadow, count(*) AS rows FROM log "
            "GROUP BY ALL ORDER BY model, version, alias, shadow"
        ).to_arrow_table()
        p50, p95, p99, degraded = con.sql(
            "SELECT quantile_cont(latency_ms, 0.5), quantile_cont(latency_ms, 0.95), "
            "quantile_cont(latency_ms, 0.99), avg(degraded::INTEGER) FROM log"
        ).fetchall()[0]
    finally:
        con.close()
    latency = {} if p50 is None else {"p50": p50, "p95": p95, "p99": p99}
    return LogSummary(per_model.to_pylist(), latency, degraded)


def _write_quarantine(lake: Lakehouse, bad: pa.Table, files: list[str], run_id: str) -> dict[str, int]:
    """Replace the quarantine rows of the files read and of these Kafka records with ``bad``.

    Files and topic records never change once written, so a reload finds the same bad records
    at the same places: the quarantine holds each once, whatever the number of loads.
    """
    now = dt.datetime.now(dt.UTC)
    rows = quarantine_rows(SOURCE, bad, run_id, now)
    lake.ensure_table(QUARANTINE_TABLE, QUARANTINE_SCHEMA, identity_column="source")
    scopes = [In("file", files)] if files else []
    kafka = bad.filter(pc.starts_with(bad.column("file"), "kafka://"))
    for origin in sorted(set(kafka.column("file").to_pylist())):
        offsets = kafka.filter(pc.equal(kafka.column("file"), origin)).column("row_number").to_pylist()
        scopes.append(And(EqualTo("file", origin), In("row_number", offsets)))
    scope = scopes[0]
    for part in scopes[1:]:
        scope = Or(scope, part)
    scope = And(EqualTo("source", SOURCE), scope)
    props = lake.snapshot_properties(f"serving:{SOURCE}", [], run_id)
    lake.replace_on_main(QUARANTINE_TABLE, rows, scope, props)
    counts = collections.Counter(bad.column("reason_code").to_pylist())
    return dict(sorted(counts.items()))
