"""The Prometheus exporter of monitoring results: what it reads from the tables, and a failing read."""

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pytest
from prometheus_client.parser import text_string_to_metric_families

from keel.monitoring.data_quality import QualityTarget, profile_days, quality_rows, write_quality
from keel.monitoring.declarations import MonitorSpec, replace_window
from keel.monitoring.drift import DRIFT_TABLE, SCHEMA, compare_window, drift_rows
from keel.monitoring.performance import PERFORMANCE_TABLE, PerformanceReport, performance_rows
from keel.monitoring.performance import SCHEMA as PERFORMANCE_SCHEMA
from keel.monitoring.prometheus import METRICS, MonitoringCollector, exposition
from tests.factories.drift import reference, traffic

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning")
TODAY = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
YESTERDAY = TODAY - dt.timedelta(days=1)


@pytest.fixture
def monitor(buyer, outcomes):
    from keel.models.spec import ModelSpec

    return MonitorSpec(ModelSpec(name="churn", entity=buyer, features=("spend",), labels=outcomes, label="churned"))


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_the_latest_window_of_each_table_becomes_gauges(lake, settings, monitor):
    # Two windows of drift: only the later (drifted) one is exported.
    earlier = compare_window(monitor, 1, YESTERDAY - dt.timedelta(days=1), YESTERDAY, traffic(300, 1), reference(), {})
    latest = compare_window(
        monitor, 1, YESTERDAY, TODAY, traffic(300, 2, shift=10.0, currency_p=(0.2, 0.3, 0.5)), reference(), {}
    )
    rows = drift_rows([earlier, latest], "run-1")
    replace_window(lake, DRIFT_TABLE, SCHEMA, "churn", YESTERDAY - dt.timedelta(days=1), TODAY, rows, "run-1")
    report = PerformanceReport(
        "churn", 1, "roc_auc", YESTERDAY, TODAY, 300, 250, 50, 0.05, True,
        live={"roc_auc": 0.81}, training={"roc_auc": 0.9},
    )  # fmt: skip
    perf = performance_rows([report], "run-1")
    replace_window(lake, PERFORMANCE_TABLE, PERFORMANCE_SCHEMA, "churn", YESTERDAY, TODAY, perf, "run-1")
    # Two rows two minutes ago, one of them without an amount.
    newest = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(minutes=2)
    events = pa.table(
        {
            "user_id": ["a", "b"],
            "ts": pa.array([newest, newest], pa.timestamp("us", tz="UTC")),
            "amount": [1.0, None],
        }
    )
    lake.ensure_table("raw.things", events.schema, day_column="ts").append(events)
    target = QualityTarget("raw.things", "ts", keys=("user_id",))
    day = [newest.date()]
    write_quality(lake, "raw.things", day, quality_rows(profile_days(lake, target, day), "q"), "q")

    collector = MonitoringCollector(lake, settings, ["churn"], [target], refresh_s=0)
    got = samples(exposition(collector))

    assert got[("keel_dataset_drift", (("model", "churn"),))] == 1.0
    assert got[("keel_drift_share", (("model", "churn"),))] == latest.drift_share
    amount = next(f for f in latest.features if f.name == "amount")
    labels = (("feature", "amount"), ("model", "churn"), ("statistic", "psi"), ("version", "1"))
    assert got[("keel_drift_score", labels)] == pytest.approx(amount.stats.psi)
    assert got[("keel_drift_detected", (("feature", "amount"), ("model", "churn")))] == 1.0
    assert got[("keel_drift_detected", (("feature", "items"), ("model", "churn")))] == 0.0
    assert got[("keel_prediction_mean", (("model", "churn"), ("version", "1")))] == pytest.approx(
        latest.prediction.current_mean
    )
    metric = (("metric", "roc_auc"), ("model", "churn"), ("version", "1"))
    assert got[("keel_model_metric", metric)] == 0.81 and got[("keel_model_training_metric", metric)] == 0.9
    assert got[("keel_feature_null_rate", (("column", "amount"), ("table", "raw.things")))] == 0.5
    freshness = got[("keel_table_freshness_seconds", (("table", "raw.things"),))]
    assert 120 <= freshness < 180
    assert got[("keel_monitoring_up", ())] == 1.0
    assert ("keel_monitoring_updated_timestamp_seconds", (("model", "churn"),)) in got
    # Every exported name is a documented one (deploy/prometheus alerts on these).
    assert {name for name, _ in got} <= set(METRICS)


def test_a_stale_table_still_reports_its_age(lake, settings):
    newest = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(days=10)
    events = pa.table({"user_id": ["a"], "ts": pa.array([newest], pa.timestamp("us", tz="UTC"))})
    lake.ensure_table("raw.stale", events.schema, day_column="ts").append(events)
    target = QualityTarget("raw.stale", "ts", keys=("user_id",))
    got = samples(exposition(MonitoringCollector(lake, settings, [], [target], refresh_s=0)))
    age = got[("keel_table_freshness_seconds", (("table", "raw.stale"),))]
    assert 10 * 86400 <= age < 10 * 86400 + 60


def test_the_deploy_list_of_gauges_is_the_exporters():
    listed = {}
    for line in (Path(__file__).parents[3] / "deploy" / "prometheus" / "metrics.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, labels = line.partition(" ")
            listed[name] = labels.strip()
    assert listed == {name: labels.replace(" ", "") for name, (labels, _) in METRICS.items()}


def test_a_failing_read_reports_down_instead_of_failing_the_scrape(lake, settings, monkeypatch):
    collector = MonitoringCollector(lake, settings, ["churn"], [], refresh_s=0)

    def broken(*args, **kwargs):
        raise OSError("catalog unreachable")

    monkeypatch.setattr(collector, "read", broken)
    got = samples(exposition(collector))
    assert got == {("keel_monitoring_up", ()): 0.0}
