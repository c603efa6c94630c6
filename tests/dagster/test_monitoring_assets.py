"""The monitoring assets on a real registered model: drift and performance checks, the report, the sensors."""

import dataclasses
import datetime as dt
import json
import logging
import re
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import dagster as dg
import numpy as np
import pyarrow.compute as pc
import pytest

from assets.monitoring import drift_checks, drift_key, monitoring_definitions, performance_key
from keel.config import LOCAL_MLFLOW_UI
from keel.inference_log.loader import stage_inference_log
from keel.inference_log.sinks import FileSink, log_root
from keel.inference_log.writer import InferenceLogWriter
from keel.lakehouse import wap
from keel.models import registry
from keel.models.reference import LABEL, PREDICTION, SPLIT, load_reference
from keel.models.registry_client import mlflow_client
from keel.monitoring.declarations import MonitorSpec, Threshold
from keel.monitoring.drift import DRIFT_TABLE, DriftReport, TargetDrift
from keel.monitoring.performance import PERFORMANCE_TABLE
from keel.monitoring.report import ARTIFACT_FOLDER
from keel.monitoring.run import DriftRun
from keel.monitoring.statistics import categorical_drift, numeric_drift
from keel.monitoring.verdicts import NAMED_IN_MESSAGE
from resources import resource_definitions
from sensors.alerts import alert_sensor
from sensors.retrain import retrain_sensor
from tests.factories.dagster_runs import run_train
from tests.factories.features import land
from tests.factories.models import land_labels, spec, synthetic

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning")
QUIET, DRIFTED = dt.date(2026, 5, 10), dt.date(2026, 5, 11)


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

    # The message names every drifted feature, most drifted first, as the metadata lists them.
    listed = drift.metadata["drifted"].value
    assert listed and [e["statistic"] for e in listed] == ["psi"] * len(listed)
    assert (
        re.findall(r"([\w.]+) \(psi [\d.e+-]+, [\d.]+x its threshold\)", drift.description)
        == [e["feature"] for e in listed][:NAMED_IN_MESSAGE]
    )
    times = [e["times_threshold"] for e in listed]
    assert times == sorted(times, reverse=True) and times[-1] >= 1
    assert all(e["value"] == pytest.approx(e["times_threshold"] * e["threshold"], rel=1e-3) for e in listed)

    meta = drifted.asset_materializations_for_node("monitoring__churn_drift")[0].metadata
    report = meta["report"].value
    assert report.endswith(".html") and "<svg" in Path(report).read_text(encoding="utf-8")
    drifted_in_table = {row.split("|")[1].strip() for row in feature_rows(meta) if row.split("|")[5].strip() == "drift"}
    assert drifted_in_table == {e["feature"] for e in listed}
    # The report is an artifact of the judged version's training run, linked as the MLflow UI page showing it.
    client = mlflow_client(settings)
    run = client.get_run(info.run_id)
    artifact = f"{ARTIFACT_FOLDER}/churn/{DRIFTED:%Y-%m-%d}T0000.html"
    assert meta["report_artifact"].value == f"runs:/{info.run_id}/{artifact}"
    url = urlsplit(meta["report_url"].value)
    assert isinstance(meta["report_url"], dg.UrlMetadataValue)
    assert f"{url.scheme}://{url.netloc}" == LOCAL_MLFLOW_UI  # the embedded store's UI, `make mlflow-ui`
    assert url.fragment == f"/experiments/{run.info.experiment_id}/runs/{info.run_id}/artifacts/{artifact}"
    logged = Path(client.download_artifacts(info.run_id, artifact, str(settings.home / "downloaded")))
    assert logged.read_text(encoding="utf-8") == Path(report).read_text(encoding="utf-8")
    assert f"run {drifted.run_id}" in logged.read_text(encoding="utf-8")
    assert "| feature |" in meta["latest_features"].value and meta["latest_drift_share"].value >= 0.5
    # The plots open in the UI itself: the drifted share over time, the prediction and the top features.
    plots = meta["plots"].value
    assert plots.startswith("**Share of features drifted, by window**")
    assert plots.count("](data:image/svg+xml;base64,") == 1 + 1 + min(4, len(feature_rows(meta)))

    rows = lake.read(DRIFT_TABLE)
    days = {r["window_start"].date(): r["level"] for r in rows.to_pylist() if r["target"] == "dataset"}
    assert days == {QUIET: "ok", DRIFTED: "drift"}
    # A rerun of a window replaces its rows, and its report in the run.
    rerun = job.execute_in_process(instance=instance, partition_key=DRIFTED.isoformat())
    assert lake.read(DRIFT_TABLE).num_rows == rows.num_rows
    # One report per window: the quiet day's, and the drifted day's replaced.
    folder = f"{ARTIFACT_FOLDER}/churn"
    assert [f.path for f in client.list_artifacts(info.run_id, folder)] == [f"{folder}/{QUIET}T0000.html", artifact]
    again = Path(client.download_artifacts(info.run_id, artifact, str(settings.home / "downloaded-again")))
    assert f"run {rerun.run_id}" in again.read_text(encoding="utf-8")

    # A report MLflow will not take (a file where its folder goes) is a warning, not lost drift results.
    artifacts = Path(urlsplit(run.info.artifact_uri).path)
    shutil.rmtree(artifacts / ARTIFACT_FOLDER)
    (artifacts / ARTIFACT_FOLDER).write_text("in the way")
    unlogged = job.execute_in_process(instance=instance, partition_key=DRIFTED.isoformat())
    assert unlogged.success
    assert not evaluations(unlogged)["drift"].passed
    meta = unlogged.asset_materializations_for_node("monitoring__churn_drift")[0].metadata
    assert "report_url" not in meta and Path(meta["report"].value).is_file()
    error = meta["report_url_error"].value
    assert error.startswith(f"drift report of model 'churn' v{info.version} (run {info.run_id}), window ")
    warnings = [e.user_message for e in instance.all_logs(unlogged.run_id) if e.level == logging.WARNING]
    assert error in warnings

    # Both days in one run: each day's materialization speaks of its own window; the judged (latest)
    # one also carries the statistics, plots and report; the drift check lists the run's windows.
    both = job.execute_in_process(
        instance=instance,
        tags={"dagster/asset_partition_range_start": str(QUIET), "dagster/asset_partition_range_end": str(DRIFTED)},
    )
    by_day = {
        e.materialization.partition: e.materialization.metadata
        for e in both.get_asset_materialization_events()
        if e.materialization.asset_key == drift_key("churn")
    }
    assert {day: meta["level"].value for day, meta in by_day.items()} == {str(QUIET): "ok", str(DRIFTED): "drift"}
    assert by_day[str(QUIET)]["drifted"].value == [] and by_day[str(DRIFTED)]["drifted"].value
    assert "plots" in by_day[str(DRIFTED)] and "plots" not in by_day[str(QUIET)]
    performance = {
        e.materialization.partition: e.materialization.metadata
        for e in both.get_asset_materialization_events()
        if e.materialization.asset_key == performance_key("churn")
    }
    assert sorted(performance) == [str(QUIET), str(DRIFTED)]
    assert all(meta["predictions"].value > 0 and "versions" in meta for meta in performance.values())
    overview = evaluations(both)["drift"].metadata["windows_in_run"].value
    assert f"| {QUIET} 00:00 |" in overview and f"| {DRIFTED} 00:00 |" in overview

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


def drifted_report(drifted: dict[str, tuple[str, float]], quiet: int) -> DriftReport:
    """A judged window whose features ``drifted`` (name -> statistic, value) drifted, and ``quiet`` did not."""
    rng = np.random.default_rng(0)
    numeric = numeric_drift(rng.normal(size=300), rng.normal(size=300))
    categorical = categorical_drift(np.array(["a", "b"] * 150), np.array(["a", "b"] * 150))
    thresholds = {"psi": Threshold("psi", 0.2, warn=0.1), "js": Threshold("js", 0.1, warn=0.05)}
    features = []
    for name, (statistic, value) in drifted.items():
        stats = dataclasses.replace(numeric if statistic == "psi" else categorical, **{statistic: value})
        kind = "numeric" if statistic == "psi" else "categorical"
        features.append(TargetDrift("feature", name, kind, thresholds[statistic], stats))
    features += [
        TargetDrift("feature", f"quiet_{i:02d}", "numeric", thresholds["psi"], dataclasses.replace(numeric, psi=0.01))
        for i in range(quiet)
    ]
    start = dt.datetime.combine(DRIFTED, dt.time(), dt.UTC)
    return DriftReport(
        model="churn",
        version=3,
        start=start,
        end=start + dt.timedelta(days=1),
        rows=500,
        sample_rows=500,
        reference_rows=1000,
        min_rows=100,
        drift_share_threshold=0.5,
        weighted=False,
        features=features,
    )


def brute_force_order(drifted: dict[str, tuple[str, float]]) -> list[str]:
    """Most drifted first, picked one at a time: the largest value over its threshold (PSI 0.2,
    Jensen-Shannon 0.1) of those left. The tests' values have no ties."""
    ratios = {name: value / {"psi": 0.2, "js": 0.1}[statistic] for name, (statistic, value) in drifted.items()}
    out = []
    while ratios:
        top = max(ratios, key=ratios.__getitem__)
        out.append(top)
        del ratios[top]
    return out


def test_the_drift_message_names_few_drifted_features_all_most_drifted_first(buyer, outcomes):
    # By value alone amount (0.6) would come before currency (0.4); past its threshold, currency is further.
    drifted = {"amount": ("psi", 0.6), "currency": ("js", 0.4), "items": ("psi", 1.9)}

    (check, *_) = drift_checks(DriftRun([drifted_report(drifted, quiet=2)]), MonitorSpec(spec(buyer, outcomes)))

    assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
    assert check.description == (
        "dataset drift: 3 of 5 features drifted (60%) in 2026-05-11 00:00; most drifted first: "
        "items (psi 1.9, 9.5x its threshold), currency (js 0.4, 4x its threshold), "
        "amount (psi 0.6, 3x its threshold)"
    )


def test_the_drift_message_names_the_top_drifted_features_and_counts_the_rest(buyer, outcomes):
    rng = np.random.default_rng(7)
    values = rng.permutation(np.linspace(0.3, 1.8, 14))
    drifted = {f"f{i:02d}": ("js", float(v) / 2) if i % 3 == 0 else ("psi", float(v)) for i, v in enumerate(values)}
    order = brute_force_order(drifted)

    (check, *_) = drift_checks(DriftRun([drifted_report(drifted, quiet=12)]), MonitorSpec(spec(buyer, outcomes)))

    assert check.description.startswith("dataset drift: 14 of 26 features drifted (54%) in 2026-05-11 00:00; ")
    named = re.findall(r"(f\d\d) \((?:psi|js) ", check.description)
    assert named == order[:NAMED_IN_MESSAGE] and len(named) == 10
    assert check.description.endswith(", and 4 more (all in the metadata's 'drifted')")
    listed = check.metadata["drifted"].value
    assert [e["feature"] for e in listed] == order
    assert [(e["statistic"], e["value"]) for e in listed] == [drifted[name] for name in order]


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
    for key in (drift_key("churn"), performance_key("churn")):
        assert graph.get(key).parent_keys == {
            dg.AssetKey(["monitoring", "inference_log"]),
            dg.AssetKey(["raw", "outcomes"]),
            dg.AssetKey(["models", "churn_champion"]),
        }
    assert defs.resolve_assets_def(drift_key("churn")).op.pool == "monitoring.drift"
    checks = {k.name for k in graph.get_check_keys_for_assets({drift_key("churn"), performance_key("churn")})}
    assert checks == {"drift", "prediction_drift", "label_drift", "performance"}
    schedule = defs.resolve_schedule_def("monitor_churn_daily")
    context = dg.build_schedule_context(scheduled_execution_time=dt.datetime(2026, 6, 20, 1, tzinfo=dt.UTC))
    requests = schedule.evaluate_tick(context).run_requests
    # Yesterday, and the day whose labels (30 days late, matched up to 7 days on) have landed since.
    assert [r.tags["dagster/asset_partition_range_start"] for r in requests] == ["2026-05-13", "2026-06-19"]


def test_an_hourly_monitor_has_hourly_partitions_and_windows(model_project, buyer, outcomes, settings):
    from keel.monitoring.run import windows

    monitor = MonitorSpec(spec(buyer, outcomes), partitions="hourly")
    defs = dg.Definitions.merge(monitoring_definitions(model_project, [monitor]), resource_definitions(settings))
    partitions = defs.resolve_assets_def(drift_key("churn")).partitions_def
    assert isinstance(partitions, dg.HourlyPartitionsDefinition)
    start = dt.datetime(2026, 5, 1, 22, tzinfo=dt.UTC)
    tiles = windows(start, start + dt.timedelta(hours=3), "hourly")
    assert [(a.hour, b.hour) for a, b in tiles] == [(22, 23), (23, 0), (0, 1)]
    assert len(windows(start, start + dt.timedelta(days=2), "daily")) == 2
