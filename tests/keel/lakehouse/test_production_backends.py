"""The lakehouse on the production profile's backends: the Iceberg catalog in PostgreSQL, the
table files on S3-compatible object storage, with real servers on loopback ports."""

from __future__ import annotations

from urllib.parse import urlparse

import psycopg2

from keel.config import Settings
from keel.devservers.storage import PostgresServer
from keel.ingest.batch import ingest_files
from keel.lakehouse.tables import Lakehouse
from tests.factories.ingest import DAY, NOW, TABLE, write_csv
from tests.factories.payments import payment_rows


def catalog_tables(settings) -> list[str]:
    """The tables pyiceberg's SQL catalog lists in the PostgreSQL database."""
    url = urlparse(settings.catalog_uri)
    connection = psycopg2.connect(host=url.hostname, port=url.port, user=url.username, dbname=url.path.lstrip("/"))
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT table_namespace || '.' || table_name FROM iceberg_tables ORDER BY 1")
            return [row[0] for row in cursor.fetchall()]
    finally:
        connection.close()


def bucket_keys(s3_server, warehouse: str) -> list[str]:
    url = urlparse(warehouse)
    pages = s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=url.netloc)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def test_an_ingest_lands_through_the_postgresql_catalog_onto_object_storage(
    production_settings, s3_server, payments, tmp_path
):
    settings = production_settings
    assert settings.catalog_uri.startswith("postgresql") and settings.warehouse.startswith("s3://")
    lake = Lakehouse.from_settings(settings)
    rows = payment_rows(DAY, 40)
    path = write_csv(tmp_path / "payments.csv", rows)

    report = ingest_files(lake, payments, [path], run_id="prod-1", now=NOW)

    assert report.published, report.summary()
    landed = Lakehouse.from_settings(settings).read(TABLE)
    assert sorted(landed.column("event_id").to_pylist()) == sorted(r["event_id"] for r in rows)
    assert TABLE in catalog_tables(settings)
    # The table's metadata and data files are objects in the bucket; nothing is on local disk.
    keys = bucket_keys(s3_server, settings.warehouse)
    assert any(k.endswith(".parquet") and "/raw/payments/data/" in k for k in keys), keys
    assert any(k.endswith(".metadata.json") for k in keys), keys
    assert not (settings.home / "warehouse").exists() and not (settings.home / "catalog.db").exists()

    # The same file again settles to the same rows: exactly once across both backends.
    again = ingest_files(lake, payments, [path], run_id="prod-2", now=NOW)
    assert again.rows_read == len(rows)
    assert Lakehouse.from_settings(settings).read(TABLE).num_rows == len(rows)


def test_a_lakehouse_keeps_working_across_a_postgresql_restart(keel_home, s3_server, monkeypatch, payments, tmp_path):
    # A server of this test's own: the session's must not restart under the other tests.
    with PostgresServer() as postgres:
        for name, value in s3_server.environment().items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("KEEL_CATALOG_URI", postgres.create_database("catalog"))
        monkeypatch.setenv("KEEL_WAREHOUSE", s3_server.create_bucket("keel-restart") + "/warehouse")
        lake = Lakehouse.from_settings(Settings.from_env())
        first, second = payment_rows(DAY, 10, prefix="a"), payment_rows(DAY, 10, prefix="b")
        assert ingest_files(lake, payments, [write_csv(tmp_path / "a.csv", first)], run_id="a", now=NOW).published

        postgres.restart()

        # The same Lakehouse (its pooled catalog connections are now dead) publishes the next file.
        report = ingest_files(lake, payments, [write_csv(tmp_path / "b.csv", second)], run_id="b", now=NOW)
        assert report.published, report.summary()
        ids = lake.read(TABLE).column("event_id").to_pylist()
        assert sorted(ids) == sorted(r["event_id"] for r in first + second)
