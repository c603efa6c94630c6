"""The batch prediction asset: stage -> blocking audit -> publish in one asset, per day partition."""

import datetime as dt
import logging

import dagster as dg
import pytest

from assets.predictions import prediction_definitions
from keel.features.materialize import backfill
from keel.models import promotion, registration
from keel.models.batch_predict import predictions_table
from keel.models.training import train
from keel.project import Project
from keel.store import FeatureStore
from resources import resource_definitions
from sensors.landing import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
from tests.factories.features import land
from tests.factories.models import START, land_labels, spec, synthetic

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning")
PUBLISHED = dg.AssetKey(["predictions", "churn"])
FIRST = (START + dt.timedelta(weeks=6)).date()
LAST = FIRST + dt.timedelta(days=3)


@pytest.fixture
def project(model_project) -> Project:
    return model_project


@pytest.fixture
def defs(project, buyer, outcomes, settings):
    return dg.Definitions.merge(
        prediction_definitions(project, [spec(buyer, outcomes)]), resource_definitions(settings)
    )


def test_definitions_hold_the_assets_check_job_and_schedule(defs):
    graph = defs.resolve_asset_graph()
    assert graph.get(PUBLISHED).parent_keys == {
        dg.AssetKey(["models", "churn_champion"]),
        dg.AssetKey(["features", "spend"]),
        dg.AssetKey(["features", "spend_ratio"]),
    }
    (audit,) = graph.get_check_keys_for_assets({PUBLISHED})
    assert audit.name == "audit" and graph.get_check_spec(audit).blocking
    assert defs.resolve_assets_def(PUBLISHED).partitions_def.start.date() == START.date()
    schedule = defs.resolve_schedule_def("predict_churn_daily")
    assert (schedule.cron_schedule, schedule.job_name) == ("0 3 * * *", "predict_churn")


def test_a_partition_range_is_scored_audited_and_published_in_one_run(
    defs, project, lake, payments, outcomes, buyer, settings, instance
):
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    rows, labels = synthetic(2)
    land(lake, payments, rows, "p")
    land_labels(lake, outcomes, labels, "l")
    store = FeatureStore(lake, project)
    for group in project.feature_groups:
        assert backfill(store, group, FIRST, LAST, run_id=f"fg-{group.name}")[2] is not None
    model = spec(buyer, outcomes)
    info = registration.log_and_register(
        settings, model, train(store, model, now=dt.datetime(2030, 1, 1, tzinfo=dt.UTC))
    )
    promotion.promote(settings, "churn", info.version)

    job = defs.resolve_job_def("predict_churn")
    tags = {ASSET_PARTITION_RANGE_START_TAG: FIRST.isoformat(), ASSET_PARTITION_RANGE_END_TAG: LAST.isoformat()}
    result = job.execute_in_process(instance=instance, tags=tags)
    assert result.success
    (check,) = [e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    assert check.passed
    run = {k: v.value for k, v in check.metadata.items()}
    table = lake.read(predictions_table(model))
    assert run["model_version"] == info.version and run["model_run_id"] == info.run_id
    assert "p50" in run["prediction_deciles"] and 0 < run["prediction_mean"] < 1
    days = {e.materialization.partition: e.materialization.metadata for e in result.get_asset_materialization_events()}
    assert sorted(days) == [(FIRST + dt.timedelta(days=i)).isoformat() for i in range(4)]
    assert sum(m["dagster/row_count"].value for m in days.values()) == table.num_rows > 0
    for meta in days.values():
        assert meta["entities"].value == meta["dagster/row_count"].value
        assert meta["model_version"].value == info.version and 0 < meta["mean_prediction"].value < 1
    assert set(table.column("run_id").to_pylist()) == {result.run_id}

    # A day with no features fails with the fix and publishes nothing.
    head = lake.head(predictions_table(model))
    late = (LAST + dt.timedelta(days=1)).isoformat()
    failed = job.execute_in_process(instance=instance, partition_key=late, raise_on_error=False)
    assert not failed.success
    (failure,) = [e for e in failed.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "materialize those days of the feature groups first" in failure.event_specific_data.error.message
    assert lake.head(predictions_table(model)) == head
