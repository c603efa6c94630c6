"""The lakehouse on the production profile's backends: the Iceberg catalog in PostgreSQL, the
table files on S3-compatible object storage, with real servers on loopback ports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import psycopg2
import pytest

from keel.cli.main import main
from keel.config import Settings
from keel.devservers.storage import PostgresServer
from keel.ingest.batch import ingest_files
from keel.lakehouse.tables import Lakehouse
from tests.factories.ingest import DAY, NOW, TABLE, write_csv
from tests.factories.payments import payment_rows
from tests.factories.timing import wait_for
from tests.proxy import CutProxy
from tests.servers import use_production_backends

ROOT = Path(__file__).resolve().parents[3]


def catalog_tables(settings) -> list[str]:
    """The tables pyiceberg's SQL catalog lists in the PostgreSQL database."""
    url = urlparse(settings.catalog_uri)
    connection = psycopg2.connect(
        host=url.hostname, port=url.port, user=url.username, password=url.password, dbname=url.path.lstrip("/")
    )
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT table_namespace || '.' || table_name FROM iceberg_tables ORDER BY 1")
            return [row[0] for row in cursor.fetchall()]
    finally:
        connection.close()


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
    keys = s3_server.keys(urlparse(settings.warehouse).netloc)
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
        lake = Lakehouse.from_settings(use_production_backends(monkeypatch, postgres, s3_server))
        first, second = payment_rows(DAY, 10, prefix="a"), payment_rows(DAY, 10, prefix="b")
        assert ingest_files(lake, payments, [write_csv(tmp_path / "a.csv", first)], run_id="a", now=NOW).published

        postgres.restart()

        # The same Lakehouse (its pooled catalog connections are now dead) publishes the next file.
        report = ingest_files(lake, payments, [write_csv(tmp_path / "b.csv", second)], run_id="b", now=NOW)
        assert report.published, report.summary()
        ids = lake.read(TABLE).column("event_id").to_pylist()
        assert sorted(ids) == sorted(r["event_id"] for r in first + second)


# The writer in a process of its own: it ingests one file, and when told to, holds its first
# publish until the flag file appears (after saying so in the ready file), so the other
# writer publishes in between and this one meets main moved: a real conflict, seen through the
# PostgreSQL catalog.
WRITER = """
import json, pathlib, sys, time
from keel.config import Settings
from keel.dsl import Entity
from keel.ingest.batch import ingest_files
from keel.lakehouse import wap
from keel.lakehouse.tables import Lakehouse
from tests.factories.ingest import NOW
from tests.factories.payments import payments_source

path, run_id, ready, flag = sys.argv[1:5]
cli = run_id == "cli"
publish, calls = wap.publish, []

def held(lake, staged):
    if not calls and flag != "-":
        pathlib.Path(ready).touch()
        deadline = time.monotonic() + 120
        while not pathlib.Path(flag).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    calls.append(staged.base_snapshot_id)
    return publish(lake, staged)

wap.publish = held
if cli:
    from keel.cli.main import main
    sys.exit(main(["ingest", path, "--source", "payments"]))
source = payments_source(Entity(name="buyer", join_keys={"user_id": "string"}))
report = ingest_files(Lakehouse.from_settings(Settings.from_env()), source, [path], run_id=run_id, now=NOW)
print(json.dumps({"published": report.published, "publishes": len(calls)}))
"""


def writer(name: str, path: Path, ready: Path, flag: Path | None) -> subprocess.Popen:
    """The writer in a process of its own (``name`` "cli" runs ``keel ingest``), holding its first
    publish until ``flag`` appears when one is given."""
    argv = [str(path), name, str(ready), str(flag) if flag else "-"]
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_two_processes_publishing_one_table_lose_nothing(production_settings, payments, tmp_path):
    lake = Lakehouse.from_settings(production_settings)
    seed = payment_rows(DAY, 5, prefix="seed")
    assert ingest_files(lake, payments, [write_csv(tmp_path / "seed.csv", seed)], run_id="seed", now=NOW).published
    slow_rows, fast_rows = payment_rows(DAY, 20, prefix="slow"), payment_rows(DAY, 20, prefix="fast")
    ready, flag = tmp_path / "ready", tmp_path / "go"

    slow = writer("slow", write_csv(tmp_path / "slow.csv", slow_rows), ready, flag)
    wait_for(ready.exists, timeout=120, what="the held writer to reach its publish")
    fast = writer("fast", write_csv(tmp_path / "fast.csv", fast_rows), ready, None)
    fast_out, _ = fast.communicate(timeout=300)
    flag.touch()
    slow_out, _ = slow.communicate(timeout=300)
    assert fast.returncode == 0 and slow.returncode == 0

    # The fast writer published at once; the held one found main moved, staged again on the
    # new head and published: two publishes, and every row of all three files on main once.
    assert json.loads(fast_out.splitlines()[-1]) == {"published": True, "publishes": 1}
    assert json.loads(slow_out.splitlines()[-1]) == {"published": True, "publishes": 2}
    ids = Lakehouse.from_settings(production_settings).read(TABLE).column("event_id").to_pylist()
    assert sorted(ids) == sorted(r["event_id"] for r in seed + slow_rows + fast_rows)


def test_postgresql_down_at_publish_fails_the_ingest_cleanly_and_a_rerun_lands_once(
    keel_home, s3_server, monkeypatch, tmp_path
):
    # A server of this test's own, stopped mid-run: the session's must stay up for the others.
    with PostgresServer() as postgres:
        use_production_backends(monkeypatch, postgres, s3_server)
        monkeypatch.setenv("KEEL_PROJECT", "tests.keel.cli.feature_project")
        seed, rows = payment_rows(DAY, 5, prefix="seed"), payment_rows(DAY, 20, prefix="late")
        assert main(["ingest", str(write_csv(tmp_path / "seed.csv", seed)), "--source", "payments"]) == 0
        path, ready, flag = write_csv(tmp_path / "late.csv", rows), tmp_path / "ready", tmp_path / "go"

        held = writer("cli", path, ready, flag)
        wait_for(ready.exists, timeout=120, what="the held ingest to reach its publish")
        postgres.halt()
        flag.touch()
        _, err = held.communicate(timeout=300)

        # One line naming the catalog and what to do; no traceback.
        assert held.returncode == 1
        assert err.startswith("keel ingest: the Iceberg catalog at postgresql+psycopg2://127.0.0.1:"), err
        assert len(err.splitlines()) == 1, err
        assert "run the same command again when it is back" in err and "Traceback" not in err, err

        postgres.restart()
        lake = Lakehouse.from_settings(Settings.from_env())
        assert sorted(lake.read(TABLE).column("event_id").to_pylist()) == sorted(r["event_id"] for r in seed)
        rerun = writer("cli", path, ready, None)
        assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
        landed = Lakehouse.from_settings(Settings.from_env()).read(TABLE).column("event_id").to_pylist()
        assert sorted(landed) == sorted(r["event_id"] for r in seed + rows)


# Where the object store goes away, in the order an ingest writes the raw table's objects. Each
# object is a multipart upload and the cut drops its part, mid-object. Table metadata is written
# three times: creating the audit branch, committing the staged snapshot to it, and moving main
# (the publish). The last value is the audit branch the cut leaves: none, at main's head, or
# holding the staged snapshot.
METADATA = rb"PUT /[^ ]*/raw/payments/metadata/[^ ]*\.metadata\.json\?partNumber="
CUTS = {
    "branch metadata": (METADATA, 1, None),
    "data file": (rb"PUT /[^ ]*/raw/payments/data/[^ ]*\.parquet\?partNumber=", 1, "at head"),
    "staged metadata": (METADATA, 2, "at head"),
    "publish metadata": (METADATA, 3, "staged"),
}


@pytest.mark.parametrize("cut", CUTS)
def test_the_object_store_gone_mid_write_leaves_main_untouched_and_a_rerun_lands_once(
    production_settings, s3_server, monkeypatch, tmp_path, capsys, cut
):
    monkeypatch.setenv("KEEL_PROJECT", "tests.keel.cli.feature_project")
    seed, rows = payment_rows(DAY, 5, prefix="seed"), payment_rows(DAY, 20, prefix="late")
    assert main(["ingest", str(write_csv(tmp_path / "seed.csv", seed)), "--source", "payments"]) == 0
    lake = Lakehouse.from_settings(production_settings)
    head = lake.head(TABLE)
    path = write_csv(tmp_path / "late.csv", rows)
    capsys.readouterr()

    pattern, nth, staged = CUTS[cut]
    with CutProxy(s3_server.port, pattern, nth) as proxy:
        monkeypatch.setenv("KEEL_S3_ENDPOINT", proxy.endpoint)
        assert main(["ingest", str(path), "--source", "payments"]) == 1
        assert proxy.cuts == 1
        err = capsys.readouterr().err
        # One line naming the store and what to do; no traceback.
        assert err.startswith(f"keel ingest: the object store at {proxy.endpoint} failed ("), err
        assert "run the same command again when it answers" in err and len(err.splitlines()) == 1, err

        # Main is where it was, read straight from the server: no row of the cut run on it.
        after = Lakehouse.from_settings(production_settings)
        assert after.head(TABLE) == head
        branches = [ref.snapshot_id for name, ref in after.table(TABLE).refs().items() if name != "main"]
        assert [("at head" if snapshot == head else "staged") for snapshot in branches] == ([staged] if staged else [])
        ids = Lakehouse.from_settings(production_settings).read(TABLE).column("event_id").to_pylist()
        assert sorted(ids) == sorted(r["event_id"] for r in seed)

        # The store is back (the proxy listens again): the same command lands every row once.
        proxy.up()
        assert main(["ingest", str(path), "--source", "payments"]) == 0
    landed = Lakehouse.from_settings(production_settings).read(TABLE).column("event_id").to_pylist()
    assert sorted(landed) == sorted(r["event_id"] for r in seed + rows)
