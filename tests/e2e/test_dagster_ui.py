"""Dagster as its users click it: a real webserver and daemon on a temporary instance, driven through
the GraphQL API the UI uses.

Twelve files dropped at once with the landing sensor on all land exactly once, with no failed
run, their runs queued one per table; a partition-range backfill of a feature group and the
"Materialize" button on a published table succeed; the asset graph tells the story from the
sources to monitoring; the loop's sensors and schedules are on.
"""

import datetime as dt
import itertools
import os
import shutil
from pathlib import Path

import dagster as dg
import pyarrow.compute as pc
import pytest

from keel.devservers import free_port
from pipelines import project
from pipelines.dagster_service import DagsterService
from pipelines.demo import write_corrections
from pipelines.demo_runs import DemoRuns
from pipelines.generate import generate, write_files

ROOT = Path(__file__).resolve().parents[2]
USERS = 60

# Item by item, the lineage a newcomer should read in the graph.
STORY = [
    ("landing/transactions", "raw/transactions"),
    ("raw/transactions", "features/user_transactions"),
    ("features/user_transactions", "features/user_engagement"),
    ("features/user_transactions", "online/user_transactions"),
    ("online/user_transactions", "serving/churn"),
    ("online/user_profile", "serving/churn"),
    ("serving/churn", "monitoring/inference_log"),
    ("monitoring/inference_log", "monitoring/churn_drift"),
    ("monitoring/inference_log", "monitoring/churn_performance"),
    ("features/user_profile", "models/churn_challenger"),
    ("raw/churn_labels", "models/churn_challenger"),
    ("models/churn_challenger", "models/churn_champion"),
    ("models/churn_champion", "serving/churn"),
    ("models/churn_champion", "predictions/churn"),
    ("features/user_profile", "predictions/churn"),
    ("models/churn_champion", "monitoring/churn_drift"),
    ("raw/churn_labels", "monitoring/churn_performance"),
]
LOOP = {
    "landing_files",
    "retrain_churn",
    "monitoring_alerts",
    "keel_automation",
    "train_churn_daily",
    "predict_churn_daily",
    "monitor_churn_daily",
    "load_inference_log_daily",
    "data_quality_daily",
    "daily_lakehouse_maintenance",
}


@pytest.fixture
def shop(settings):
    """The shop's history at a small size, as files in the landing folder: 12 files in all."""
    start = project.start_date
    days = (dt.datetime.now(dt.UTC).date() - start).days
    tables = generate(days=days, users=USERS, start=start, drift_after=days // 3)
    write_files(tables, settings.landing)
    write_corrections(settings.landing / "transactions", tables["transactions"].slice(0, 1).to_pylist()[0])
    # The sensor waits for a file to be still for a few seconds; these were written before it starts.
    old = dt.datetime.now().timestamp() - 60
    files = sorted(str(p) for p in settings.landing.rglob("*") if p.is_file())
    for path in files:
        os.utime(path, (old, old))
    return tables, files


@pytest.fixture
def dagster(settings):
    shutil.copy(ROOT / "dagster.yaml", settings.dagster_home / "dagster.yaml")
    env = {**os.environ, **settings.as_env(), "DAGSTER_HOME": str(settings.dagster_home)}
    with DagsterService(settings.dagster_home, free_port(), env=env) as service:
        yield service


def test_the_ui_paths_work_on_a_real_webserver_and_daemon(settings, lake, shop, dagster):
    tables, files = shop
    assert len(files) == 12
    instance = dg.DagsterInstance.get()
    runs = DemoRuns(dagster, instance)

    # The loop's automation is on without anyone switching it on.
    states = dagster.automation()
    assert {name for name, status in states.items() if status == "RUNNING"} >= LOOP, states
    assert "stream_health" not in states  # no broker configured: no sensor skipping every 30 s

    # 12 files at once: one sensor-launched run each, all succeed, queued so no two write one table at once.
    landed = runs.wait_for_files(files)
    ingests = [r for r in instance.get_runs() if r.job_name.startswith("ingest_")]
    assert len(ingests) == 12 and all(r.is_success for r in ingests)
    assert all(outcome.success for outcome in landed.values())
    records = instance.get_run_records(dg.RunsFilter(run_ids=[r.run_id for r in ingests]))
    by_table: dict[str, list] = {}
    for record in records:
        by_table.setdefault(record.dagster_run.job_name, []).append((record.start_time, record.end_time))
    for job, spans in by_table.items():
        spans.sort()
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), f"{job} runs overlapped: {spans}"
    # Every event landed exactly once.
    for source in ("signups", "clicks", "transactions", "churn_labels"):
        ids = lake.read(f"raw.{source}", columns=["event_id"]).column("event_id")
        assert len(ids) == len(pc.unique(ids)), source
        expected = set(tables[source].column("event_id").to_pylist()) | (
            {"fix-0001"} if source == "transactions" else set()
        )
        assert set(ids.to_pylist()) == expected, source

    # A partition-range backfill of a feature group, as the UI's partition dialog launches it.
    days = [(project.start_date + dt.timedelta(days=i)).isoformat() for i in range(30)]
    backfill = dagster.backfill([["features", "user_transactions"]], days)
    status, backfill_runs = dagster.wait_for_backfill(backfill)
    assert status == "COMPLETED_SUCCESS" and backfill_runs and set(backfill_runs.values()) == {"SUCCESS"}
    assert instance.get_materialized_partitions(dg.AssetKey(["features", "user_transactions"])) == set(days)

    # "Materialize" on a published table: it stages, audits (its check) and publishes in one run.
    run_id = dagster.materialize([["features", "user_profile"]], partition=days[-1])
    assert dagster.wait_for_runs([run_id])[run_id] == "SUCCESS"
    outcome = runs.outcome(run_id)
    (check,) = outcome.checks
    assert check.check_name == "audit" and check.passed
    assert outcome.metadata("features/user_profile")["dagster/row_count"] > 0
    assert lake.partition_rows("features.user_profile")

    # The graph tells the story: one node per table, connected from the sources to monitoring.
    edges = dagster.asset_edges()
    missing = [edge for edge in STORY if edge not in edges]
    assert not missing, missing
    assert not [key for edge in edges for key in edge if key.endswith("_staged")]
    # The retrain loop: the retrain sensor targets the model's assets.
    assert "retrain_churn" in dagster.instigators_of(["models", "churn_challenger"])
