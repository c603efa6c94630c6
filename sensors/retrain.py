"""Retrain sensors: a drift or performance check failing with ERROR severity starts the model's train job.

The cursor holds the id of the newest check evaluation seen and when the sensor last
started a retrain; failures seen within the cool-down after a retrain are consumed
without starting another, so a check that keeps failing cannot start a retrain loop.
"""

import json
import time
from collections.abc import Sequence

import dagster as dg

# Dagster 1.13 has no public read of a check's execution history; this is its storage call's status filter.
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

from assets.models import train_job_name
from assets.monitoring import drift_key, performance_key
from keel.models.spec import ModelSpec
from sensors import every

COOL_DOWN_SECONDS = 6 * 3600
# Evaluations read per check and tick; more failures than this between ticks change nothing.
HISTORY = 50


def monitoring_checks(spec: ModelSpec) -> list[dg.AssetCheckKey]:
    """The checks watched by default: ``drift`` on ``monitoring/<name>_drift`` and
    ``performance`` on ``monitoring/<name>_performance``."""
    return [
        dg.AssetCheckKey(drift_key(spec.name), "drift"),
        dg.AssetCheckKey(performance_key(spec.name), "performance"),
    ]


def is_error(record) -> bool:
    """Whether a failed evaluation has ERROR severity (a WARN is an alert, not a reason to retrain)."""
    entry = getattr(record, "event", None)
    evaluation = entry.dagster_event.event_specific_data if entry and entry.dagster_event else None
    return getattr(evaluation, "severity", dg.AssetCheckSeverity.ERROR) == dg.AssetCheckSeverity.ERROR


def retrain_sensor(
    spec: ModelSpec,
    *,
    checks: Sequence[dg.AssetCheckKey] | None = None,
    cool_down_seconds: float = COOL_DOWN_SECONDS,
    minimum_interval_seconds: int = 60,
) -> dg.SensorDefinition:
    watched = list(checks) if checks is not None else monitoring_checks(spec)
    job_name = train_job_name(spec)
    names = ", ".join(k.to_user_string() for k in watched)

    @dg.sensor(
        name=f"retrain_{spec.name}",
        job_name=job_name,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            f"Starts {job_name} when one of these checks fails: {names}; at most once per "
            f"{cool_down_seconds / 3600:g} h. The cursor keeps the newest evaluation seen and the last retrain time."
        ),
    )
    def retrain(context: dg.SensorEvaluationContext):
        cursor = json.loads(context.cursor) if context.cursor else {}
        last_seen = int(cursor.get("last_evaluation_id", 0))
        last_fired = cursor.get("last_retrain_at")
        failed = []
        for key in watched:
            records = context.instance.event_log_storage.get_asset_check_execution_history(
                key, limit=HISTORY, status={AssetCheckExecutionRecordStatus.FAILED}
            )
            failed += [r for r in records if r.id > last_seen and is_error(r)]
        if not failed:
            return dg.SensorResult(skip_reason=f"no failed evaluation of {names} since the last tick")
        newest = max(failed, key=lambda r: r.id)
        now = time.time()
        cursor = {**cursor, "last_evaluation_id": newest.id}
        if last_fired is not None and now - float(last_fired) < cool_down_seconds:
            wait = cool_down_seconds - (now - float(last_fired))
            return dg.SensorResult(
                skip_reason=(
                    f"{len(failed)} failed evaluation(s) of {names}, but the last retrain started "
                    f"{(now - float(last_fired)) / 60:.0f} min ago; cool-down ends in {wait / 60:.0f} min"
                ),
                cursor=json.dumps(cursor, sort_keys=True),
            )
        cursor["last_retrain_at"] = now
        request = dg.RunRequest(
            run_key=f"retrain-{spec.name}-{newest.id}",
            tags={
                "keel/model": spec.name,
                "keel/trigger": newest.key.to_user_string(),
                "keel/trigger_run": newest.run_id,
            },
        )
        return dg.SensorResult(run_requests=[request], cursor=json.dumps(cursor, sort_keys=True))

    return retrain


def retrain_sensor_definitions(models: Sequence[ModelSpec]) -> dg.Definitions:
    return dg.Definitions(sensors=[retrain_sensor(spec, minimum_interval_seconds=every(60)) for spec in models])
