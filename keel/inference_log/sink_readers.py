"""Reading the inference log's sinks back: a day's lines from the JSONL files and from the
Kafka topic, parsed and checked into rows of ``monitoring.inference_log`` and bad records.

A good record belongs to the day of its ts; a bad one to its file's day or its Kafka
timestamp's day. ``keel.inference_log.loader`` stages the rows and quarantines the rest.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from keel.inference_log.records import InferenceLogError
from keel.inference_log.sinks import day_folder
from keel.stream.kafka_io import end_offsets, location

# How late a record may reach Kafka after its own ts; a day's read spans this much either side.
KAFKA_LATENESS = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)

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


def concat_lines(tables: list[pa.Table]) -> pa.Table:
    return pa.concat_tables(tables) if tables else _LINES.empty_table()


def file_lines(root: Path, day: dt.date) -> tuple[pa.Table, list[str]]:
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


class TopicReader:
    """Reads the topic's records of some days, partition by partition, without a consumer group.

    The first ``read_day`` reads each partition once, from the first offset stamped at or after
    the first day's start minus ``lateness`` (``offsets_for_times``) to the log end as it was
    when the reader opened, and keeps each record stamped within ``lateness`` of a requested
    day under that day (its own ts decides later). Nothing stops at a record stamped after the
    days: a record may reach the log long after its ts (a replayed backtest, a server that held
    its batch through a broker outage), and one read of the span costs what the per-day reads
    cost for one day. A broker that answers offsets_for_times too early (tansu 0.6 answers the
    log start) only makes the read longer.
    """

    def __init__(
        self, bootstrap: str, topic: str, lateness: dt.timedelta, timeout_s: float, days: Sequence[dt.date]
    ) -> None:
        from kafka import KafkaConsumer, TopicPartition
        from kafka.errors import KafkaError

        self.bootstrap, self.topic, self.lateness, self.timeout_s = bootstrap, topic, lateness, timeout_s
        self.days = sorted(set(days))
        self.notes: list[str] = []
        self._by_day: dict[dt.date, tuple[list, list, list, list]] | None = None
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
        """The records kept for ``day`` (one of the reader's days), each handed out once."""
        if day not in self.days:
            raise InferenceLogError(f"inference log: {day} is not one of the days this reader reads ({self.days})")
        if not self.partitions:
            return _LINES.empty_table()
        if self._by_day is None:
            self._by_day = self._read_span()
        origins, numbers, days, lines = self._by_day.pop(day, ([], [], [], []))
        return _lines(origins, numbers, days, False, lines)

    def _windows(self) -> tuple[np.ndarray, np.ndarray]:
        """Each day's [start - lateness, end + lateness) in ms."""
        starts = [dt.datetime.combine(d, dt.time(), dt.UTC) for d in self.days]
        lo = np.array([int((s - self.lateness).timestamp() * 1000) for s in starts])
        hi = np.array([int((s + DAY + self.lateness).timestamp() * 1000) for s in starts])
        return lo, hi

    def _read_span(self) -> dict[dt.date, tuple[list, list, list, list]]:
        lo, hi = self._windows()
        by_day: dict[dt.date, tuple[list, list, list, list]] = {}
        consumer = self.consumer
        found = consumer.offsets_for_times({tp: max(0, int(lo[0])) for tp in self.partitions})
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
        deadline = time.monotonic() + self.timeout_s
        while todo:
            if time.monotonic() > deadline:
                at = {tp.partition: consumer.position(tp) for tp in todo}
                raise InferenceLogError(
                    f"reading {self.days[0]}..{self.days[-1]} from topic {self.topic!r} at {self.bootstrap}: "
                    f"not done within {self.timeout_s:.0f}s (positions {at}, log ends "
                    f"{ {tp.partition: self.ends[tp] for tp in todo} }); check the broker and rerun"
                )
            for tp, records in consumer.poll(timeout_ms=200).items():
                if tp not in todo:
                    continue
                deadline = time.monotonic() + self.timeout_s  # progress: the timeout is for a stalled read
                end = self.ends[tp]
                where = location(self.topic, tp.partition)
                for r in records:
                    if r.offset >= end:
                        break
                    # The days whose window holds the record's stamp (one, or two near midnight).
                    first = int(np.searchsorted(hi, r.timestamp, side="right"))
                    for i in range(first, len(self.days)):
                        if lo[i] > r.timestamp:
                            break
                        bucket = by_day.setdefault(self.days[i], ([], [], [], []))
                        bucket[0].append(where)
                        bucket[1].append(r.offset)
                        bucket[2].append(
                            dt.datetime.fromtimestamp(r.timestamp / 1000, dt.UTC).date() if r.timestamp >= 0 else None
                        )
                        bucket[3].append(r.value.decode("utf-8", errors="replace") if r.value is not None else None)
            for tp in list(todo):
                if consumer.position(tp) >= self.ends[tp]:
                    todo.discard(tp)
                    consumer.pause(tp)
        return by_day

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


def parse_lines(lines: pa.Table, day: dt.date, schema: pa.Schema) -> tuple[pa.Table, pa.Table, int]:
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
