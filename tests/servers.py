"""Pytest plugin: a Redis server and a Kafka-protocol broker (tansu) on loopback ports.

Both start once per session, on first use, and stop at its end. ``redis_url`` is
``redis://127.0.0.1:PORT/0`` and ``kafka_bootstrap`` is ``127.0.0.1:PORT``; tests that need
them empty use ``clean_redis_url`` (db 0 flushed first) and ``kafka_topics`` (topics
deleted and created again). Consumers in tests join groups fast with
``keel.devservers.FAST_GROUP_JOIN`` (see that module for the measured join times).
"""

import pytest

from keel.devservers import DevServerError, KafkaBroker, RedisServer


@pytest.fixture(scope="session")
def redis_server():
    try:
        server = RedisServer().start()
    except DevServerError as exc:
        pytest.fail(str(exc))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server) -> str:
    return redis_server.url


@pytest.fixture
def clean_redis_url(redis_url) -> str:
    """``redis_url`` with db 0 emptied before the test."""
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()
    return redis_url


@pytest.fixture(scope="session")
def kafka_broker():
    try:
        broker = KafkaBroker().start()
    except DevServerError as exc:
        pytest.fail(str(exc))
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker) -> str:
    return kafka_broker.bootstrap


@pytest.fixture
def kafka_topics(kafka_broker):
    """``make(topics)``: delete the topics (name -> partitions) if they exist and create them empty."""

    def make(topics: dict[str, int]) -> str:
        kafka_broker.recreate_topics(topics)
        return kafka_broker.bootstrap

    return make
