"""The ``model_registry`` sensor: roles a person changes in MLflow are settled, and Dagster hears
of every champion the train job did not promote itself.

Every 30 s, per declared model, ``keel.models.roles.settle`` folds in what moved in MLflow
since the last settle (an alias moved, a stage transitioned in the UI) and writes aliases,
stages and version tags to agree. When the champion is not the one this sensor last saw and
the latest materialization of ``models/<name>_champion`` does not already name it (the train
job's promotion does), the sensor records an AssetMaterialization of that asset with the
champion, the one before it, how and when: the asset names the version serving answers with.

The cursor is JSON: per model, the champion version last seen and when it took the role.
"""

import json
from collections.abc import Sequence

import dagster as dg

from assets.models import champion_key
from keel.models.registry_client import ModelRegistryError, mlflow_client
from keel.models.role_types import Roles
from keel.models.roles import settle
from keel.models.spec import ModelSpec
from resources import MlflowResource
from sensors import every

MINIMUM_INTERVAL_SECONDS = 30


def model_registry_sensor(
    models: Sequence[ModelSpec], *, minimum_interval_seconds: int = MINIMUM_INTERVAL_SECONDS
) -> dg.SensorDefinition:
    names = ", ".join(spec.name for spec in models) or "none"

    @dg.sensor(
        name="model_registry",
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            f"Keeps MLflow's aliases, stages and Keel's version tags in step for: {names}. A version moved to "
            "Production, Staging or Archived in the MLflow UI, or an alias 'champion' or 'challenger' moved there, is "
            f"settled within {minimum_interval_seconds} s; a champion changed outside the train job is recorded on "
            "models/<name>_champion. The cursor keeps each model's last seen champion and when it took the role."
        ),
    )
    def model_registry(context: dg.SensorEvaluationContext, mlflow: MlflowResource):
        cursor = json.loads(context.cursor) if context.cursor else {}
        client = mlflow_client(mlflow.settings())
        events, skipped = [], []
        for spec in models:
            try:
                roles = settle(client, spec.name)
            except ModelRegistryError:
                skipped.append(f"{spec.name} is not registered yet")
                continue
            for change in roles.changes:
                context.log.info(f"{spec.name}: {change}")
            seen = [roles.champion, roles.at]
            if roles.in_progress or cursor.get(spec.name) == seen:
                continue
            cursor[spec.name] = seen
            had_one = roles.champion is not None or roles.previous_champion is not None
            if had_one and not already_recorded(context.instance, spec, roles):
                events.append(champion_event(spec, roles))
        cursor_json = json.dumps(cursor, sort_keys=True)
        if not events:
            reason = "; ".join(skipped) or f"no champion changed outside the train job ({names})"
            return dg.SensorResult(skip_reason=reason, cursor=cursor_json)
        return dg.SensorResult(asset_events=events, cursor=cursor_json)

    return model_registry


def champion_event(spec: ModelSpec, roles: Roles) -> dg.AssetMaterialization:
    champion = f"v{roles.champion}" if roles.champion is not None else "no champion"
    return dg.AssetMaterialization(
        asset_key=champion_key(spec),
        description=f"'{spec.name}': {champion} since {roles.at} ({roles.how}), seen in the model registry",
        metadata={
            "champion_version": roles.champion if roles.champion is not None else "none",
            "previous_champion_version": roles.previous_champion if roles.previous_champion is not None else "none",
            "how": roles.how or "none",
            "when": roles.at or "none",
        },
    )


def already_recorded(instance: dg.DagsterInstance, spec: ModelSpec, roles: Roles) -> bool:
    """Whether the latest materialization of the champion asset names this champion already."""
    event = instance.get_latest_materialization_event(champion_key(spec))
    materialization = event.asset_materialization if event is not None else None
    if materialization is None:
        return False
    metadata = {k: v.value for k, v in materialization.metadata.items()}
    champion = roles.champion if roles.champion is not None else "none"
    when = metadata.get("when")  # absent from materializations older than it: the version decides
    return metadata.get("champion_version") == champion and when in (None, roles.at or "none")


def model_registry_sensor_definitions(models: Sequence[ModelSpec]) -> dg.Definitions:
    return dg.Definitions(
        sensors=[model_registry_sensor(models, minimum_interval_seconds=every(MINIMUM_INTERVAL_SECONDS))]
    )
