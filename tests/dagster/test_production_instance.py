"""A Dagster run on the production profile: the instance of deploy/dagster/dagster.yaml on a
real PostgreSQL (runs, event log, schedules), the Iceberg catalog in PostgreSQL, the warehouse
on S3-compatible storage."""

import datetime as dt
import shutil
import uuid
from pathlib import Path

import dagster as dg

from assets.raw_events import raw_event_definitions
from keel.lakehouse.tables import Lakehouse
from keel.project import Project
from resources import resource_definitions
from tests.factories.dagster_runs import START, check_evaluation, run_ingest, write_csv
from tests.factories.payments import payment_rows

ROOT = Path(__file__).resolve().parents[2]


def test_an_ingest_run_on_the_production_instance_catalog_and_warehouse(
    production_settings, postgres_server, payments, keel_home, monkeypatch
):
    # The instance exactly as deployed, pointed at this test's own database.
    database = f"dagster_{uuid.uuid4().hex[:12]}"
    postgres_server.create_database(database)
    home = keel_home / "dagster-production"
    home.mkdir()
    shutil.copy(ROOT / "deploy" / "dagster" / "dagster.yaml", home / "dagster.yaml")
    for name, value in {
        "DAGSTER_PG_HOST": "127.0.0.1",
        "DAGSTER_PG_PORT": str(postgres_server.port),
        "DAGSTER_PG_USER": postgres_server.user,
        "DAGSTER_PG_PASSWORD": postgres_server.password,
        "DAGSTER_PG_DB": database,
    }.items():
        monkeypatch.setenv(name, value)
    project = Project(name="prod", sources=(payments,), start_date=START)
    defs = dg.Definitions.merge(raw_event_definitions(project), resource_definitions(production_settings))
    rows = [r for day in (START, START + dt.timedelta(days=1)) for r in payment_rows(day, 15)]
    path = write_csv(keel_home / "landing" / "payments" / "batch.csv", rows)

    with dg.DagsterInstance.from_config(str(home)) as instance:
        result = run_ingest(defs, instance, [path], START, START + dt.timedelta(days=1))
        assert result.success
        assert check_evaluation(result).passed
        # The run, its events and the partitions it materialized are read back from PostgreSQL.
        assert [run.run_id for run in instance.get_runs()] == [result.run_id]
        partitions = instance.get_materialized_partitions(dg.AssetKey(["raw", "payments"]))
        assert partitions == {START.isoformat(), (START + dt.timedelta(days=1)).isoformat()}

    connection = postgres_server.connect(database)
    with connection.cursor() as cursor:
        cursor.execute("SELECT run_id FROM runs")
        assert cursor.fetchall() == [(result.run_id,)]
        cursor.execute("SELECT count(*) FROM event_logs WHERE run_id = %s", (result.run_id,))
        assert cursor.fetchone()[0] > 10
    connection.close()
    landed = Lakehouse.from_settings(production_settings).read("raw.payments").column("event_id").to_pylist()
    assert sorted(landed) == sorted(r["event_id"] for r in rows)
    assert not (production_settings.home / "catalog.db").exists()
