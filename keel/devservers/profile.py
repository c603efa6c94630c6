"""The production profile on one machine: every server it needs, started on loopback ports.

``ProductionServers`` starts PostgreSQL (one database each for the Iceberg catalog, MLflow's
tracking store and Dagster's instance), S3-compatible object storage (buckets for the
warehouse and for MLflow's artifacts), Redis, the Kafka-protocol broker and an ``mlflow
server`` on PostgreSQL and ``s3://``, with their scratch folders under one folder
(``KEEL_HOME/servers``). ``environment()`` is what points Keel, Dagster's instance
(``deploy/dagster/dagster.yaml``) and MLflow's clients at them; ``describe()`` says where each
runs. Leaving the ``with`` block (normally, on an exception or on Ctrl-C) stops every server
started, the last first, and deletes what they held: the profile is for demos and tests.
"""

from __future__ import annotations

import contextlib
import secrets
from pathlib import Path

from keel.config import hide_password
from keel.devservers import KafkaBroker, RedisServer, Server
from keel.devservers.storage import MlflowServer, PostgresServer, S3Server

DATABASES = {"catalog": "keel_catalog", "mlflow": "mlflow", "dagster": "dagster"}
WAREHOUSE_BUCKET = "keel-warehouse"
ARTIFACT_BUCKET = "keel-mlflow"
# Importing MLflow and creating its tables in PostgreSQL takes 10-20 s on a quiet machine.
MLFLOW_START_TIMEOUT_S = 120.0


class ProductionServers:
    """PostgreSQL, object storage, Redis, the broker and MLflow's server, as one context manager."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = Path(scratch)
        # Every server that can ask for a password does, a fresh one each run (as a team's servers
        # would): what a test looks for in the logs, and what `keel config` must not show.
        self.postgres = PostgresServer(password=f"pg-{secrets.token_hex(12)}")
        self.s3 = S3Server()
        self.redis = RedisServer(password=f"redis-{secrets.token_hex(12)}")
        self.kafka = KafkaBroker()
        self.mlflow: MlflowServer | None = None
        self._started: list[Server] = []

    def start(self) -> ProductionServers:
        try:
            for server in (self.postgres, self.s3, self.redis, self.kafka):
                self._started.append(server.start(under=self.scratch))
            urls = {use: self.postgres.create_database(name) for use, name in DATABASES.items()}
            self.s3.create_bucket(WAREHOUSE_BUCKET)
            self.s3.create_bucket(ARTIFACT_BUCKET)
            self.mlflow = MlflowServer(
                backend_store_uri=urls["mlflow"],
                artifacts_destination=f"s3://{ARTIFACT_BUCKET}/artifacts",
                environment=self.s3.environment(),
            )
            self._started.append(self.mlflow.start(timeout=MLFLOW_START_TIMEOUT_S, under=self.scratch))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every server started, the last first (MLflow before its PostgreSQL and storage)."""
        while self._started:
            server = self._started.pop()
            with contextlib.suppress(Exception):
                server.stop()

    def __enter__(self) -> ProductionServers:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def environment(self) -> dict[str, str]:
        """The variables that put Keel, Dagster and MLflow on these servers."""
        return {
            **self.s3.environment(),
            "KEEL_CATALOG_URI": self.postgres.url(DATABASES["catalog"]),
            "KEEL_WAREHOUSE": f"s3://{WAREHOUSE_BUCKET}/warehouse",
            "KEEL_S3_ENDPOINT": self.s3.endpoint,
            "KEEL_REDIS_URL": self.redis.url,
            "KEEL_KAFKA_BOOTSTRAP": self.kafka.bootstrap,
            "KEEL_MLFLOW_URI": self.mlflow.url,
            # deploy/dagster/dagster.yaml reads its PostgreSQL from these.
            "DAGSTER_PG_HOST": "127.0.0.1",
            "DAGSTER_PG_PORT": str(self.postgres.port),
            "DAGSTER_PG_USER": self.postgres.user,
            "DAGSTER_PG_PASSWORD": self.postgres.password,
            "DAGSTER_PG_DB": DATABASES["dagster"],
        }

    def describe(self) -> list[str]:
        """One line per server: what it is, where it listens, what it holds; passwords hidden."""
        pg = f"127.0.0.1:{self.postgres.port}"
        return [
            f"PostgreSQL   {pg}  databases {', '.join(DATABASES.values())} "
            f"(PGPASSFILE={self.postgres.passfile} {self.postgres.psql} -h 127.0.0.1 -p {self.postgres.port} "
            f"-U {self.postgres.user} {DATABASES['catalog']})",
            f"object store {self.s3.endpoint}  s3://{WAREHOUSE_BUCKET} (Iceberg warehouse), "
            f"s3://{ARTIFACT_BUCKET} (MLflow artifacts); moto, objects in memory",
            f"Redis        {hide_password(self.redis.url)}  online store",
            f"Kafka        {self.kafka.bootstrap}  tansu, live events (in memory)",
            f"MLflow       {self.mlflow.url}  tracking and registry UI; store in PostgreSQL, artifacts on s3://",
            f"scratch      {self.scratch} (each server's log is server.log in its folder)",
        ]
