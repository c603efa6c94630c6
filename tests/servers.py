"""Pytest plugin: a Redis server and a Kafka-protocol broker (tansu) on loopback ports.

Both start once per session, on first use, and stop at its end. ``redis_url`` is
``redis://127.0.0.1:PORT/0`` and ``kafka_bootstrap`` is ``127.0.0.1:PORT``; tests that need
them empty use ``clean_redis_url`` (db 0 flushed first) and ``kafka_topics`` (topics
deleted and created again). Consumers in tests join groups fast with
``keel.devservers.FAST_GROUP_JOIN`` (see that module for the measured join times).

``redis_cluster`` is a Redis Cluster of three masters (``keel.devservers.redis_cluster``),
started once per session on first use; ``redis_cluster_url`` is its
``redis+cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/0``.

``mlflow_server`` is a real ``mlflow server`` (SQLite backend, artifacts served from its
scratch folder), started once per session on first use; ``clean_mlflow_uri`` is its URL with
every registered model deleted first.

``postgres_server`` (PostgreSQL) and ``s3_server`` (moto's S3) start once per session on first
use; ``production_settings`` points a test's Keel at a fresh database on the one and a fresh
bucket on the other: the Iceberg catalog in PostgreSQL and the warehouse on ``s3://``.
"""

import uuid

import pytest

from keel.config import Settings
from keel.devservers import DevServerError, KafkaBroker, RedisServer
from keel.devservers.redis_cluster import RedisCluster
from keel.devservers.storage import MlflowServer, PostgresServer, S3Server


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
def redis_cluster():
    try:
        cluster = RedisCluster(masters=3).start()
    except DevServerError as exc:
        pytest.fail(str(exc))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def redis_cluster_url(redis_cluster) -> str:
    return redis_cluster.url


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


@pytest.fixture(scope="session")
def postgres_server():
    try:
        # Signing in with a password, as a team's server asks.
        server = PostgresServer(password=f"pg-{uuid.uuid4().hex}").start()
    except DevServerError as exc:
        pytest.fail(str(exc))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server():
    try:
        server = S3Server().start()
    except DevServerError as exc:
        pytest.fail(str(exc))
    yield server
    server.stop()


def use_production_backends(monkeypatch, postgres: PostgresServer, s3: S3Server) -> Settings:
    """Point this test's Keel at a fresh database on ``postgres`` (the Iceberg catalog) and a
    fresh bucket on ``s3`` (the warehouse; the AWS variables point pyarrow's S3 client at it)."""
    for name, value in s3.environment().items():
        monkeypatch.setenv(name, value)
    suffix = uuid.uuid4().hex[:12]
    monkeypatch.setenv("KEEL_CATALOG_URI", postgres.create_database(f"keel_{suffix}"))
    monkeypatch.setenv("KEEL_WAREHOUSE", s3.create_bucket(f"keel-{suffix}") + "/warehouse")
    return Settings.from_env()


@pytest.fixture
def production_settings(keel_home, postgres_server, s3_server, monkeypatch) -> Settings:
    """Settings on the session's PostgreSQL and S3 servers, a database and a bucket of the test's own."""
    return use_production_backends(monkeypatch, postgres_server, s3_server)


@pytest.fixture(scope="session")
def mlflow_server():
    try:
        # Importing MLflow and creating its tables takes ~10 s on a quiet machine.
        server = MlflowServer().start(timeout=90)
    except DevServerError as exc:
        pytest.fail(str(exc))
    yield server
    server.stop()


@pytest.fixture
def clean_mlflow_uri(mlflow_server) -> str:
    """The server's URL, with every registered model (and its versions) deleted before the test."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    for model in client.search_registered_models():
        client.delete_registered_model(model.name)
    return mlflow_server.url
