"""Loading the inference log: whole UTC days from the sinks onto an audit branch of
``monitoring.inference_log``, the audit of the branch, and the numbers shown for it.

``stage_inference_log`` reads a day's JSONL files and, when Kafka is configured, the
topic's records of that day, removes exact copies (both sinks are at-least-once), sends
unreadable records to ``keel.quarantine`` and stages the day (a reload replaces it);
``audit_inference_log`` checks the branch, and ``keel.lakehouse.wap.publish`` moves main.
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.expressions import And, EqualTo, In, Or

from keel.dsl import Column, Entity, EventSource
from keel.features.materialize import HISTORY_PARTITIONS
from keel.inference_log.writer import (
    ALIASES,
    DAY,
    KAFKA_LATENESS,
    SOURCE,
    TABLE,
    TOPIC,
    InferenceLogError,
    day_folder,
    log_root,
)
from keel.ingest.batch import QUARANTINE_TABLE
from keel.ingest.validation import CHUNK_ROWS, QUARANTINE_SCHEMA, group_days
from keel.lakehouse import wap
from keel.lakehouse.audit import AuditReport, ExpectationOutcome, audit_events, combine_reports
from keel.lakehouse.tables import Lakehouse, day_filter
from keel.stream.kafka_io import end_offsets, location, quarantine_rows

if TYPE_CHECKING:
    from keel.config import Settings

log = logging.getLogger(__name__)


# Loading ------------------------------------------------------------------------------------


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
    is set, from ``topic``. Each day is replaced whole, so a reload gives the same rows. Exact
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
    reader = _TopicReader(settings.kafka_bootstrap, topic, lateness, timeout_s) if settings.kafka_bootstrap else None
    rows_per_day: dict[dt.date, int] = {}
    bad: list[pa.Table] = []
    files: list[str] = []
    read = duplicates = 0
    kafka_records = 0 if reader else None

    def chunks() -> Iterator[pa.Table]:
        nonlocal read, duplicates, kafka_records
        waiting: list[pa.Table] = []
        for day in days:
            lines, day_files = _file_lines(root, day)
            files.extend(day_files)
            if reader is not None:
                from_topic = reader.read_day(day)
                kafka_records += from_topic.num_rows
                lines = _concat([lines, from_topic])
            good, rejected, copies = _parse(lines, day, schema)
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
    bad_table = _concat(bad) if bad else None
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


# Reading the sinks back -----------------------------------------------------------------------


# What is read back, before parsing: a line of a file (origin_day: its folder's day) or a
# Kafka record (origin: kafka://topic/partition, row_number: the offset, origin_day: its timestamp's day).
_LINES = pa.schema(
    [
        ("origin", pa.string()),
        ("row_number", pa.int64()),
        ("origin_day", pa.date32()),
        ("from_file", pa.bool_()),
        ("line", pa.string()),
    ]
)


def _lines(origins: list, numbers: list, days: list, from_file: bool, lines: list) -> pa.Table:
    return pa.table([origins, numbers, days, [from_file] * len(lines), lines], schema=_LINES)


def _concat(tables: list[pa.Table]) -> pa.Table:
    return pa.concat_tables(tables) if tables else _LINES.empty_table()


def _file_lines(root: Path, day: dt.date) -> tuple[pa.Table, list[str]]:
    """Every line of the day's finished files, with the file and line number it came from."""
    folder = day_folder(root, day)
    if not folder.is_dir():
        return _LINES.empty_table(), []
    paths = sorted(p for p in folder.iterdir() if p.suffix == ".jsonl" and not p.name.startswith("."))
    origins, numbers, lines = [], [], []
    for path in paths:
        text = path.read_bytes().decode("utf-8", errors="replace").split("\n")
        if text and text[-1] == "":
            text.pop()
        lines += text
        origins += [str(path)] * len(text)
        numbers += range(1, len(text) + 1)
    return _lines(origins, numbers, [day] * len(lines), True, lines), [str(p) for p in paths]


class _TopicReader:
    """Reads a day of the topic, partition by partition, without a consumer group.

    Each partition is read from the first offset stamped at or after the day's start minus
    ``lateness`` (``offsets_for_times``) until a record stamped at or after the day's end plus
    ``lateness``, or the log end as it was when the reader opened; records are then kept by
    their own ts. A broker that answers offsets_for_times too early (tansu 0.6 answers the
    log start) only makes the read longer.
    """

    def __init__(self, bootstrap: str, topic: str, lateness: dt.timedelta, timeout_s: float) -> None:
        from kafka import KafkaConsumer, TopicPartition
        from kafka.errors import KafkaError

        self.bootstrap, self.topic, self.lateness, self.timeout_s = bootstrap, topic, lateness, timeout_s
        self.notes: list[str] = []
        try:
            self.consumer = KafkaConsumer(
                bootstrap_servers=bootstrap,
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                fetch_max_wait_ms=100,
                max_poll_records=10_000,
                request_timeout_ms=int(timeout_s * 1000),
                client_id="keel-inference-log-loader",
            )
            found = self.consumer.partitions_for_topic(topic) or set()
            self.partitions = [TopicPartition(topic, p) for p in sorted(found)]
            self.ends = end_offsets(bootstrap, self.partitions) if self.partitions else {}
        except KafkaError as exc:
            raise InferenceLogError(
                f"cannot read topic {topic!r} at KEEL_KAFKA_BOOTSTRAP={bootstrap!r}: {exc!r} "
                "(is the broker running, and the address right?)"
            ) from None
        if not self.partitions:
            self.notes.append(f"topic {topic!r} does not exist on {bootstrap}: nothing was logged to Kafka")

    def read_day(self, day: dt.date) -> pa.Table:
        if not self.partitions:
            return _LINES.empty_table()
        start = dt.datetime.combine(day, dt.time(), dt.UTC)
        start_ms = int((start - self.lateness).timestamp() * 1000)
        stop_ms = int((start + DAY + self.lateness).timestamp() * 1000)
        consumer = self.consumer
        found = consumer.offsets_for_times({tp: max(0, start_ms) for tp in self.partitions})
        consumer.assign(self.partitions)
        consumer.resume(*self.partitions)
        todo = set()
        for tp in self.partitions:
            first = found[tp].offset if found.get(tp) is not None else self.ends[tp]
            if first < self.ends[tp]:
                consumer.seek(tp, first)
                todo.add(tp)
            else:
                consumer.pause(tp)
        origins, numbers, days, lines = [], [], [], []
        deadline = time.monotonic() + self.timeout_s
        while todo:
            if time.monotonic() > deadline:
                at = {tp.partition: consumer.position(tp) for tp in todo}
                raise InferenceLogError(
                    f"reading {day} from topic {self.topic!r} at {self.bootstrap}: no progress within "
                    f"{self.timeout_s:.0f}s (positions {at}, log ends "
                    f"{ {tp.partition: self.ends[tp] for tp in todo} }); check the broker and rerun"
                )
            for tp, records in consumer.poll(timeout_ms=200).items():
                if tp not in todo:
                    continue
                end = self.ends[tp]
                for r in records:
                    if r.offset >= end or r.timestamp >= stop_ms:
                        todo.discard(tp)
                        consumer.pause(tp)
                        break
                    origins.append(location(self.topic, tp.partition))
                    numbers.append(r.offset)
                    days.append(
                        dt.datetime.fromtimestamp(r.timestamp / 1000, dt.UTC).date() if r.timestamp >= 0 else None
                    )
                    lines.append(r.value.decode("utf-8", errors="replace") if r.value is not None else None)
            for tp in list(todo):
                if consumer.position(tp) >= self.ends[tp]:
                    todo.discard(tp)
                    consumer.pause(tp)
        return _lines(origins, numbers, days, False, lines)

    def close(self) -> None:
        self.consumer.close(autocommit=False)


# (field, kind): kinds are checked against DuckDB's json_type of the field's value.
_FIELDS = (
    ("request_id", "key"),
    ("ts", "timestamp"),
    ("model", "key"),
    ("version", "integer"),
    ("alias", "string"),
    ("shadow", "bool"),
    ("entity_id", "key"),
    ("features", "object"),
    ("prediction", "number"),
    ("latency_ms", "number"),
    ("degraded", "bool"),
    ("missing_features", "array"),
)
_KINDS = {  # kind -> (accepted json types, value expression over the path, words for a message)
    "key": ("'VARCHAR'", "NULLIF(trim(json_extract_string(j, {p})), '')", "a non-empty string"),
    "string": ("'VARCHAR'", "json_extract_string(j, {p})", "a string"),
    "timestamp": ("'VARCHAR'", "TRY_CAST(json_extract_string(j, {p}) AS TIMESTAMPTZ)", "an ISO timestamp"),
    "integer": ("'BIGINT', 'UBIGINT'", "TRY_CAST(json_extract(j, {p}) AS BIGINT)", "an integer"),
    "bool": ("'BOOLEAN'", "TRY_CAST(json_extract(j, {p}) AS BOOLEAN)", "true or false"),
    "number": ("'BIGINT', 'UBIGINT', 'DOUBLE'", "TRY_CAST(json_extract(j, {p}) AS DOUBLE)", "a number"),
    "object": ("'OBJECT'", "CAST(json_extract(j, {p}) AS VARCHAR)", "a JSON object"),
    "array": ("'ARRAY'", "CAST(json_extract(j, {p}) AS VARCHAR)", "a JSON list"),
}


def _parse_sql() -> str:
    typed, codes, reasons = [], [], []
    for name, kind in _FIELDS:
        accepted, value, words = _KINDS[kind]
        path = f"'$.\"{name}\"'"
        t = f"json_type(j, {path})"
        typed.append(f'CASE WHEN {t} IN ({accepted}) THEN {value.format(p=path)} END AS "{name}"')
        typed.append(f'{t} AS "{name}__type"')
        missing = f'("{name}__type" IS NULL OR "{name}__type" = \'NULL\')'
        wrong = f'(NOT {missing} AND "{name}" IS NULL)'
        code = "bad_timestamp" if kind == "timestamp" else "wrong_type"
        codes += [f"CASE WHEN {missing} THEN 'missing_value' END", f"CASE WHEN {wrong} THEN '{code}' END"]
        reasons += [
            f"CASE WHEN {missing} THEN 'missing {name}' END",
            f"CASE WHEN {wrong} THEN '{name}: ' || CAST(json_extract(j, {path}) AS VARCHAR) || ' is not {words}' END",
        ]
    wrong_day = "(from_file AND ts IS NOT NULL AND CAST(ts AS DATE) <> origin_day)"
    codes.append(f"CASE WHEN {wrong_day} THEN 'wrong_day' END")
    reasons.append(
        f"CASE WHEN {wrong_day} THEN 'ts ' || CAST(ts AS VARCHAR) || ' is not on the day of its folder, ' || "
        "CAST(origin_day AS VARCHAR) END"
    )
    return (
        "WITH src AS (SELECT *, CASE WHEN json_valid(line) THEN json_type(line) = 'OBJECT' ELSE false END "
        "AS is_object FROM lines), "
        "parsed AS (SELECT origin, row_number, origin_day, from_file, line, is_object, "
        "CASE WHEN is_object THEN CAST(line AS JSON) END AS j FROM src), "
        f"typed AS (SELECT *, {', '.join(typed)} FROM parsed) "
        "SELECT *, CASE WHEN NOT is_object THEN 'malformed_record' ELSE "
        f"coalesce({', '.join(codes)}) END AS reason_code, "
        "CASE WHEN NOT is_object THEN 'line is not a JSON object' ELSE "
        f"concat_ws('; ', {', '.join(reasons)}) END AS reason FROM typed"
    )


def _parse(lines: pa.Table, day: dt.date, schema: pa.Schema) -> tuple[pa.Table, pa.Table, int]:
    """(the day's good rows as the table's schema with exact copies removed, bad records, copies removed).

    A good record belongs to the day of its ts; a bad one to its file's day or its Kafka
    timestamp's day, so a topic read that overlaps the next day reports it once.
    """
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.register("lines", lines)
        con.execute(f"CREATE TEMP TABLE checked AS {_parse_sql()}")
        day_sql = f"DATE '{day.isoformat()}'"
        bad = con.sql(
            "SELECT origin AS file, row_number, reason_code, reason, line AS record FROM checked "
            f"WHERE reason_code IS NOT NULL AND origin_day = {day_sql} ORDER BY origin, row_number"
        ).to_arrow_table()
        columns = ", ".join(
            "request_id || ':' || model || ':' || alias || CASE WHEN shadow THEN ':shadow' ELSE '' END AS log_id"
            if f.name == "log_id"
            else f'"{f.name}"'
            for f in schema
        )
        kept = f"FROM checked WHERE reason_code IS NULL AND CAST(ts AS DATE) = {day_sql}"
        total = con.sql(f"SELECT count(*) {kept}").fetchall()[0][0]
        good = con.sql(f"SELECT DISTINCT {columns} {kept} ORDER BY ts, log_id").to_arrow_table()
    finally:
        con.close()
    good = pa.Table.from_arrays([pc.cast(good.column(f.name), f.type) for f in schema], schema=schema)
    return good, bad, total - good.num_rows


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
