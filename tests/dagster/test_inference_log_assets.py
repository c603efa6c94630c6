"""The inference log asset: stage -> blocking audit -> publish in one asset, per day partition."""

import datetime as dt

import dagster as dg
import pytest

from assets.inference_log import JOB_NAME, PUBLISHED_KEY, inference_log_definitions
from keel.inference_log.records import TABLE
from keel.inference_log.writer import InferenceLogWriter
from keel.project import Project
from resources import resource_definitions
from sensors.landing import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
from tests.factories.inference_log import on_day

FIRST = dt.date(2026, 3, 10)
LAST = FIRST + dt.timedelta(days=1)
SERVING = dg.AssetKey(["serving", "churn"])


@pytest.fixture
def defs(payments, settings):
    project = Project(name="t", sources=(payments,), start_date=dt.date(2026, 3, 1))
    return dg.Definitions.merge(
        inference_log_definitions(project, [SERVING]),
        resource_definitions(settings),
    )


def materialized(result) -> dict[str, dict]:
    """The metadata of the run's materializations, by partition."""
    events = result.get_asset_materialization_events()
    return {e.materialization.partition: {k: v.value for k, v in e.materialization.metadata.items()} for e in events}


def check_of(result):
    (check,) = [e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    return check


def test_definitions_hold_the_assets_check_job_and_schedule(defs):
    graph = defs.resolve_asset_graph()
    assert graph.get(PUBLISHED_KEY).parent_keys == {SERVING}
    (audit,) = graph.get_check_keys_for_assets({PUBLISHED_KEY})
    assert audit.name == "audit" and graph.get_check_spec(audit).blocking
    asset = defs.resolve_assets_def(PUBLISHED_KEY)
    assert asset.partitions_def.start.date() == dt.date(2026, 3, 1)
    assert asset.backfill_policy == dg.BackfillPolicy.single_run()
    schedule = defs.resolve_schedule_def(f"{JOB_NAME}_daily")
    assert (schedule.cron_schedule, schedule.job_name) == ("30 0 * * *", JOB_NAME)


def test_a_range_is_loaded_audited_and_published_in_one_run(defs, settings, lake, instance):
    writer = InferenceLogWriter.from_settings(settings, flush_interval_s=0.01)
    records = on_day(FIRST, 20) + on_day(LAST, 12, start=100, alias="challenger", shadow=True, degraded=True)
    for r in records:
        writer.log(r)
    assert writer.close().written == 32

    job = defs.resolve_job_def(JOB_NAME)
    tags = {ASSET_PARTITION_RANGE_START_TAG: FIRST.isoformat(), ASSET_PARTITION_RANGE_END_TAG: LAST.isoformat()}
    result = job.execute_in_process(instance=instance, tags=tags)
    assert result.success
    check = check_of(result)
    assert check.passed
    # The run's figures are on the audit check ...
    run = {k: v.value for k, v in check.metadata.items()}
    assert f"| {FIRST} | 20 |" in run["rows_per_day"] and f"| {LAST} | 12 |" in run["rows_per_day"]
    assert "| churn | 3 | challenger | yes | 12 |" in run["rows_per_model"]
    assert "| churn | 3 | champion |  | 20 |" in run["rows_per_model"]
    assert 1 <= run["latency_ms_p50"] <= run["latency_ms_p95"] <= run["latency_ms_p99"] <= 10
    assert run["degraded_share"] == pytest.approx(sum(r.degraded for r in records) / 32)
    assert run["kafka_records_read"] == "kafka not configured" and run["records_quarantined"] == 0
    # ... and each day's materialization describes that day.
    days = materialized(result)
    assert days[FIRST.isoformat()]["dagster/row_count"] == days[FIRST.isoformat()]["records"] == 20
    assert days[LAST.isoformat()]["dagster/row_count"] == 12
    assert "req-100:churn:challenger:shadow" in days[LAST.isoformat()]["preview"]
    assert "req-100" not in days[FIRST.isoformat()]["preview"]
    assert lake.partition_rows(TABLE) == {FIRST: 20, LAST: 12}


def test_an_empty_day_is_not_published_unless_allowed(defs, lake, instance):
    job = defs.resolve_job_def(JOB_NAME)
    failed = job.execute_in_process(instance=instance, partition_key=FIRST.isoformat(), raise_on_error=False)
    check = check_of(failed)
    assert not check.passed and "rerun with allow_empty_days" in check.description
    assert not failed.get_asset_materialization_events()
    assert lake.partition_rows(TABLE) == {}
    head = lake.head(TABLE)

    config = {"ops": {"monitoring__inference_log": {"config": {"allow_empty_days": True}}}}
    allowed = job.execute_in_process(instance=instance, partition_key=FIRST.isoformat(), run_config=config)
    assert allowed.success and check_of(allowed).passed
    assert lake.head(TABLE) != head and lake.partition_rows(TABLE) == {}
