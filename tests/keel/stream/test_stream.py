"""The stream worker against a real broker: exactly once into Iceberg, dead letters with reasons, drains on stop."""

import dataclasses
import datetime as dt
import json
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from kafka import KafkaAdminClient, KafkaProducer, TopicPartition

from keel.cli.main import main
from keel.config import ConfigError, Settings
from keel.ingest.batch import QUARANTINE_TABLE
from keel.lakehouse.tables import Lakehouse
from keel.online.store import OnlineStore, Record
from keel.stream.kafka_io import (
    OFFSET,
    OFFSETS_PROPERTY,
    PARTITION,
    EventValidator,
    append_exactly_once,
    recorded_offsets,
)
from keel.stream.producer import EventMaker, EventProducer
from keel.stream.resent import row_digests
from keel.stream.worker import StreamWorker
from keel.stream.worker_config import StreamConfig, StreamError
from pipelines import project
from tests.factories.stream import SOURCES, TOPICS, produced, valid_messages
from tests.factories.timing import wait_for


@pytest.fixture
def stream_env(keel_home, kafka_topics, monkeypatch):
    bootstrap = kafka_topics(TOPICS)
    monkeypatch.setenv("KEEL_KAFKA_BOOTSTRAP", bootstrap)
    return bootstrap


def config(**kw) -> StreamConfig:
    base = {
        "group_id": f"test-{time.monotonic_ns()}",
        "batch_seconds": 0.5,
        "metrics_port": 0,
        "session_timeout_ms": 1000,
        "online": False,
    }
    return StreamConfig(**{**base, **kw})


class Running:
    """A worker running in a thread until ``stop()``."""

    def __init__(self, worker: StreamWorker) -> None:
        self.worker = worker
        self.ready = threading.Event()
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(20) or self.error, "worker did not get its partitions"

    def _run(self):
        try:
            self.worker.run(ready=self.ready)
        except BaseException as exc:  # surfaced by stop()
            self.error = exc
            self.ready.set()

    def stop(self):
        self.worker.stop()
        self.thread.join(30)
        assert not self.thread.is_alive()
        if self.error:
            raise self.error


def raw_rows(lake: Lakehouse, source) -> int:
    return lake.read(source.table_name, columns=[source.timestamp]).num_rows


def test_events_land_once_bad_ones_in_quarantine_offsets_committed(stream_env, capsys):
    bootstrap = stream_env
    settings = Settings.from_env()
    with EventProducer(bootstrap, project.sources, users=30, seed=3, bad_every=25) as producer:
        report = producer.produce(300)
        producer.producer.flush()
    cfg = config()
    run = Running(StreamWorker(settings, project, cfg))
    lake = Lakehouse.from_settings(settings)
    valid = report.total - report.bad
    wait_for(lambda: sum(raw_rows(lake, s) for s in SOURCES.values()) >= valid, what="all valid events in Iceberg")
    # More events while running: a second batch lands too.
    with EventProducer(bootstrap, project.sources, users=30, seed=4) as producer:
        report2 = producer.produce(100)
    wait_for(lambda: sum(raw_rows(lake, s) for s in SOURCES.values()) >= valid + report2.total, what="second batch")
    run.stop()

    messages = produced(bootstrap)
    for topic, source in SOURCES.items():
        table = lake.read(source.table_name)
        ids = table["event_id"].to_pylist()
        assert len(ids) == len(set(ids)), f"{source.name}: duplicate rows"
        assert set(ids) == valid_messages(messages)[topic]
        # The table records where to start each partition: its end.
        lake_table = lake.table(source.table_name)
        ends = {p: sum(1 for m in messages[topic] if m["partition"] == p) for p in range(TOPICS[topic])}
        assert recorded_offsets(lake_table, topic) == {p: n for p, n in ends.items() if n}
        head = lake_table.current_snapshot().summary.additional_properties
        assert json.loads(head[OFFSETS_PROPERTY])[topic] == {str(p): n for p, n in ends.items() if n}
        assert head["keel.source"] == f"stream:{source.name}"
        assert pc.min(table["event_ts"]).as_py() > dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)

    quarantine = lake.read(QUARANTINE_TABLE).sort_by([("file", "ascending"), ("row_number", "ascending")])
    assert quarantine.num_rows == report.bad
    codes = sorted(quarantine["reason_code"].to_pylist())
    assert set(codes) == {"malformed_record", "missing_key", "wrong_type", "bad_timestamp"}
    for row in quarantine.to_pylist():
        topic = row["file"].removeprefix("kafka://").rsplit("/", 1)[0]
        partition = int(row["file"].rsplit("/", 1)[1])
        message = next(m for m in messages[topic] if m["partition"] == partition and m["offset"] == row["row_number"])
        assert row["source"] == SOURCES[topic].name
        assert row["reason"]
        if row["reason_code"] == "malformed_record":
            assert message["event"] is None and row["record"] == '{"not json": '
    # `keel quarantine` names the partition in full, with the offset as the row.
    first = quarantine.slice(0, 1).to_pylist()[0]
    assert main(["quarantine", "--limit", "1"]) == 0
    assert f"{first['file']}:{first['row_number']}  [{first['reason_code']}]" in capsys.readouterr().out

    # Kafka holds the same offsets, committed after the appends.
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    committed = admin.list_group_offsets({cfg.group_id: None})[cfg.group_id]
    admin.close()
    for topic in TOPICS:
        for p in range(TOPICS[topic]):
            n = sum(1 for m in messages[topic] if m["partition"] == p)
            if n:
                assert committed[TopicPartition(topic, p)].offset == n


def transaction(event_id: str, ts: dt.datetime, amount: float) -> dict:
    return {
        "event_id": event_id,
        "user_id": "u00001",
        "event_ts": ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "amount": amount,
        "currency": "EUR",
        "country": "DE",
        "merchant_category": "books",
        "is_refund": False,
    }


def send(bootstrap: str, *events: dict) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for event in events:
        producer.send("shop.transactions", key=b"u00001", value=json.dumps(event).encode())
    producer.flush()
    producer.close()


def test_a_resent_event_changes_nothing_and_a_correction_replaces_its_landed_copy(stream_env):
    """The rule a batch ingest applies (keel.ingest.resent), on the stream: one copy of every event id."""
    bootstrap = stream_env
    settings = Settings.from_env()
    now = dt.datetime.now(dt.UTC)
    first = transaction("t-dup-1", now - dt.timedelta(hours=1), 12.5)
    send(bootstrap, first)
    run = Running(StreamWorker(settings, project, config(online=True)))
    lake = Lakehouse.from_settings(settings)
    source = SOURCES["shop.transactions"]
    wait_for(lambda: raw_rows(lake, source) == 1, what="the first copy in Iceberg")

    # The same event again, in a later poll and twice in one poll: nothing changes, nothing is refused.
    send(bootstrap, first, first, first)
    wait_for(lambda: run.worker.counts["unchanged"] == 3, what="3 re-sends counted unchanged")
    # A correction: another amount, a day earlier. It replaces the landed copy, in Iceberg and online.
    corrected = transaction("t-dup-1", now - dt.timedelta(days=1, hours=1), 40.0)
    send(bootstrap, corrected)
    wait_for(lambda: lake.read(source.table_name)["amount"].to_pylist() == [40.0], what="the correction in Iceberg")
    group = project.group("user_transactions")
    online = OnlineStore.from_settings(settings)
    wait_for(
        lambda: (online.read([(group, ["amount_sum_7d"])], ["u00001"])[0][0] or Record(0, [None])).values == [40.0],
        what="the corrected value online",
    )
    online.close()
    run.stop()

    rows = lake.read(source.table_name).to_pylist()
    assert len(rows) == 1 and rows[0]["event_ts"].date() == (now - dt.timedelta(days=1, hours=1)).date()
    assert run.worker.counts["replaced"] == 1
    assert lake.table(source.table_name).current_snapshot().summary.additional_properties["keel.rows.replaced"] == "1"
    assert not lake.exists(QUARANTINE_TABLE) or lake.read(QUARANTINE_TABLE).num_rows == 0


def test_with_on_duplicate_quarantine_a_changed_resend_is_dead_lettered_pointing_at_the_first(stream_env):
    bootstrap = stream_env
    settings = Settings.from_env()
    strict = dataclasses.replace(project.source("transactions"), on_duplicate="quarantine")
    strict_project = dataclasses.replace(
        project, sources=tuple(strict if s.name == "transactions" else s for s in project.sources), feature_groups=()
    )
    now = dt.datetime.now(dt.UTC)
    first = transaction("t-dup-2", now - dt.timedelta(hours=1), 12.5)
    send(bootstrap, first)
    run = Running(StreamWorker(settings, strict_project, config(sources=("transactions",))))
    lake = Lakehouse.from_settings(settings)
    wait_for(lambda: raw_rows(lake, strict) == 1, what="the first copy in Iceberg")
    send(bootstrap, first, {**first, "amount": 13.0}, {**first, "amount": 14.0})
    wait_for(lambda: lake.exists(QUARANTINE_TABLE) and lake.read(QUARANTINE_TABLE).num_rows == 2, what="2 dead letters")
    run.stop()

    assert lake.read(strict.table_name)["amount"].to_pylist() == [12.5]
    assert run.worker.counts["unchanged"] == 1
    rows = lake.read(QUARANTINE_TABLE).sort_by("row_number").to_pylist()
    assert [r["reason_code"] for r in rows] == ["duplicate_event_id"] * 2
    assert [r["row_number"] for r in rows] == [2, 3]
    where = f"{rows[0]['file']} row 0"
    assert all(
        r["reason"]
        == f'event_id "t-dup-2" arrived earlier with other values at {where}, {now - dt.timedelta(hours=1):%Y-%m-%d} '
        "(on_duplicate='quarantine'; declare on_duplicate='replace' to take re-sent events as corrections)"
        for r in rows
    )
    assert json.loads(rows[0]["record"])["amount"] == "13.0"


def offsets_rows(source, n: int, partition: int, first: int) -> pa.Table:
    now = dt.datetime.now(dt.UTC)
    rows = [
        {
            "event_id": f"e{partition}-{first + i}",
            "user_id": f"u{i % 3:05d}",
            "event_ts": now,
            "amount": 1.0 + i,
            "currency": "EUR",
            "country": "DE",
            "merchant_category": "books",
            "is_refund": False,
        }
        for i in range(n)
    ]
    table = pa.Table.from_pylist(rows, schema=source.arrow_schema())
    return table.append_column(PARTITION, pa.array([partition] * n, pa.int32())).append_column(
        OFFSET, pa.array(range(first, first + n), pa.int64())
    )


def test_appends_skip_what_the_table_already_records_and_survive_compaction(lake):
    source = SOURCES["shop.transactions"]
    lake.ensure_table(source.table_name, source.arrow_schema(), day_column=source.timestamp)
    first = append_exactly_once(lake, source, offsets_rows(source, 5, 0, 0), {0: 5}, "run-a")
    assert (first.rows, first.skipped, first.offsets) == (5, 0, {0: 5})
    # A replay of offsets 3..7 of partition 0 with partition 1 new: only 5..7 and partition 1 land.
    replay = pa.concat_tables([offsets_rows(source, 5, 0, 3), offsets_rows(source, 2, 1, 0)])
    second = append_exactly_once(lake, source, replay, {0: 8, 1: 2}, "run-b")
    assert (second.rows, second.skipped, second.offsets) == (5, 2, {0: 8, 1: 2})
    ids = lake.read(source.table_name)["event_id"].to_pylist()
    assert sorted(ids) == sorted([f"e0-{i}" for i in range(8)] + ["e1-0", "e1-1"])
    # Compaction writes a snapshot without offsets; the table property still has them.
    lake.compact(source.table_name, day_column=source.timestamp, run_id="compact", min_files=2)
    table = lake.table(source.table_name)
    assert OFFSETS_PROPERTY not in table.current_snapshot().summary.additional_properties
    assert recorded_offsets(table, source.kafka_topic) == {0: 8, 1: 2}


@pytest.mark.parametrize("topic", sorted(SOURCES))
def test_the_digests_checked_in_a_poll_equal_those_of_the_same_events_read_back_from_iceberg(lake, topic):
    """A re-sent event is told from its landed copy (after a restart) by equal digests: the
    validator computes them on the text it parsed, the worker's warm-up on the table's rows."""
    source = SOURCES[topic]
    now = dt.datetime.now(dt.UTC)
    events = EventMaker(source, 50, np.random.default_rng(3), "digest").batch(200, now - dt.timedelta(hours=1))
    lines = [json.dumps(event) for _, event in events]
    validator = EventValidator(source)
    good, bad, digests = validator.validate({0: (list(range(len(lines))), lines)}, now, "run")
    validator.close()
    assert bad.num_rows == 0 and len(set(digests.tolist())) == len(lines)
    lake.ensure_table(source.table_name, source.arrow_schema(), day_column=source.timestamp)
    append_exactly_once(lake, source, good, {0: len(lines)}, "run")
    landed = lake.read(source.table_name)
    by_id = dict(zip(landed[source.event_id].to_pylist(), row_digests(source, landed).tolist(), strict=True))
    assert [by_id[event_id] for event_id in good[source.event_id].to_pylist()] == digests.tolist()
    # One changed value changes the digest.
    changed = good.slice(0, 1).set_column(
        good.schema.get_field_index(source.timestamp),
        source.timestamp,
        pc.add(good.slice(0, 1)[source.timestamp], pa.scalar(dt.timedelta(microseconds=1))),
    )
    assert row_digests(source, changed).tolist() != digests[:1].tolist()


def test_a_concurrent_writer_of_the_same_offsets_wins_and_the_retry_skips_its_rows(lake, monkeypatch):
    source = SOURCES["shop.transactions"]
    lake.ensure_table(source.table_name, source.arrow_schema(), day_column=source.timestamp)
    rows = offsets_rows(source, 4, 0, 0)
    stale = lake.table(source.table_name)
    # Another worker (a zombie after a rebalance) appends the same offsets between our read and our commit.
    append_exactly_once(lake, source, rows, {0: 4}, "other")
    calls = []
    real_table = lake.table

    def table_then_fresh(name):
        calls.append(name)
        return stale if len(calls) == 1 else real_table(name)

    monkeypatch.setattr(lake, "table", table_then_fresh)
    result = append_exactly_once(lake, source, rows, {0: 4}, "ours")
    assert (result.rows, result.skipped, result.attempts) == (0, 4, 2)
    monkeypatch.undo()
    assert lake.read(source.table_name).num_rows == 4


def test_bad_settings_name_the_variable_or_the_source(keel_home, monkeypatch, capsys):
    with pytest.raises(ConfigError, match="KEEL_KAFKA_BOOTSTRAP is not set"):
        StreamWorker(Settings.from_env(), project, config())
    assert main(["stream"]) == 2
    assert "export KEEL_KAFKA_BOOTSTRAP=host:9092" in capsys.readouterr().err
    monkeypatch.setenv("KEEL_KAFKA_BOOTSTRAP", "127.0.0.1:9")
    with pytest.raises(StreamError, match=r"sources \['churn_labels'\] have no kafka_topic"):
        StreamWorker(Settings.from_env(), project, config(sources=("churn_labels",)))
    with pytest.raises(StreamError, match="batch_seconds=0 must be positive"):
        StreamWorker(Settings.from_env(), project, config(batch_seconds=0))
