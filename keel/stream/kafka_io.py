"""The stream worker's I/O: validating polled Kafka records, and writing them to Iceberg exactly once.

Validation is the batch path's (``keel.ingest.validation``): the same SQL gives the same reason
codes and messages, with ``kafka://<topic>/<partition>`` as the file and the offset as the row.

Exactly once: every append to a raw table records, in the same commit, the next offset to
read for each partition of the source's topic (``keel.kafka.offsets``, JSON
``{"topic": {"partition": next_offset}}``), as a snapshot property and as a table property
(the table property survives compaction and snapshot expiry, which write or drop snapshots
without it). A worker starts each partition there, and a write keeps only events at or
past the recorded offsets of the table it commits to, asserting the head it read them at:
an event is in the table once whatever crashed, replayed or raced.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.exceptions import CommitFailedException
from pyiceberg.expressions import And, EqualTo, GreaterThanOrEqual, In, LessThanOrEqual, Or
from pyiceberg.table import Table

from keel.dsl import EventSource
from keel.ingest import validation
from keel.ingest.batch import QUARANTINE_TABLE
from keel.ingest.validation import QUARANTINE_SCHEMA
from keel.lakehouse.tables import COMMIT_ATTEMPTS, Lakehouse, day_filter, days_of

log = logging.getLogger(__name__)

OFFSETS_PROPERTY = "keel.kafka.offsets"
PARTITION, OFFSET = "_partition", "_offset"

Offsets = dict[int, int]  # partition -> next offset to read


def location(topic: str, partition: int) -> str:
    """How a Kafka partition is named where a batch ingest names its file (quarantine ``file``)."""
    return f"kafka://{topic}/{partition}"


# Validation -------------------------------------------------------------------------------


# A poll's partitions are validated in one pass: the row number carries the partition above these bits.
_OFFSET_BITS = 40


class EventValidator:
    """Validates polled records of one source's topic in one DuckDB connection kept for the worker's life.

    The checks are keel.ingest.validation's, prepared once over a table the polled lines are
    copied into: planning them is most of the cost of a small poll.
    """

    def __init__(self, source: EventSource) -> None:
        self.source = source
        self.topic = source.kafka_topic
        self.con = duckdb.connect()
        self.con.execute("SET TimeZone = 'UTC'")
        self.con.execute("CREATE TABLE polled (line VARCHAR, _row BIGINT)")
        names = [c.name for c in source.all_columns()]
        # One parse of each line, every declared field at once.
        paths = ", ".join(f"'$.\"{c}\"'" for c in names)
        fields = ", ".join(f'_fields[{i + 1}] AS "{c}"' for i, c in enumerate(names))
        parsed_schema = pa.schema(
            [
                *[(c, pa.string()) for c in names],
                ("_row", pa.int64()),
                ("_malformed", pa.bool_()),
                ("_raw", pa.string()),
            ]
        )
        self.con.execute(
            f"PREPARE checks AS WITH parsed AS (SELECT {fields}, _row, NOT _valid AS _malformed, "
            "CASE WHEN NOT _valid THEN line END AS _raw "
            f"FROM (SELECT line, _row, _valid, CASE WHEN _valid THEN json_extract_string(line, [{paths}]) END AS _fields "
            "FROM (SELECT line, _row, CASE WHEN json_valid(line) THEN json_type(line) = 'OBJECT' ELSE false END "
            f"AS _valid FROM polled))), checked AS ({validation.check_query(source, parsed_schema, 'parsed', None)}) "
            f"SELECT *, CASE WHEN _code IS NULL THEN {digest_sql(source)} END AS _digest FROM checked ORDER BY _row"
        )

    def validate(
        self, records: dict[int, tuple[list[int], list[str]]], now: dt.datetime, run_id: str
    ) -> tuple[pa.Table, pa.Table, np.ndarray]:
        """``records``: partition -> (offsets, values as text). Returns (good, quarantine rows, digests).

        Good rows have the source's schema plus ``_partition`` and ``_offset``, in partition and
        offset order; quarantine rows have the quarantine table's schema; ``digests`` are the good
        rows' ``digest_sql``, computed here, off the worker's main thread.
        """
        rows = np.concatenate(
            [(np.int64(p) << _OFFSET_BITS) + np.asarray(offsets, np.int64) for p, (offsets, _) in records.items()]
        )
        lines = pa.table(
            {"line": pa.array([line for _, texts in records.values() for line in texts], pa.string()), "_row": rows}
        )
        # One statement: parse, type and check, in row order.
        self.con.execute("DELETE FROM polled")
        self.con.register("lines", lines)
        try:
            self.con.execute("INSERT INTO polled SELECT line, _row FROM lines")
        finally:
            self.con.unregister("lines")
        limit = validation.future_limit(self.source, now).isoformat()
        checked = self.con.sql(f"EXECUTE checks(TIMESTAMPTZ '{limit}', '{limit}')").to_arrow_table()
        ok = pc.is_null(checked["_code"])
        schema = self.source.arrow_schema()
        good = checked.filter(ok)
        bad = checked.filter(pc.invert(ok))
        good_rows = good["_row"].to_numpy()
        digests = good["_digest"].to_numpy()
        good = (
            good.select(schema.names)
            .cast(schema)
            .append_column(PARTITION, pa.array((good_rows >> _OFFSET_BITS).astype(np.int32)))
            .append_column(OFFSET, pa.array(good_rows & ((1 << _OFFSET_BITS) - 1)))
        )
        bad_rows = bad["_row"].to_numpy()
        dead = pa.table(
            {
                "file": [location(self.topic, int(p)) for p in bad_rows >> _OFFSET_BITS],
                "row_number": pa.array(bad_rows & ((1 << _OFFSET_BITS) - 1)),
                "reason_code": bad["_code"],
                "reason": bad["_reason"],
                "record": bad["_record"],
            }
        )
        return good, quarantine_rows(self.source.name, dead, run_id, now), digests

    def close(self) -> None:
        self.con.close()


def digest_sql(source: EventSource) -> str:
    """SQL hashing an event's declared columns, typed: equal digests, the same event sent again."""
    return "hash(" + ", ".join(f'"{c.name}"' for c in source.all_columns()) + ")"


def quarantine_rows(source: str, bad: pa.Table, run_id: str, now: dt.datetime) -> pa.Table:
    """Rows of the quarantine table from (file, row_number, reason_code, reason, record)."""
    n = bad.num_rows
    return pa.table(
        {
            "source": pa.array([source] * n, pa.string()),
            "file": bad["file"].cast(pa.string()),
            "row_number": bad["row_number"].cast(pa.int64()),
            "reason_code": bad["reason_code"].cast(pa.string()),
            "reason": bad["reason"].cast(pa.string()),
            "record": bad["record"].cast(pa.string()),
            "run_id": pa.array([run_id] * n, pa.string()),
            "quarantined_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
        },
        schema=QUARANTINE_SCHEMA,
    )


# Offsets in Iceberg -------------------------------------------------------------------------


def _parse(text: str | None, topic: str) -> Offsets | None:
    if not text:
        return None
    try:
        per_topic = json.loads(text).get(topic)
    except (ValueError, AttributeError):
        return None
    return None if per_topic is None else {int(p): int(o) for p, o in per_topic.items()}


def recorded_offsets(table: Table, topic: str) -> Offsets:
    """The next offset to read per partition of ``topic``, as the table records it (empty: none yet)."""
    found = _parse(table.properties.get(OFFSETS_PROPERTY), topic)
    if found is not None:
        return found
    # Tables written before the property existed, or whose properties were reset: main's newest snapshot with offsets.
    snap = table.current_snapshot()
    while snap is not None:
        props = snap.summary.additional_properties if snap.summary else {}
        found = _parse(props.get(OFFSETS_PROPERTY), topic)
        if found is not None:
            return found
        snap = table.snapshot_by_id(snap.parent_snapshot_id) if snap.parent_snapshot_id is not None else None
    return {}


def _without_retries(table: Table) -> Table:
    """A view of ``table`` whose commits fail on a concurrent update instead of being re-applied on top of it.

    pyiceberg re-applies an append to the new head after a conflict; the offsets this append
    was filtered by would then be stale. The setting lives in this view's copy of the
    metadata only: commits send changes, not the whole metadata.
    """
    meta = table.metadata
    view_meta = meta.model_copy(update={"properties": {**meta.properties, "commit.retry.num-retries": "0"}})
    return Table(
        identifier=table.name(),
        metadata=view_meta,
        metadata_location=table.metadata_location,
        io=table.io,
        catalog=table.catalog,
    )


@dataclass(frozen=True)
class AppendResult:
    rows: int
    skipped: int
    snapshot_id: int | None
    offsets: Offsets
    attempts: int


def append_exactly_once(
    lake: Lakehouse,
    source: EventSource,
    rows: pa.Table,
    next_offsets: Offsets,
    run_id: str,
    *,
    attempts: int = COMMIT_ATTEMPTS,
    removals: dict[dt.date, list[str]] | None = None,
) -> AppendResult:
    """Append ``rows`` (source columns + ``_partition``, ``_offset``) and advance the recorded offsets.

    Rows below the offsets the table already records are skipped (another worker, or this
    one before a crash, wrote them). ``removals`` are the landed copies of corrected events
    (event ids by the day they sit on): they are deleted in the same commit. On a concurrent
    commit the table is read again and the write retried.
    """
    topic = source.kafka_topic
    schema = source.arrow_schema()
    for attempt in range(1, attempts + 1):
        table = lake.table(source.table_name)
        recorded = recorded_offsets(table, topic)
        keep = _at_or_past(rows, recorded)
        data = rows.filter(keep) if keep is not None else rows
        merged = dict(recorded)
        for partition, offset in next_offsets.items():
            merged[partition] = max(offset, recorded.get(partition, 0))
        text = json.dumps({topic: {str(p): o for p, o in sorted(merged.items())}})
        days = days_of(data, source.timestamp)
        extra = {OFFSETS_PROPERTY: text}
        if removals:
            extra["keel.rows.replaced"] = str(sum(len(ids) for ids in removals.values()))
        props = lake.snapshot_properties(f"stream:{source.name}", days, run_id, **extra)
        try:
            with _without_retries(table).transaction() as tx:
                if removals:
                    tx.delete(_copies(source, removals), snapshot_properties=props)
                tx.append(data.select(schema.names).cast(schema), snapshot_properties=props)
                tx.set_properties({OFFSETS_PROPERTY: text})
        except CommitFailedException as exc:
            if attempt == attempts:
                raise
            log.info("%s: commit conflict (%s); reading the table again (attempt %d)", source.table_name, exc, attempt)
            time.sleep(min(0.05 * attempt, 0.5))
            continue
        head = lake.head(source.table_name)
        return AppendResult(data.num_rows, rows.num_rows - data.num_rows, head, merged, attempt)
    raise AssertionError("unreachable")


def _copies(source: EventSource, removals: dict[dt.date, list[str]]):
    """The rows holding these event ids on these days (each day's own ids only, so files of other days stay)."""
    parts = [
        And(day_filter(source.timestamp, [day]), In(source.event_id, ids)) for day, ids in sorted(removals.items())
    ]
    out = parts[0]
    for part in parts[1:]:
        out = Or(out, part)
    return out


def _at_or_past(rows: pa.Table, recorded: Offsets) -> pa.Array | None:
    if not recorded or rows.num_rows == 0:
        return None
    parts = rows[PARTITION].to_numpy()
    offsets = rows[OFFSET].to_numpy()
    known = np.array(sorted(recorded), dtype=np.int64)
    floor = np.array([recorded[p] for p in known], dtype=np.int64)
    idx = np.searchsorted(known, parts)
    idx_c = np.minimum(idx, len(known) - 1)
    hit = (idx < len(known)) & (known[idx_c] == parts)
    keep = ~hit | (offsets >= floor[idx_c])
    return None if keep.all() else pa.array(keep)


def write_dead_letters(
    lake: Lakehouse, source: EventSource, rows: pa.Table, spans: dict[int, tuple[int, int]], run_id: str
) -> int:
    """Replace the quarantine rows of these offset spans (partition -> (first, last)) with ``rows``.

    Idempotent: a replay after a crash rewrites the same rows in place of the earlier ones.
    """
    if not spans:
        return 0
    lake.ensure_table(QUARANTINE_TABLE, QUARANTINE_SCHEMA, identity_column="source")
    parts = [
        And(
            EqualTo("file", location(source.kafka_topic, p)),
            And(GreaterThanOrEqual("row_number", lo), LessThanOrEqual("row_number", hi)),
        )
        for p, (lo, hi) in sorted(spans.items())
    ]
    scope = parts[0]
    for part in parts[1:]:
        scope = Or(scope, part)
    scope = And(EqualTo("source", source.name), scope)
    props = lake.snapshot_properties(f"stream:{source.name}", [], run_id)
    lake.replace_on_main(QUARANTINE_TABLE, rows, scope, props)
    return rows.num_rows


# Kafka offsets and lag ------------------------------------------------------------------------


def end_offsets(bootstrap: str, partitions: Sequence, timeout: float = 5.0) -> dict:
    """The log end offset (high watermark) of each TopicPartition.

    Read from a fetch response, since some brokers (tansu 0.6) answer ListOffsets(latest)
    with the start of the last record batch plus one. The broker's answer is the floor.
    """
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, max_partition_fetch_bytes=1024, fetch_max_wait_ms=10
    )
    try:
        partitions = list(partitions)
        listed = consumer.end_offsets(partitions)
        consumer.assign(partitions)
        for tp in partitions:
            consumer.seek(tp, max(0, listed[tp] - 1))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(consumer.highwater(tp) is None for tp in partitions):
            consumer.poll(timeout_ms=50, update_offsets=False)
        return {tp: max(listed[tp], consumer.highwater(tp) or 0) for tp in partitions}
    finally:
        consumer.close(autocommit=False)


def topic_partitions(bootstrap: str, topics: Iterable[str]) -> list:
    from kafka import KafkaAdminClient, TopicPartition

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        out = []
        for desc in admin.describe_topics(list(topics)):
            if desc.get("error_code", 0) == 0:
                out += [TopicPartition(desc["name"], p["partition_index"]) for p in desc["partitions"]]
        return sorted(out)
    finally:
        admin.close()


def group_lag(bootstrap: str, group_id: str, topics: Iterable[str]) -> dict[tuple[str, int], dict[str, int | None]]:
    """Per (topic, partition): the log end offset, the group's committed offset (None: never) and the lag."""
    from kafka import KafkaAdminClient

    partitions = topic_partitions(bootstrap, topics)
    if not partitions:
        return {}
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        committed = admin.list_group_offsets({group_id: partitions}).get(group_id, {})
    finally:
        admin.close()
    ends = end_offsets(bootstrap, partitions)
    out = {}
    for tp in partitions:
        meta = committed.get(tp)
        position = meta.offset if meta is not None and meta.offset >= 0 else None
        out[(tp.topic, tp.partition)] = {
            "end": ends[tp],
            "committed": position,
            "lag": ends[tp] - (position or 0),
        }
    return out


def newest_event(lake: Lakehouse, source: EventSource) -> dt.datetime | None:
    """The latest event timestamp in a raw table (None when empty or missing), from data file statistics."""
    if not lake.exists(source.table_name):
        return None
    table = lake.table(source.table_name)
    snap = table.current_snapshot()
    # A new table's first snapshot is empty and has no manifests for inspect.files to read.
    if snap is None or not snap.manifests(table.io):
        return None
    files = table.inspect.files()
    if files.num_rows == 0:
        return None
    upper = pc.struct_field(pc.struct_field(files["readable_metrics"], source.timestamp), "upper_bound")
    best = pc.max(upper).as_py()
    if best is None:
        ts = lake.read(source.table_name, columns=[source.timestamp])[source.timestamp]
        best = pc.max(ts).as_py() if len(ts) else None
    return best.astimezone(dt.UTC) if best is not None else None
