"""`make demo-prod` end to end: the demo on PostgreSQL, S3-compatible storage, Redis, the broker,
an MLflow server and Dagster's daemon, all started by `keel demo --profile production`.

The demo runs inside ``run_production``, so this test looks at every server while it still
runs: nothing may be in SQLite or on the local disk but the landing files and logs.
"""

import contextlib
import os
import re
import subprocess
from urllib.parse import urlparse

import boto3
import dagster as dg
import psycopg2
import redis
from mlflow import MlflowClient

from keel.cli.demo import run_production
from keel.config import Settings
from keel.devservers.profile import ARTIFACT_BUCKET, DATABASES, WAREHOUSE_BUCKET
from keel.inference_log.records import TOPIC
from keel.lakehouse.tables import Lakehouse
from keel.stream.kafka_io import end_offsets, topic_partitions
from pipelines import demo

# A fifth of the demo's users: the same loop, with less data to move through the servers.
USERS = 200


def inspect_the_servers(settings: Settings, capsys) -> None:
    assert demo.run(settings, users=USERS) == 0
    out = capsys.readouterr().out

    # Dagster: the instance of deploy/dagster/dagster.yaml, its runs in PostgreSQL, all launched
    # through the daemon's queue; no SQLite storage in DAGSTER_HOME.
    instance = dg.DagsterInstance.get()
    assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
    runs = instance.get_runs()
    assert runs and all(run.is_success for run in runs), [(r.job_name, r.status) for r in runs if not r.is_success]
    jobs = {run.job_name for run in runs}
    for job in ("online_sync", "train_churn", "predict_churn", "load_inference_log", "monitor_churn"):
        assert job in jobs, job
    assert sum(run.job_name.startswith("ingest_") for run in runs) == 12
    with _connect(DATABASES["dagster"]) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM runs")
        assert cursor.fetchone()[0] == len(runs)
    assert not list(settings.dagster_home.rglob("*.db"))
    # psql, as the demo prints it (signed in through the password file), shows the runs and the catalog.
    psql = re.search(r"\((PGPASSFILE=(\S+) (\S+) -h 127.0.0.1 -p (\d+) -U keel) keel_catalog\)", out)
    assert psql, out
    _, passfile, binary, port = psql.groups()
    for database, query, expected in (
        (DATABASES["dagster"], "SELECT count(*) FROM runs", str(len(runs))),
        (DATABASES["catalog"], "SELECT count(*) > 10 FROM iceberg_tables", "t"),
    ):
        shown = subprocess.run(
            [binary, "-h", "127.0.0.1", "-p", port, "-U", "keel", "-w", "-At", "-c", query, database],
            env={**os.environ, "PGPASSFILE": passfile},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert shown.returncode == 0 and shown.stdout.strip() == expected, shown

    # The lakehouse: catalog in PostgreSQL, every table's files on the bucket.
    lake = Lakehouse.from_settings(settings)
    assert settings.catalog_uri.startswith("postgresql")
    for table in ("raw.transactions", "features.user_transactions", "predictions.churn", "monitoring.drift"):
        assert lake.catalog.load_table(table).location().startswith(f"s3://{WAREHOUSE_BUCKET}/"), table
        assert lake.read(table).num_rows > 0, table
    assert not (settings.home / "catalog.db").exists() and not (settings.home / "warehouse").exists()
    # The live events the stream worker consumed beside the batch ingest, each once.
    live = re.search(r"in Iceberg: raw.clicks ([\d,]+), raw.signups ([\d,]+), raw.transactions ([\d,]+)", out)
    produced = re.search(r"live: produced ([\d,]+) events", out)
    assert live and produced, out
    assert sum(int(n.replace(",", "")) for n in live.groups()) == int(produced.group(1).replace(",", ""))

    # The online store is Redis, equal to offline.
    assert not (settings.home / "online.db").exists()
    assert redis.Redis.from_url(settings.redis_url).dbsize() > USERS
    for group in ("user_transactions", "user_clicks", "user_engagement"):
        assert f"consistency {group:<20}100.00% of" in out

    # MLflow: the server's store in PostgreSQL, its artifacts on the bucket; the champion is v1 or
    # the retrained v2; the server answered from Redis throughout the loop.
    assert not (settings.home / "mlflow.db").exists()
    client = MlflowClient(tracking_uri=settings.mlflow_uri, registry_uri=settings.mlflow_uri)
    assert client.get_model_version_by_alias("churn", "champion").version in ("1", "2")
    artifacts = [k["Key"] for k in _objects(ARTIFACT_BUCKET)]
    assert any(key.endswith("MLmodel") for key in artifacts), artifacts[:5]
    assert "promoted to champion: yes" in out
    assert re.search(r"served during the loop: \d+ from v1 champion.*; no failures", out), out

    # The inference log went through the broker's topic, and monitoring read it back.
    assert not (settings.home / "inference_log").exists()
    ends = end_offsets(settings.kafka_bootstrap, topic_partitions(settings.kafka_bootstrap, [TOPIC]))
    assert sum(ends.values()) > 0
    assert "check drift " in out and lake.read("monitoring.performance").num_rows > 0

    # The serving admin endpoints are closed: the profile sets no API key.
    assert re.search(r"GET /admin/models without an API key: 403 \(admin endpoints are off", out), out
    assert_no_secret_anywhere(settings, out, capsys)


def assert_no_secret_anywhere(settings: Settings, out: str, capsys) -> None:
    """No password or key the profile's servers were given is in the demo's output, `keel config`,
    a log or report under KEEL_HOME (the servers' logs too), Dagster's or MLflow's storage in
    PostgreSQL (run configs, event logs with their metadata, tags, params), or any object on the
    buckets but compressed data files."""
    from keel.cli.main import main

    secrets = [
        os.environ["DAGSTER_PG_PASSWORD"],
        os.environ["AWS_SECRET_ACCESS_KEY"],
        urlparse(settings.redis_url).password,
    ]
    assert all(secrets) and all(secret in str(os.environ) for secret in secrets)
    assert main(["config"]) == 0
    places = {"demo output": out.encode(), "keel config": capsys.readouterr().out.encode()}
    assert b"KEEL_CATALOG_URI=postgresql+psycopg2://keel:***@" in places["keel config"]
    # Files: everything under KEEL_HOME but PostgreSQL's cluster (read through SQL below) and the
    # two files that hold a password by design, mode 0600 (psql's pgpass, Redis's requirepass).
    for path in settings.home.rglob("*"):
        cluster = any(part.startswith("keel-postgres-") for part in path.parts) and "data" in path.parts
        if path.is_file() and not cluster and path.name not in ("pgpass", "password.conf"):
            places[str(path)] = path.read_bytes()
    # PostgreSQL's scratch folder may be in the system's temporary folder instead (see PostgresServer).
    assert sum(path.endswith("server.log") for path in places) >= 4
    for database in DATABASES.values():
        with _connect(database) as connection, connection.cursor() as cursor:
            cursor.execute(
                "SELECT format('%I.%I', table_schema, table_name) FROM information_schema.tables "
                "WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
            )
            for (table,) in cursor.fetchall():
                cursor.execute(f"SELECT t::text FROM {table} t")
                places[f"{database}: {table}"] = "\n".join(row[0] for row in cursor.fetchall()).encode()
    assert any(name.endswith("event_logs") for name in places) and any("registered_models" in n for n in places)
    # Every object but the tables' Parquet data files: their pages are compressed, so a search of
    # their bytes would prove nothing (what they hold is the demo's generated data).
    s3 = boto3.client("s3")
    for bucket in (WAREHOUSE_BUCKET, ARTIFACT_BUCKET):
        for item in _objects(bucket):
            if not (bucket == WAREHOUSE_BUCKET and item["Key"].endswith(".parquet")):
                places[f"s3://{bucket}/{item['Key']}"] = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    for place, content in places.items():
        assert not any(secret.encode() in content for secret in secrets), place


@contextlib.contextmanager
def _connect(database: str):
    connection = psycopg2.connect(
        host="127.0.0.1",
        port=int(os.environ["DAGSTER_PG_PORT"]),
        user=os.environ["DAGSTER_PG_USER"],
        password=os.environ["DAGSTER_PG_PASSWORD"],
        dbname=database,
    )
    try:
        yield connection
    finally:
        connection.close()


def _objects(bucket: str) -> list[dict]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [item for page in pages for item in page.get("Contents", [])]


def test_the_demo_runs_end_to_end_on_the_production_profile(settings, capsys):
    def demo_then_inspect(production: Settings) -> int:
        inspect_the_servers(production, capsys)
        return 0

    assert run_production(settings, demo_then_inspect) == 0
    # Every server it started is stopped, and its scratch folder gone.
    assert not list((settings.home / "servers").iterdir())
