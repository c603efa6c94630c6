"""The maintenance asset compacts and expires through Dagster, reporting what it did."""

import datetime as dt

import dagster as dg
import pyarrow as pa

from assets.maintenance import lakehouse_maintenance
from resources import lakehouse_resource
from tests.factories.payments import payment_rows

DAY = dt.date(2026, 2, 1)


def test_maintenance_compacts_small_files_and_keeps_content(settings, lake, payments):
    lake.ensure_table(payments.table_name, payments.arrow_schema(), day_column=payments.timestamp)
    # Four appends to the same day (as micro-batches land): four small files.
    for i in range(4):
        rows = pa.Table.from_pylist(payment_rows(DAY, 5, prefix=f"b{i}"), schema=payments.arrow_schema())
        props = lake.snapshot_properties("payments", [DAY], f"batch-{i}")
        lake.table(payments.table_name).append(rows, snapshot_properties=props)
    before = lake.read(payments.table_name).sort_by("event_id")
    files_before = lake.table(payments.table_name).inspect.files().num_rows
    assert files_before == 4

    result = dg.materialize(
        [lakehouse_maintenance],
        resources={"lakehouse": lakehouse_resource(settings)},
        run_config={"ops": {"ops__lakehouse_maintenance": {"config": {"compact_min_files": 2}}}},
    )

    assert result.success
    meta = result.asset_materializations_for_node("ops__lakehouse_maintenance")[0].metadata
    assert meta["days_compacted"].value == 1
    assert meta["snapshots_expired"].value == 0  # all are younger than the 7-day default
    assert "| raw.payments |" in meta["summary"].value
    assert lake.table(payments.table_name).inspect.files().num_rows == 1
    assert lake.read(payments.table_name).sort_by("event_id") == before
    head = lake.snapshots(payments.table_name)[-1]
    assert head.properties["keel.source"] == "compaction"


def test_maintenance_removes_staging_folders_of_gone_ingests_and_records_the_bytes(settings, lake):
    import json
    import os
    import socket
    import subprocess
    import sys

    from keel.ingest.staging import OWNER_FILE, STAGING_PREFIX, process_start

    def folder(name: str, pid: int) -> None:
        path = settings.staging / f"{STAGING_PREFIX}payments-{name}"
        path.mkdir(parents=True)
        (path / "staging.duckdb").write_bytes(b"x" * 5000)
        owner = {"pid": pid, "host": socket.gethostname(), "process_start": process_start(pid)}
        (path / OWNER_FILE).write_text(json.dumps(owner))

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder("killed", int(gone.stdout))
    folder("running", os.getpid())
    freed = sum(p.stat().st_size for p in (settings.staging / f"{STAGING_PREFIX}payments-killed").iterdir())

    result = dg.materialize([lakehouse_maintenance], resources={"lakehouse": lakehouse_resource(settings)})

    assert result.success
    meta = result.asset_materializations_for_node("ops__lakehouse_maintenance")[0].metadata
    assert meta["staging_folders_removed"].value == 1
    assert meta["staging_bytes_freed"].value == freed
    assert meta["staging_folders_kept"].value == 1
    assert [p.name for p in settings.staging.iterdir()] == [f"{STAGING_PREFIX}payments-running"]
