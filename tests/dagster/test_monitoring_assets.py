"""The monitoring assets on a real registered model: drift and performance checks, the report, the sensors."""

import datetime as dt
import json
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow.compute as pc
import pytest

from assets.monitoring import drift_key, monitoring_definitions, performance_key
from keel import model_registry as registry
from keel import wap
from keel.drift import DRIFT_TABLE
from keel.inference_log import FileSink, InferenceLogWriter, log_root
from keel.inference_log_load import stage_inference_log
from keel.monitoring import MonitorSpec
from keel.performance import PERFORMANCE_TABLE
from keel.reference import LABEL, PREDICTION, SPLIT, load_reference
from resources import resource_definitions
from sensors.alerts import alert_sensor
from sensors.retrain import retrain_sensor
from tests.dagster.test_model_assets import run_train
from tests.keel.test_models import land_labels, spec, synthetic
from tests.keel.test_store import land

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning")
QUIET, DRIFTED = dt.date(2026, 5, 10), dt.date(2026, 5, 11)


@pytest.fixture
def instance(keel_home):
    with dg.instance_for_test() as instance:
        yield instance


def feature_rows(meta) -> list[str]:
    return [line for line in meta["latest_features"].value.splitlines()[2:] if line.strip()]


def log_day(settings, day: dt.date, sample, features, *, scale: float) -> None:
    """400 answers on ``day``: the reference's rows, their numbers multiplied by ``scale``."""
    rng = np.random.default_rng(day.toordinal())
    rows = sample.take(rng.integers(0, sample.num_rows, 400)).to_pylist()
    start = dt.datetime.combine(day, dt.time(), dt.UTC)
    with InferenceLogWriter(FileSink(log_root(settings))) as writer:
        for i, row in enumerate(rows):
            vector = {f: row[f] * scale if isinstance(row[f], float) else row[f] for f in features}
            writer.log(
                {
                    "request_id": f"{day}-{i}",
                    "ts": start + dt.timedelta(minutes=3 * i),
                    "model": "churn",
                    "version": 1,
                    "alias": "champion",
                    "entity_id": f"u{i % 150}",
                    "features": vector,
                    "prediction": row[PREDICTION],
                    "latency_ms": 1.0,
                }
            )


def test_drift_fails_on_drifted_traffic_alerts_once_and_starts_one_retrain(
    model_project, lake, payments, outcomes, buyer, settings, instance
):
    rows, labels = synthetic(1)
    land(lake, payments, rows, "p")
    land_labels(lake, outcomes, labels, "l")
    model = spec(buyer, outcomes)
    assert run_train(model_project, settings, instance, model).success
    info = registry.get_version(settings, "churn", "champion")
    sample = load_reference(settings, "churn", info.version, info.run_id)
    assert set(sample.column(SPLIT).to_pylist()) == {"train", "holdout"} and LABEL in sample.column_names
    log_day(settings, QUIET, sample, info.features, scale=1.0)
    log_day(settings, DRIFTED, sample, info.features, scale=3.0)
    loaded = stage_inference_log(lake, settings, [QUIET, DRIFTED], "load-1")
    wap.publish(lake, loaded.staged)

    monitor = MonitorSpec(model, min_rows=100, min_labels=20)
    defs = dg.Definitions.merge(monitoring_definitions(model_project, [monitor]), resource_definitions(settings))
    job = defs.resolve_job_def("monitor_churn")

    quiet = job.execute_in_process(instance=instance, partition_key=QUIET.isoformat())
    checks = evaluations(quiet)
    assert checks["drift"].passed and checks["prediction_drift"].passed, checks["drift"].description
    drifted = job.execute_in_process(instance=instance, partition_key=DRIFTED.isoformat())
    checks = evaluations(drifted)
    drift = checks["drift"]
    assert not drift.passed and drift.severity == dg.AssetCheckSeverity.ERROR
    assert drift.description.startswith("dataset drift:")
    assert checks["prediction_drift"].passed  # the scores were logged unchanged

    meta = drifted.asset_materializations_for_node("monitoring__churn_drift")[0].metadata
    report = meta["report"].value
    assert report.endswith(".html") and "<svg" in Path(report).read_text(encoding="utf-8")
    assert "| feature |" in meta["latest_features"].value and meta["latest_drift_share"].value >= 0.5
    # The plots open in the UI itself: the drifted share over time, the prediction and the top features.
    plots = meta["plots"].value
    assert plots.startswith("**Share of features drifted, by window**")
    assert plots.count("](data:image/svg+xml;base64,") == 1 + 1 + min(4, len(feature_rows(meta)))

    rows = lake.read(DRIFT_TABLE)
    days = {r["window_start"].date(): r["level"] for r in rows.to_pylist() if r["target"] == "dataset"}
    assert days == {QUIET: "ok", DRIFTED: "drift"}
    # A rerun of a window replaces its rows.
    job.execute_in_process(instance=instance, partition_key=DRIFTED.isoformat())
    assert lake.read(DRIFT_TABLE).num_rows == rows.num_rows

    # The live metrics were computed on the labels known for each window.
    perf = lake.read(PERFORMANCE_TABLE)
    assert set(pc.unique(perf.column("metric")).to_pylist()) >= {"roc_auc", "precision", "recall", "brier", "ece"}
    assert checks["performance"].passed is not None

    # The sensors: one alert for the failing check, one retrain request for it.
    requests = retrain_sensor(model).evaluate_tick(dg.build_sensor_context(instance=instance)).run_requests
    assert len(requests) == 1 and requests[0].tags["keel/trigger"] == "monitoring/churn_drift:drift"
    keys = [k for a in monitoring_definitions(model_project, [monitor]).assets for k in a.check_keys]
    alerts = alert_sensor(keys, settings_factory=lambda: settings)
    alerts.evaluate_tick(dg.build_sensor_context(instance=instance))
    sent = [json.loads(line) for line in settings.alert_file.read_text().splitlines()]
    firing = [a for a in sent if a["status"] == "firing"]
    assert [a["condition"] for a in firing if a["severity"] == "ERROR"] == ["monitoring/churn_drift:drift"]
    assert all(a["run_url"].startswith("http://127.0.0.1:3000/runs/") for a in firing)


def evaluations(result) -> dict[str, dg.AssetCheckEvaluation]:
    return {
        e.event_specific_data.check_name: e.event_specific_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }


def test_definitions_hold_the_assets_checks_job_and_schedule(model_project, buyer, outcomes, settings):
    monitor = MonitorSpec(spec(buyer, outcomes), label_delay="30d")
    defs = dg.Definitions.merge(monitoring_definitions(model_project, [monitor]), resource_definitions(settings))
    graph = defs.resolve_asset_graph()
    assert graph.get(drift_key("churn")).parent_keys == {
        dg.AssetKey(["monitoring", "inference_log"]),
        dg.AssetKey(["raw", "outcomes"]),
    }
    checks = {k.name for k in graph.get_check_keys_for_assets({drift_key("churn"), performance_key("churn")})}
    assert checks == {"drift", "prediction_drift", "label_drift", "performance"}
    schedule = defs.resolve_schedule_def("monitor_churn_daily")
    context = dg.build_schedule_context(scheduled_execution_time=dt.datetime(2026, 6, 20, 1, tzinfo=dt.UTC))
    requests = schedule.evaluate_tick(context).run_requests
    # Yesterday, and the day whose labels (30 days late, matched up to 7 days on) have landed since.
    assert [r.tags["dagster/asset_partition_range_start"] for r in requests] == ["2026-05-13", "2026-06-19"]


def test_an_hourly_monitor_has_hourly_partitions_and_windows(model_project, buyer, outcomes, settings):
    from keel.monitor import windows

    monitor = MonitorSpec(spec(buyer, outcomes), partitions="hourly")
    defs = dg.Definitions.merge(monitoring_definitions(model_project, [monitor]), resource_definitions(settings))
    partitions = defs.resolve_assets_def(drift_key("churn")).partitions_def
    assert isinstance(partitions, dg.HourlyPartitionsDefinition)
    start = dt.datetime(2026, 5, 1, 22, tzinfo=dt.UTC)
    tiles = windows(start, start + dt.timedelta(hours=3), "hourly")
    assert [(a.hour, b.hour) for a, b in tiles] == [(22, 23), (23, 0), (0, 1)]
    assert len(windows(start, start + dt.timedelta(days=2), "daily")) == 2
