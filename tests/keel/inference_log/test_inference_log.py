"""The inference log: the writer off the request path, its sinks, and the daily load through write-audit-publish."""

import dataclasses
import datetime as dt
import json
import re
import threading
import time
from pathlib import Path

import pytest

from keel.devservers import free_port
from keel.inference_log.loader import audit_inference_log, stage_inference_log, summarize
from keel.inference_log.records import TABLE, encode
from keel.inference_log.sinks import FileSink, KafkaSink, day_folder, log_root
from keel.inference_log.writer import InferenceLogWriter
from keel.ingest.batch import QUARANTINE_TABLE
from keel.lakehouse import wap
from keel.lakehouse.tables import day_filter
from tests.factories.inference_log import on_day, record

DAY = dt.date(2026, 3, 10)
MIDNIGHT = dt.datetime.combine(DAY + dt.timedelta(days=1), dt.time(), dt.UTC)


def wait_for(condition, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.005)


def files_of(root: Path) -> list[Path]:
    return sorted(root.rglob("*.jsonl"))


def logged_ids(root: Path) -> list[str]:
    return [json.loads(line)["log_id"] for path in files_of(root) for line in path.read_text().splitlines()]


class FlakySink(FileSink):
    """A file sink whose first ``failures`` writes raise, as a disk or broker hiccup would."""

    def __init__(self, root: Path, failures: int) -> None:
        super().__init__(root)
        self.failures = failures

    def write(self, batch) -> None:
        if self.failures:
            self.failures -= 1
            raise OSError("disk briefly unavailable")
        super().write(batch)


class GatedSink(FileSink):
    """A file sink whose writes wait until ``gate`` opens: a sink stuck on slow I/O."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def write(self, batch) -> None:
        self.entered.set()
        assert self.gate.wait(10)
        super().write(batch)


# Writer ---------------------------------------------------------------------------------------


def test_a_full_batch_is_written_without_waiting_for_the_interval(tmp_path):
    writer = InferenceLogWriter(FileSink(tmp_path), batch_size=10, flush_interval_s=3600)
    records = on_day(DAY, 15)
    for r in records[:10]:
        assert writer.log(r)
    wait_for(lambda: writer.counters.written == 10, what="the full batch written")
    for r in records[10:]:
        assert writer.log(r)
    assert writer.counters.pending == 5  # fewer than a batch wait for the interval (or close)
    counters = writer.close()
    assert (counters.logged, counters.written, counters.dropped, counters.pending) == (15, 15, 0, 0)
    assert sorted(len(p.read_text().splitlines()) for p in files_of(tmp_path)) == [5, 10]


def test_records_waiting_are_written_every_flush_interval(tmp_path):
    writer = InferenceLogWriter(FileSink(tmp_path), batch_size=500, flush_interval_s=0.05)
    for r in on_day(DAY, 3):
        writer.log(r)
    wait_for(lambda: writer.counters.written == 3, what="the interval's flush")
    writer.close()


def test_close_writes_everything_logged_from_many_threads(tmp_path):
    writer = InferenceLogWriter(FileSink(tmp_path), batch_size=64, flush_interval_s=3600)

    def serve(worker: int) -> None:
        for r in on_day(DAY, 300, start=worker * 1000):
            assert writer.log(r)

    threads = [threading.Thread(target=serve, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counters = writer.close()
    assert (counters.logged, counters.written, counters.dropped) == (1200, 1200, 0)
    ids = logged_ids(tmp_path)
    assert len(ids) == len(set(ids)) == 1200
    assert not writer.log(record(0, MIDNIGHT)) and writer.counters.dropped == 1


def test_a_sink_failing_twice_loses_nothing(tmp_path):
    sink = FlakySink(tmp_path, failures=2)
    writer = InferenceLogWriter(sink, batch_size=500, flush_interval_s=0.01, retry_initial_s=0.01)
    for r in on_day(DAY, 30):
        writer.log(r)
    assert writer.flush(10)
    counters = writer.close()
    assert (counters.written, counters.failed_flushes, counters.dropped) == (30, 2, 0)
    assert sorted(logged_ids(tmp_path)) == sorted(r.log_id for r in on_day(DAY, 30))


def test_a_full_buffer_drops_new_records_without_blocking_the_caller(tmp_path):
    sink = GatedSink(tmp_path)
    writer = InferenceLogWriter(sink, batch_size=5, flush_interval_s=0.01, max_buffered=10)
    first, rest = on_day(DAY, 5), on_day(DAY, 10, start=5)
    for r in first:
        writer.log(r)
    assert sink.entered.wait(10)  # the first batch is stuck in the sink
    accepted: list[bool] = []
    caller = threading.Thread(target=lambda: accepted.extend(writer.log(r) for r in rest))
    caller.start()
    caller.join(5)
    assert not caller.is_alive(), "log() blocked while the sink was stuck"
    assert accepted == [True] * 5 + [False] * 5
    assert (writer.counters.logged, writer.counters.dropped) == (10, 5)
    sink.gate.set()
    counters = writer.close()
    assert (counters.written, counters.dropped) == (10, 5)
    assert sorted(logged_ids(tmp_path)) == sorted(r.log_id for r in first + rest[:5])


def test_close_gives_up_on_a_sink_that_keeps_failing(tmp_path):
    writer = InferenceLogWriter(FlakySink(tmp_path, failures=10**9), flush_interval_s=0.01, retry_initial_s=0.01)
    for r in on_day(DAY, 7):
        writer.log(r)
    wait_for(lambda: writer.counters.failed_flushes >= 2, what="retries")
    counters = writer.close(timeout_s=0.2)
    assert (counters.written, counters.dropped, counters.pending) == (0, 7, 0)


def test_a_record_that_is_not_json_is_counted_and_the_rest_written(tmp_path):
    writer = InferenceLogWriter(FileSink(tmp_path), flush_interval_s=0.01)
    writer.log(record(1, MIDNIGHT, version=None))  # int(None) fails on the writer's thread, not the caller's
    writer.log(record(2, MIDNIGHT, prediction=float("nan"), features={"x": float("inf")}))
    counters = writer.close()
    assert (counters.logged, counters.written, counters.rejected) == (2, 1, 1)
    (line,) = [json.loads(x) for p in files_of(tmp_path) for x in p.read_text().splitlines()]
    assert line["prediction"] is None and line["features"] == {"x": None}


def test_a_mapping_of_the_fields_is_logged_like_the_record(tmp_path):
    writer = InferenceLogWriter(FileSink(tmp_path), flush_interval_s=0.01)
    r = record(5, MIDNIGHT, shadow=True, alias="challenger")
    as_dict = {f.name: getattr(r, f.name) for f in dataclasses.fields(r)}
    assert writer.log(as_dict) and writer.log({**as_dict, "request_id": "req-6", "colour": "blue"})
    counters = writer.close()
    assert (counters.written, counters.rejected) == (1, 1)  # an unknown field is refused, not guessed at
    (path,) = files_of(tmp_path)
    assert path.read_bytes() == encode(r).value + b"\n"


def test_encoding_keeps_feature_order_and_stamps_utc():
    paris = dt.timezone(dt.timedelta(hours=1))
    r = record(7, dt.datetime(2026, 3, 11, 0, 30, tzinfo=paris), shadow=True, alias="challenger")
    encoded = encode(r)
    body = json.loads(encoded.value)
    assert list(body["features"]) == ["txn_count_7d", "spend_ratio", "country", "is_new"]
    assert body["ts"] == "2026-03-10T23:30:00+00:00" and encoded.day == DAY
    assert body["log_id"] == r.log_id == "req-7:churn:challenger:shadow"
    assert encoded.key == b"u2" and encoded.ts_ms == int(r.ts.timestamp() * 1000)


# File sink ------------------------------------------------------------------------------------


def test_file_sink_splits_a_batch_at_midnight_into_whole_files(tmp_path):
    sink = FileSink(tmp_path)
    before = record(1, MIDNIGHT - dt.timedelta(milliseconds=100))
    after = record(2, MIDNIGHT + dt.timedelta(milliseconds=100))
    sink.write([encode(before), encode(after)])
    first, second = files_of(tmp_path)
    assert first.parent == day_folder(tmp_path, DAY) and second.parent == day_folder(tmp_path, DAY.replace(day=11))
    assert [json.loads(first.read_text())["log_id"], json.loads(second.read_text())["log_id"]] == [
        before.log_id,
        after.log_id,
    ]
    assert re.fullmatch(r"[\w.\-]+-\d+-[0-9a-f]+-000001\.jsonl", first.name)
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]


def test_file_sink_shows_no_file_of_a_batch_that_failed(tmp_path):
    (tmp_path / "day=2026-03-11").write_text("a file where the next day's folder should be")
    sink = FileSink(tmp_path)
    with pytest.raises(OSError):
        sink.write([encode(record(1, MIDNIGHT - dt.timedelta(seconds=1))), encode(record(2, MIDNIGHT))])
    assert list(day_folder(tmp_path, DAY).iterdir()) == []  # neither the first day's file nor its temporary


# Loading --------------------------------------------------------------------------------------


def write_days(settings, records) -> None:
    writer = InferenceLogWriter.from_settings(settings, flush_interval_s=0.01)
    for r in records:
        writer.log(r)
    assert writer.close().written == len(records)


def load(lake, settings, days, run_id, **options):
    loaded = stage_inference_log(lake, settings, days, run_id, **options)
    report = audit_inference_log(lake, loaded.staged)
    return loaded, report


def test_a_day_loads_audits_publishes_and_reloads_to_the_same_rows(lake, settings):
    records = on_day(DAY, 40) + on_day(DAY, 5, start=100, alias="challenger", shadow=True)
    write_days(settings, records + on_day(DAY.replace(day=11), 3, start=200))
    loaded, report = load(lake, settings, [DAY], "load-1")
    assert report.success, report.summary()
    assert loaded.rows_per_day == {DAY: 45} and loaded.duplicates == 0 and loaded.bad_records == {}
    wap.publish(lake, loaded.staged)
    first = lake.read(TABLE).sort_by("log_id")
    assert first.column_names[0] == "log_id" and sorted(first.column("log_id").to_pylist()) == sorted(
        r.log_id for r in records
    )
    row = next(r for r in first.to_pylist() if r["log_id"] == "req-101:churn:challenger:shadow")
    assert json.loads(row["features"]) == {"txn_count_7d": 101, "spend_ratio": 50.5, "country": "FR", "is_new": None}
    assert list(json.loads(row["features"])) == ["txn_count_7d", "spend_ratio", "country", "is_new"]
    assert (row["version"], row["shadow"], row["entity_id"], json.loads(row["missing_features"])) == (
        3,
        True,
        "u1",
        ["is_new"],
    )

    again, report = load(lake, settings, [DAY], "load-2")
    assert report.success
    wap.publish(lake, again.staged)
    assert lake.read(TABLE).sort_by("log_id").equals(first)
    assert lake.partition_rows(TABLE) == {DAY: 45}

    summary = summarize(first)
    assert [(r["alias"], r["shadow"], r["rows"]) for r in summary.per_model] == [
        ("challenger", True, 5),
        ("champion", False, 40),
    ]
    assert summary.latency_ms["p50"] <= summary.latency_ms["p95"] <= summary.latency_ms["p99"] <= 10
    assert summary.degraded_share == pytest.approx(sum(r.degraded for r in records) / 45)


def test_a_retried_batch_is_kept_once_and_a_reused_request_id_fails_the_audit(lake, settings):
    sink = FileSink(log_root(settings))
    batch = [encode(r) for r in on_day(DAY, 12)]
    sink.write(batch)
    sink.write(batch)  # the sink wrote, but the writer saw an error and wrote the batch again
    loaded, report = load(lake, settings, [DAY], "dupes")
    assert loaded.rows_per_day == {DAY: 12} and loaded.duplicates == 12
    assert report.success

    sink.write([encode(record(3, MIDNIGHT - dt.timedelta(hours=1), prediction=0.99))])  # same log_id, other answer
    loaded, report = load(lake, settings, [DAY], "clash")
    assert loaded.rows_per_day == {DAY: 13}
    (failure,) = report.failures
    assert failure.expectation == "expect_column_values_to_be_unique" and failure.column == "log_id"
    assert failure.sample == ["req-3:churn:champion"]


def test_unreadable_records_are_quarantined_once_with_their_place(lake, settings):
    write_days(settings, on_day(DAY, 4))
    folder = day_folder(log_root(settings), DAY)
    good = json.loads(encode(record(9, MIDNIGHT - dt.timedelta(minutes=1))).value)
    lines = [
        "{not json",
        json.dumps({k: v for k, v in good.items() if k != "latency_ms"}),
        json.dumps({**good, "version": "three"}),
        json.dumps({**good, "ts": "yesterday"}),
        json.dumps({**good, "ts": "2026-03-12T08:00:00+00:00"}),
    ]
    (folder / "hand-written.jsonl").write_text("\n".join(lines) + "\n")
    (folder / ".half-written.jsonl.tmp").write_text('{"request_id": "partial')
    for run in ("bad-1", "bad-2"):
        loaded, report = load(lake, settings, [DAY], run)
        assert loaded.rows_per_day == {DAY: 4}
        assert loaded.bad_records == {
            "bad_timestamp": 1,
            "malformed_record": 1,
            "missing_value": 1,
            "wrong_day": 1,
            "wrong_type": 1,
        }
    assert report.success
    quarantine = lake.read(QUARANTINE_TABLE).sort_by("row_number").to_pylist()
    assert [(Path(q["file"]).name, q["row_number"], q["source"]) for q in quarantine] == [
        ("hand-written.jsonl", n, "inference_log") for n in range(1, 6)
    ]
    assert quarantine[1]["reason"] == "missing latency_ms"
    assert quarantine[2]["reason"] == 'version: "three" is not an integer'
    assert "is not on the day of its folder, 2026-03-10" in quarantine[4]["reason"]
    assert quarantine[0]["record"] == "{not json" and quarantine[0]["run_id"] == "bad-2"


def test_an_empty_day_is_staged_empty_and_fails_the_audit_unless_allowed(lake, settings):
    write_days(settings, on_day(DAY, 6))
    loaded = stage_inference_log(lake, settings, [DAY, DAY.replace(day=11)], "gap")
    assert loaded.rows_per_day == {DAY: 6, DAY.replace(day=11): 0} and loaded.staged.rows == 6
    (failure,) = audit_inference_log(lake, loaded.staged).failures
    assert failure.expectation == "expect_each_day_to_have_rows" and failure.sample == ["2026-03-11"]
    assert "rerun with allow_empty_days" in failure.detail
    assert audit_inference_log(lake, loaded.staged, allow_empty_days=True).success

    quiet = stage_inference_log(lake, settings, [DAY.replace(day=12)], "quiet")
    assert quiet.staged.rows == 0
    report = audit_inference_log(lake, quiet.staged)
    assert {o.expectation for o in report.failures} == {
        "expect_table_row_count_to_be_between",
        "expect_each_day_to_have_rows",
    }
    assert audit_inference_log(lake, quiet.staged, allow_empty_days=True).success


def test_the_audit_checks_roles_versions_latency_and_rows_against_recent_days(lake, settings):
    days = [DAY + dt.timedelta(days=i) for i in range(4)]
    for i, day in enumerate(days[:3]):
        write_days(settings, on_day(day, 30, start=1000 * i))
    loaded, report = load(lake, settings, days[:3], "history")
    assert report.success
    wap.publish(lake, loaded.staged)

    write_days(
        settings,
        [
            record(1, dt.datetime.combine(days[3], dt.time(1), dt.UTC), alias="canary"),
            record(2, dt.datetime.combine(days[3], dt.time(2), dt.UTC), version=0, latency_ms=-1.0),
        ],
    )
    _, report = load(lake, settings, days[3:], "odd-day")
    failed = {(o.expectation, o.column): o.sample for o in report.failures}
    assert failed == {
        ("expect_column_values_to_be_in_set", "alias"): ["canary"],
        ("expect_column_values_to_be_between", "version"): [0],
        ("expect_column_values_to_be_between", "latency_ms"): [-1.0],
        ("expect_daily_row_count_to_be_between", "ts"): [{"day": days[3].isoformat(), "rows": 2}],
    }


# Kafka ----------------------------------------------------------------------------------------


def test_kafka_sink_and_loader_read_exactly_the_day(lake, settings, kafka_topics):
    from kafka import KafkaProducer

    topic = "test.inference_log"
    bootstrap = kafka_topics({topic: 3})
    kafka_settings = dataclasses.replace(settings, kafka_bootstrap=bootstrap)
    eve = [record(i, MIDNIGHT - dt.timedelta(minutes=30) + dt.timedelta(minutes=2 * i)) for i in range(30)]
    writer = InferenceLogWriter.from_settings(kafka_settings, topic=topic, flush_interval_s=0.01)
    assert isinstance(writer.sink, KafkaSink)
    for r in eve:
        writer.log(r)
    assert writer.close().written == 30
    again = KafkaSink(bootstrap, topic)
    again.write([encode(r) for r in eve[:4]])  # a batch written again after a lost acknowledgement
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    bad_ts = int((MIDNIGHT - dt.timedelta(minutes=5)).timestamp() * 1000)
    producer.send(topic, key=b"u1", value=b"{truncated", timestamp_ms=bad_ts).get(10)
    producer.close()
    noon = [record(i, MIDNIGHT + dt.timedelta(hours=12, seconds=i)) for i in range(50, 55)]
    again.write([encode(r) for r in noon])
    again.close()
    FileSink(log_root(settings)).write([encode(record(99, MIDNIGHT - dt.timedelta(hours=3)))])  # logged before Kafka

    loaded, report = load(lake, kafka_settings, [DAY], "kafka-1", topic=topic)
    ids = sorted(r.log_id for r in eve[:15]) + ["req-99:churn:champion"]
    assert sorted(lake.read(TABLE, snapshot_id=loaded.staged.snapshot_id).column("log_id").to_pylist()) == sorted(ids)
    assert loaded.duplicates == 4 and loaded.bad_records == {"malformed_record": 1} and loaded.files == 1
    assert loaded.kafka_records == 35  # each partition is read up to its first record an hour past the day
    assert report.success, report.summary()
    wap.publish(lake, loaded.staged)
    (bad,) = lake.read(QUARANTINE_TABLE).to_pylist()
    assert bad["file"].startswith(f"kafka://{topic}/") and bad["record"] == "{truncated"

    again, _ = load(lake, kafka_settings, [DAY], "kafka-2", topic=topic)
    assert again.rows_per_day == {DAY: 16} and again.duplicates == 4
    next_day, _ = load(lake, kafka_settings, [DAY.replace(day=11)], "kafka-3", topic=topic)
    next_rows = lake.read(
        TABLE, snapshot_id=next_day.staged.snapshot_id, row_filter=day_filter("ts", next_day.staged.days)
    )
    assert sorted(next_rows.column("log_id").to_pylist()) == sorted(r.log_id for r in eve[15:] + noon)
    assert next_day.bad_records == {}  # the truncated record is the first day's, reported once
    assert lake.read(QUARANTINE_TABLE).num_rows == 1


def test_records_that_reach_the_topic_days_late_load_on_their_own_day(lake, settings, kafka_topics):
    """A replayed backtest (or a server that held its batch through an outage) writes old days
    after newer traffic: each record still lands on the day of its ts, read in one pass."""
    topic = "test.inference_log_late"
    bootstrap = kafka_topics({topic: 2})
    kafka_settings = dataclasses.replace(settings, kafka_bootstrap=bootstrap)
    sink = KafkaSink(bootstrap, topic)
    live = [record(i, MIDNIGHT + dt.timedelta(hours=12, seconds=i)) for i in range(5)]
    sink.write([encode(r) for r in live])
    days = [DAY - dt.timedelta(days=2), DAY - dt.timedelta(days=1), DAY]
    late = {
        day: [
            record(100 * (k + 1) + i, dt.datetime.combine(day, dt.time(6), dt.UTC) + dt.timedelta(minutes=i))
            for i in range(4)
        ]
        for k, day in enumerate(days)
    }
    for day in days:
        sink.write([encode(r) for r in late[day]])
    sink.close()

    loaded, report = load(lake, kafka_settings, days, "late-1", topic=topic)
    assert loaded.rows_per_day == dict.fromkeys(days, 4) and report.success, report.summary()
    # Only the records stamped within an hour of the three days were kept: not the live ones.
    assert loaded.kafka_records == 12
    rows = lake.read(TABLE, snapshot_id=loaded.staged.snapshot_id, row_filter=day_filter("ts", days))
    assert sorted(rows.column("log_id").to_pylist()) == sorted(r.log_id for rs in late.values() for r in rs)
    one, _ = load(lake, kafka_settings, [days[0]], "late-2", topic=topic)
    assert one.rows_per_day == {days[0]: 4} and one.kafka_records == 4


class ThreadRecordingSink(KafkaSink):
    """A Kafka sink that records the threads its writes run on."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.threads: set[threading.Thread] = set()

    def write(self, batch) -> None:
        self.threads.add(threading.current_thread())
        super().write(batch)


def test_a_broker_that_is_down_neither_blocks_logging_nor_holds_up_close(tmp_path):
    sink = ThreadRecordingSink(f"127.0.0.1:{free_port()}", timeout_s=1.0)
    writer = InferenceLogWriter(sink, flush_interval_s=0.01)
    assert all(writer.log(r) for r in on_day(DAY, 3))
    wait_for(lambda: writer.counters.failed_flushes >= 1, what="a failed write to the broker")
    # Only the writer's thread waits on the broker, never the caller of log().
    assert sink.threads and threading.current_thread() not in sink.threads
    # close() gives up on the broker at its deadline: the records are counted dropped, none pending.
    counters = writer.close(timeout_s=0.5)
    assert (counters.written, counters.dropped, counters.pending) == (0, 3, 0)


def test_loading_from_a_topic_nobody_wrote_to_says_so(lake, settings, kafka_bootstrap):
    kafka_settings = dataclasses.replace(settings, kafka_bootstrap=kafka_bootstrap)
    loaded = stage_inference_log(lake, kafka_settings, [DAY], "no-topic", topic="test.never_written")
    assert loaded.rows_per_day == {DAY: 0} and loaded.kafka_records == 0
    assert loaded.notes == [
        f"topic 'test.never_written' does not exist on {kafka_bootstrap}: nothing was logged to Kafka"
    ]
