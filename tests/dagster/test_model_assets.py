"""The model assets (train, gate, promote) against a real file-backed MLflow, and the retrain sensor."""

import json

import dagster as dg
import pytest

from assets.models import model_definitions
from keel.models import promotion, registry
from keel.models.registry_client import ModelRegistryError
from keel.project import Project
from resources import resource_definitions
from sensors.retrain import retrain_sensor
from tests.factories.dagster_runs import run_train
from tests.factories.features import land
from tests.factories.models import land_labels, spec, synthetic

# MLflow's SQL store declares its relationships with lazy="noload", deprecated in SQLAlchemy 2.1; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning")
CHALLENGER = dg.AssetKey(["models", "churn_challenger"])
CHAMPION = dg.AssetKey(["models", "churn_champion"])


@pytest.fixture
def project(model_project) -> Project:
    return model_project


def materialized(result, key: dg.AssetKey) -> dict:
    events = [e for e in result.get_asset_materialization_events() if e.asset_key == key]
    return {k: v.value for k, v in events[-1].materialization.metadata.items()} if events else {}


def gate_evaluation(result) -> dg.AssetCheckEvaluation:
    (evaluation,) = [e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    return evaluation


def test_definitions_hold_the_assets_job_schedule_and_dependencies(project, buyer, outcomes, settings):
    defs = dg.Definitions.merge(model_definitions(project, [spec(buyer, outcomes)]), resource_definitions(settings))
    graph = defs.resolve_asset_graph()
    assert graph.get(CHALLENGER).parent_keys == {
        dg.AssetKey(["features", "spend"]),
        dg.AssetKey(["features", "spend_ratio"]),
        dg.AssetKey(["raw", "outcomes"]),
    }
    assert graph.get(CHAMPION).parent_keys == {CHALLENGER}
    (gates,) = graph.get_check_keys_for_assets({CHALLENGER})
    assert gates.name == "gates" and graph.get_check_spec(gates).blocking
    retry = defs.resolve_assets_def(CHALLENGER).op.retry_policy
    assert (retry.max_retries, retry.delay, retry.backoff) == (2, 10, dg.Backoff.EXPONENTIAL)
    schedule = defs.resolve_schedule_def("train_churn_daily")
    assert (schedule.cron_schedule, schedule.execution_timezone, schedule.job_name) == (
        "0 2 * * *",
        "UTC",
        "train_churn",
    )


def test_first_version_becomes_champion_and_a_worse_one_is_not_promoted(
    project, lake, payments, outcomes, buyer, settings, instance
):
    rows, labels = synthetic(1)
    land(lake, payments, rows, "p")
    land_labels(lake, outcomes, labels, "l")

    first = run_train(project, settings, instance, spec(buyer, outcomes))
    assert first.success
    assert gate_evaluation(first).passed
    trained = materialized(first, CHALLENGER)
    assert trained["version"] == 1 and trained["run_id"]
    assert trained["holdout_roc_auc"] > 0.8 and json.loads(json.dumps(trained["metrics"]))["roc_auc"] > 0.8
    assert (trained["train_rows"], trained["holdout_rows"], trained["feature_count"]) == (6 * 150, 2 * 150, 5)
    assert set(trained["snapshot_ids"]) == {payments.table_name, outcomes.table_name}
    assert trained["split_time"].startswith("2026-04-12")
    assert (trained["shards"], trained["compute"]) == (1, "in-process") and trained["peak_memory_mib"] > 0
    assert "| feature | importance |" in trained["top_importances"]
    promoted = materialized(first, CHAMPION)
    assert promoted["promoted"] == "yes" and promoted["champion_version"] == 1
    assert "first version" in promoted["reason"]

    # One weak feature instead of five: it passes a low floor but loses to the champion.
    weaker = spec(buyer, outcomes, features=("spend_ratio.big_spender",))
    second = run_train(project, settings, instance, weaker, floors={"churn": 0.5})
    assert second.success
    assert materialized(second, CHALLENGER)["version"] == 2
    kept = materialized(second, CHAMPION)
    assert kept["promoted"] == "no" and kept["champion_version"] == 1 and kept["challenger_version"] == 2
    assert kept["challenger_roc_auc"] < kept["champion_roc_auc"]
    assert "below the required" in kept["reason"]
    # The comparison scored both models on the same rows: the hold-out carried the champion's features too.
    assert kept["comparison_rows"] == trained["holdout_rows"]
    versions = {v.version: v for v in registry.list_versions(settings, "churn")}
    assert "champion" in versions[1].aliases and "challenger" in versions[2].aliases
    assert versions[2].status == "rejected"


def test_a_failed_gate_blocks_promotion(project, lake, payments, outcomes, buyer, settings, instance):
    rows, labels = synthetic(2, shuffle=True)
    land(lake, payments, rows, "p")
    land_labels(lake, outcomes, labels, "l")
    result = run_train(project, settings, instance, spec(buyer, outcomes), floors={"churn": 0.75})
    gates = gate_evaluation(result)
    assert not gates.passed
    assert "hold-out roc_auc=" in gates.description and ">= 0.75" in gates.description
    assert materialized(result, CHALLENGER)["version"] == 1
    assert materialized(result, CHAMPION) == {}
    (only,) = registry.list_versions(settings, "churn")
    assert only.aliases == ("challenger",)
    # The verdict is on the version, so a promotion by hand sees it too.
    assert only.tags["keel.gates"].startswith("failed: hold-out roc_auc=")
    with pytest.raises(ModelRegistryError, match=r"'churn' v1 did not pass its promotion gates .*--ignore-gates"):
        promotion.promote(settings, "churn", 1)
    assert promotion.promote(settings, "churn", 1, ignore_gates=True).aliases == ("champion",)


# The retrain sensor -----------------------------------------------------------------------

MONITORING = dg.AssetKey(["monitoring", "churn_drift"])


def monitoring_run(instance, *, drift_passes: bool, severity=dg.AssetCheckSeverity.ERROR) -> None:
    @dg.asset(key=MONITORING, check_specs=[dg.AssetCheckSpec("drift", asset=MONITORING)])
    def monitoring():
        result = dg.AssetCheckResult(check_name="drift", passed=drift_passes, severity=severity)
        return dg.MaterializeResult(check_results=[result])

    assert dg.materialize([monitoring], instance=instance).success


def tick(sensor, instance, cursor):
    data = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=cursor))
    return data.run_requests or [], data.cursor


def test_the_retrain_sensor_fires_once_per_failure_and_not_again_within_its_cool_down(buyer, outcomes, instance):
    sensor = retrain_sensor(spec(buyer, outcomes))
    assert sensor.name == "retrain_churn" and sensor.job_name == "train_churn"

    monitoring_run(instance, drift_passes=True)
    requests, cursor = tick(sensor, instance, None)
    assert requests == [] and cursor is None

    monitoring_run(instance, drift_passes=False)
    requests, cursor = tick(sensor, instance, cursor)
    assert len(requests) == 1 and requests[0].tags["keel/trigger"] == "monitoring/churn_drift:drift"
    # The same failure is not seen twice.
    assert tick(sensor, instance, cursor)[0] == []

    # A new failure within the cool-down is consumed without a retrain.
    monitoring_run(instance, drift_passes=False)
    requests, later = tick(sensor, instance, cursor)
    assert requests == []
    assert json.loads(later)["last_evaluation_id"] > json.loads(cursor)["last_evaluation_id"]
    assert tick(sensor, instance, later)[0] == []

    # Once the cool-down is over, the next failure retrains again.
    expired = json.dumps({**json.loads(later), "last_retrain_at": json.loads(later)["last_retrain_at"] - 7 * 3600})
    monitoring_run(instance, drift_passes=False)
    requests, _ = tick(sensor, instance, expired)
    assert len(requests) == 1


def test_the_retrain_sensor_watches_only_its_checks(buyer, outcomes, instance):
    other = dg.AssetCheckKey(dg.AssetKey(["monitoring", "fraud"]), "drift")
    sensor = retrain_sensor(spec(buyer, outcomes), checks=[other])
    monitoring_run(instance, drift_passes=False)
    assert tick(sensor, instance, None)[0] == []


def test_a_warning_alerts_but_does_not_retrain(buyer, outcomes, instance):
    sensor = retrain_sensor(spec(buyer, outcomes))
    monitoring_run(instance, drift_passes=False, severity=dg.AssetCheckSeverity.WARN)
    requests, cursor = tick(sensor, instance, None)
    assert requests == []
    monitoring_run(instance, drift_passes=False)
    assert len(tick(sensor, instance, cursor)[0]) == 1
