"""The cost of Dagster's bookkeeping: one ingest run of N daily partitions, on each instance.

The same job (``ingest_transactions`` of the shop, one file of ``--days`` days, a ranged run as
the landing sensor launches it) runs in process three times, each on a fresh lakehouse (SQLite
catalog, local warehouse: only Dagster's storage differs):

- floor: an ephemeral instance (event log in memory), what the run costs without bookkeeping;
- embedded: the instance of ``dagster.yaml`` (runs and event log in SQLite under DAGSTER_HOME);
- production: the instance of ``deploy/dagster/dagster.yaml`` on a PostgreSQL started here.

Each line prints the better of two runs' time, its events, and the cost per event over the floor.

    .venv/bin/python bench/bookkeeping.py [--days 90] [--users 300]
"""

import argparse
import datetime as dt
import os
import shutil
import tempfile
import time
from pathlib import Path

import dagster as dg

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("DO_NOT_TRACK", "1")


def ingest_once(home: Path, instance: dg.DagsterInstance, days: int, users: int) -> tuple[float, int]:
    """Run the transactions ingest of ``days`` days on ``instance``; (seconds, events in its log)."""
    from assets.raw_events import ingest_run_config, raw_event_definitions
    from keel.config import Settings
    from pipelines import project
    from pipelines.generate import generate, write_files
    from pipelines.sources import transactions
    from resources import resource_definitions
    from sensors.landing import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

    os.environ["KEEL_HOME"] = str(home)
    settings = Settings.from_env()
    tables = {"transactions": generate(days=days, users=users, start=project.start_date)["transactions"]}
    files = [str(p) for p in write_files(tables, home / "landing", chunk_days=days)]
    defs = dg.Definitions.merge(raw_event_definitions(project), resource_definitions(settings))
    job = defs.resolve_job_def("ingest_transactions")
    last = project.start_date + dt.timedelta(days=days - 1)
    t0 = time.perf_counter()
    result = job.execute_in_process(
        instance=instance,
        run_config={
            **ingest_run_config(transactions, files),
            "loggers": {"console": {"config": {"log_level": "ERROR"}}},
        },
        tags={
            ASSET_PARTITION_RANGE_START_TAG: project.start_date.isoformat(),
            ASSET_PARTITION_RANGE_END_TAG: str(last),
        },
    )
    seconds = time.perf_counter() - t0
    assert result.success
    return seconds, len(instance.all_logs(result.run_id))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--users", type=int, default=300)
    args = parser.parse_args()
    from keel.devservers.storage import PostgresServer

    scratch = Path(tempfile.mkdtemp(prefix="keel-bench-bookkeeping-"))
    rows = []
    try:
        with PostgresServer(password="keel-bench") as postgres:
            postgres.create_database("dagster")
            os.environ.update(
                DAGSTER_PG_HOST="127.0.0.1",
                DAGSTER_PG_PORT=str(postgres.port),
                DAGSTER_PG_USER=postgres.user,
                DAGSTER_PG_PASSWORD=postgres.password,
                DAGSTER_PG_DB="dagster",
            )
            for name, config in (
                ("floor (in memory)", None),
                ("embedded (SQLite)", ROOT / "dagster.yaml"),
                ("production (PostgreSQL)", ROOT / "deploy" / "dagster" / "dagster.yaml"),
            ):
                home = scratch / name.split()[0]
                (home / "dagster").mkdir(parents=True)
                if config is None:
                    instance = dg.DagsterInstance.ephemeral()
                else:
                    shutil.copy(config, home / "dagster" / "dagster.yaml")
                    os.environ["DAGSTER_HOME"] = str(home / "dagster")
                    instance = dg.DagsterInstance.from_config(str(home / "dagster"))
                with instance:
                    # The better of two runs (each on a lakehouse of its own): the first pays imports.
                    runs = [ingest_once(home / str(i), instance, args.days, args.users) for i in range(2)]
                seconds, events = min(runs)
                rows.append((name, seconds, events))
                print(f"  {name}: {seconds:.2f}s, {events} events", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    floor = rows[0][1]
    print(f"\none ingest run of {args.days} daily partitions ({args.users} users):")
    print(f"{'instance':<26}{'run s':>8}{'events':>8}{'x floor':>9}{'ms/event over floor':>21}")
    for name, seconds, events in rows:
        per = 1000 * (seconds - floor) / events if events else 0.0
        print(f"{name:<26}{seconds:>8.2f}{events:>8}{seconds / floor:>9.2f}{per:>21.1f}")


if __name__ == "__main__":
    main()
