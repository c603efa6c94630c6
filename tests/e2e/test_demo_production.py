"""`make demo-prod` end to end: the demo on PostgreSQL, S3-compatible storage, Redis, the broker,
an MLflow server and Dagster's daemon, all started by `keel demo --profile production`.

The demo runs inside ``run_production``, so this test looks at every server while it still
runs: nothing may be in SQLite or on the local disk but the landing files and logs.
"""

import os
import re

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
    port = int(os.environ["DAGSTER_PG_PORT"])
    connection = psycopg2.connect(host="127.0.0.1", port=port, user="keel", dbname=DATABASES["dagster"])
    with connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM runs")
        assert cursor.fetchone()[0] == len(runs)
    connection.close()
    assert not list(settings.dagster_home.rglob("*.db"))

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

    # No secret the profile set is in a log, a report or Dagster's storage under KEEL_HOME.
    secrets = [os.environ["DAGSTER_PG_PASSWORD"], os.environ["AWS_SECRET_ACCESS_KEY"]]
    files = [p for p in settings.home.rglob("*") if p.is_file() and "servers" not in p.relative_to(settings.home).parts]
    assert len(files) > 10
    for path in files:
        text = path.read_bytes()
        assert not any(secret.encode() in text for secret in secrets), path


def _objects(bucket: str) -> list[dict]:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [item for page in pages for item in page.get("Contents", [])]


def test_the_demo_runs_end_to_end_on_the_production_profile(settings, capsys):
    def demo_then_inspect(production: Settings) -> int:
        inspect_the_servers(production, capsys)
        return 0

    assert run_production(settings, demo_then_inspect) == 0
    # Every server it started is stopped, and its scratch folder gone.
    assert not list((settings.home / "servers").iterdir())
