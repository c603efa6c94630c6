"""The model_registry sensor through evaluate_tick, over a real file-backed MLflow registry."""

import json
import logging

import dagster as dg
import pytest

from assets.models import champion_key
from keel.models import promotion, registry
from keel.models.registry_client import mlflow_client
from keel.models.role_types import Request
from keel.models.roles import settle
from resources import mlflow_resource
from sensors.model_registry import model_registry_sensor, model_registry_sensor_definitions
from tests.factories.dagster_runs import run_train
from tests.factories.features import land
from tests.factories.models import land_labels, spec, synthetic
from tests.factories.registry import person_moves_stage

# MLflow's SQL store declares its relationships with lazy="noload", deprecated in SQLAlchemy 2.1; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning")
CHAMPION = dg.AssetKey(["models", "churn_champion"])


@pytest.fixture
def model(buyer, outcomes):
    return spec(buyer, outcomes)


@pytest.fixture
def client(settings):
    """'churn' with three versions, v1 the challenger, as registration leaves it (no artifacts: roles load none)."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    client = mlflow_client(settings)
    client.create_registered_model("churn")
    experiment = client.create_experiment("churn")
    for _ in range(3):
        run = client.create_run(experiment)
        client.create_model_version("churn", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    settle(client, "churn", Request("automatic", challenger=1))
    return client


def tick(sensor, instance, settings, cursor):
    """One evaluation; its materializations are stored as the daemon stores them."""
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"mlflow": mlflow_resource(settings)})
    data = sensor.evaluate_tick(context)
    for event in data.asset_events:
        instance.report_runless_asset_event(event)
    metadata = [{k: v.value for k, v in e.metadata.items()} for e in data.asset_events]
    return metadata, data.cursor, data.skip_message


def test_the_definitions_hold_one_running_sensor(model):
    defs = model_registry_sensor_definitions([model])
    sensor = defs.resolve_sensor_def("model_registry")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert sensor.minimum_interval_seconds == 30
    assert "churn" in sensor.description and "models/<name>_champion" in sensor.description


def test_each_champion_change_outside_the_train_job_is_recorded_once(model, settings, client, instance):
    sensor = model_registry_sensor([model])
    events, cursor, skipped = tick(sensor, instance, settings, None)
    assert events == [] and "no champion changed" in skipped  # a challenger, never a champion yet

    promotion.promote(settings, "churn", 1)  # keel models promote
    events, cursor, _ = tick(sensor, instance, settings, cursor)
    champion = registry.get_version(settings, "churn", "champion")
    assert events == [
        {
            "champion_version": 1,
            "previous_champion_version": "none",
            "how": "manual",
            "when": champion.tags["promoted_at"],
        }
    ]
    assert tick(sensor, instance, settings, cursor)[0] == []
    assert json.loads(cursor)["churn"] == [1, champion.tags["promoted_at"]]

    # A person moves v2 to Production in the MLflow UI: the sensor settles it and records it.
    person_moves_stage(client, "churn", 2, "Production")
    events, cursor, _ = tick(sensor, instance, settings, cursor)
    assert [(e["champion_version"], e["previous_champion_version"], e["how"]) for e in events] == [
        (2, 1, "mlflow-stage")
    ]
    assert client.get_registered_model("churn").aliases == {"champion": 2}
    assert tick(sensor, instance, settings, cursor)[0] == []

    # Archiving that champion rolls back to v1, the one it retired.
    person_moves_stage(client, "churn", 2, "Archived")
    events, cursor, _ = tick(sensor, instance, settings, cursor)
    assert [(e["champion_version"], e["previous_champion_version"], e["how"]) for e in events] == [
        (1, 2, "mlflow-stage")
    ]
    latest = instance.get_latest_materialization_event(champion_key(model)).asset_materialization
    assert latest.metadata["champion_version"].value == 1

    # A sensor that lost its cursor does not record the same champion again.
    assert tick(sensor, instance, settings, None)[0] == []

    # With nothing to roll back to, the asset says there is no champion.
    person_moves_stage(client, "churn", 1, "Archived")
    events, cursor, _ = tick(sensor, instance, settings, cursor)
    assert [(e["champion_version"], e["previous_champion_version"]) for e in events] == [("none", 1)]


def test_a_promotion_the_champion_asset_recorded_is_not_recorded_again(
    project_for_training, lake, payments, outcomes, buyer, settings, instance
):
    rows, labels = synthetic(1)
    land(lake, payments, rows, "p")
    land_labels(lake, outcomes, labels, "l")
    model = spec(buyer, outcomes)
    trained = run_train(project_for_training, settings, instance, model)
    assert trained.success
    sensor = model_registry_sensor([model])
    events, cursor, skipped = tick(sensor, instance, settings, None)
    assert events == [] and json.loads(cursor)["churn"][0] == 1
    assert "no champion changed outside the train job" in skipped


@pytest.fixture
def project_for_training(model_project):
    return model_project
