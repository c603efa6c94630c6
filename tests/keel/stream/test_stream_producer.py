"""``keel generate --to-kafka``: the demo's events, in real time, keyed by entity, valid unless asked otherwise."""

import datetime as dt
import json
import re
import time

import pytest
from kafka import KafkaConsumer

from keel.cli.main import main as cli
from keel.stream.producer import BAD_KINDS, EventProducer, ProducerError
from pipelines.sources import SOURCES
from tests.factories.timing import Waits

TOPICS = {s.kafka_topic: 2 for s in SOURCES if s.kafka_topic}


def consume_all(bootstrap: str, topics, expected: int, timeout: float = 15.0) -> list:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    consumer.subscribe(list(topics))
    records, deadline = [], time.monotonic() + timeout
    while len(records) < expected and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=200).values():
            records += batch
    consumer.close()
    return records


def test_events_are_valid_json_keyed_by_user_at_the_rate(kafka_topics):
    bootstrap = kafka_topics(TOPICS)
    # The producer paces by an injected clock that only its sleeps advance: the count is the
    # rate's, whatever the machine's speed.
    waits = Waits()
    start = dt.datetime.now(dt.UTC)
    with EventProducer(bootstrap, SOURCES, users=50, seed=1) as producer:
        report = producer.run(rate=400, seconds=1.0, clock=waits.clock, sleep=waits.sleep)
    end = dt.datetime.now(dt.UTC)
    assert report.total == 400, report.summary()
    assert 1.0 <= report.seconds < 1.0 + max(waits.waits)
    assert report.bad == 0
    records = consume_all(bootstrap, TOPICS, report.total)
    assert len(records) == report.total
    by_topic = {s.kafka_topic: s for s in SOURCES if s.kafka_topic}
    ids = set()
    for record in records:
        source = by_topic[record.topic]
        event = json.loads(record.value)
        assert set(event) == {c.name for c in source.all_columns()}
        assert record.key.decode() == event["user_id"]
        assert event["user_id"][0] == "u" and len(event["user_id"]) == 6
        ts = dt.datetime.fromisoformat(event["event_ts"])
        assert start - dt.timedelta(seconds=1) <= ts <= end
        assert event["event_ts"].endswith("Z") and len(event["event_ts"].split(".")[1]) == 7
        for col in source.columns:
            value = event[col.name]
            if value is None:
                assert col.nullable
            elif col.allowed:
                assert value in col.allowed
            elif col.min is not None:
                assert col.min <= value <= col.max
        ids.add(event["event_id"])
    assert len(ids) == len(records)
    # One user's events of a topic all sit on one partition.
    partitions = {}
    for record in records:
        partitions.setdefault((record.topic, record.key), set()).add(record.partition)
    assert all(len(p) == 1 for p in partitions.values())
    assert {r.topic for r in records} == set(TOPICS)


def test_bad_every_spoils_every_kth_event_in_turn(kafka_topics):
    bootstrap = kafka_topics(TOPICS)
    with EventProducer(bootstrap, SOURCES, users=10, seed=2, bad_every=5) as producer:
        report = producer.produce(40)
    assert report.bad == 8
    records = consume_all(bootstrap, TOPICS, 40)
    bad = []
    for record in records:
        try:
            event = json.loads(record.value)
        except json.JSONDecodeError:
            bad.append("malformed_record")
            continue
        if "user_id" not in event:
            bad.append("missing_key")
        elif not event["event_ts"].endswith("Z"):
            bad.append("bad_timestamp")
        elif any(isinstance(v, str) and v.startswith("not ") for v in event.values()):
            bad.append("wrong_type")
    assert sorted(bad) == sorted(BAD_KINDS * 2)


def test_cli_names_the_missing_variable(keel_home, capsys):
    assert cli(["generate", "--to-kafka", "--rate", "10", "--seconds", "1"]) == 2
    err = capsys.readouterr().err
    assert "KEEL_KAFKA_BOOTSTRAP is not set" in err and "export KEEL_KAFKA_BOOTSTRAP=" in err


def test_cli_streams_for_the_given_seconds(keel_home, kafka_topics, monkeypatch, capsys):
    monkeypatch.setenv("KEEL_KAFKA_BOOTSTRAP", kafka_topics(TOPICS))
    assert cli(["generate", "--to-kafka", "--rate", "200", "--seconds", "0.5", "--users", "20"]) == 0
    out = capsys.readouterr().out
    # The count depends on the machine's load (about 100 at 200/s; the exact pacing is tested above
    # on an injected clock); the run lasts the asked time and says so.
    found = re.search(r"produced (\d+) events in (\d+\.\d)s", out)
    assert found and int(found.group(1)) > 0 and float(found.group(2)) >= 0.5, out


def test_bad_settings_are_refused(kafka_bootstrap):
    with pytest.raises(ProducerError, match="bad_every=0"):
        EventProducer(kafka_bootstrap, SOURCES, bad_every=0)
    with pytest.raises(ProducerError, match="mix"):
        EventProducer(kafka_bootstrap, SOURCES, mix={"nope": 1.0})
