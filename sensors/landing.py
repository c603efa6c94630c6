"""The landing-folder sensor: a new or changed file in KEEL_LANDING/<source>/ starts an ingest run
over the days it holds, and the file stays in the cursor until that run has succeeded.

keel/ingest/landing.py lists the folder, decides, delivers the alerts (those a sink missed kept
pending, as in sensors/alerts.py) and documents the cursor and a file's states; this module feeds
it what only Dagster knows (the runs under each run key, why a run failed) and turns its decisions
into run requests.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence

import dagster as dg

from assets.raw_events import ingest_job_name, ingest_run_config
from keel.alerts.policy import Sink
from keel.alerts.sinks import sinks_from_settings
from keel.config import Settings
from keel.ingest.landing import (
    FAILED,
    IN_PROGRESS,
    LOST_RUN_SECONDS,
    MAX_ATTEMPTS,
    RETRY_BASE_SECONDS,
    SETTLE_SECONDS,
    SUCCEEDED,
    WILL_RETRY,
    IngestRequest,
    RunOutcome,
    retry_delay,
    tick_landing_folder,
)
from keel.ingest.landing_alerts import clip
from keel.project import Project
from resources import LakehouseResource
from sensors import every
from sensors.alerts import log_delivery

__all__ = [
    "ASSET_PARTITION_RANGE_END_TAG",
    "ASSET_PARTITION_RANGE_START_TAG",
    "LOST_RUN_SECONDS",
    "MAX_ATTEMPTS",
    "RETRY_BASE_SECONDS",
    "RUN_KEY_TAG",
    "SETTLE_SECONDS",
    "landing_sensor",
    "sensor_definitions",
]

# Dagster's run tags for a single run over a partition range (BackfillPolicy.single_run()).
ASSET_PARTITION_RANGE_START_TAG = "dagster/asset_partition_range_start"
ASSET_PARTITION_RANGE_END_TAG = "dagster/asset_partition_range_end"
# Dagster puts a sensor run request's run key on the run under this tag.
RUN_KEY_TAG = "dagster/run_key"


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def landing_sensor(
    project: Project,
    jobs: list,
    *,
    settings_factory: Callable[[], Settings] = Settings.from_env,
    sinks_factory: Callable[[Settings], Sequence[Sink]] = sinks_from_settings,
    clock: Callable[[], dt.datetime] = _utc_now,
    minimum_interval_seconds: int = 30,
) -> dg.SensorDefinition:
    waits = ", ".join(f"{retry_delay(attempt).total_seconds() / 60:g}" for attempt in range(1, MAX_ATTEMPTS))

    @dg.sensor(
        name="landing_files",
        jobs=jobs,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            "Watches KEEL_LANDING/<source>/ for new or changed CSV, Parquet and JSONL files and launches one "
            "ingest_<source> run per file over the day partitions its events fall in. A file counts as landed "
            "only when its run succeeds: a failed or canceled run is retried after "
            f"{waits} min, {MAX_ATTEMPTS} attempts in all. After the last failure, or when a file cannot be "
            "ingested at all (unreadable, no timestamps, days outside the partitions), one alert goes to the "
            "console, KEEL_ALERT_FILE and KEEL_ALERT_WEBHOOK with a link to the run, and the file waits until "
            "it changes. The cursor keeps each file's size, mtime and state. On by default: stop it with the "
            "toggle on this page or `dagster sensor stop landing_files`."
        ),
    )
    def landing_files_sensor(context: dg.SensorEvaluationContext, lakehouse: LakehouseResource):
        settings = settings_factory()
        tick = tick_landing_folder(
            context.cursor,
            lakehouse.settings().landing,
            project.sources,
            lambda run_key: _runs(context.instance, run_key),
            sinks_factory(settings),
            now=clock(),
            start=project.start_date,
            dagster_url=settings.dagster_url,
        )
        for warning in tick.warnings:
            context.log.warning(warning)
        log_delivery(context.log, tick.delivery)

        if not tick.requests:
            return dg.SensorResult(skip_reason=tick.summary, cursor=tick.cursor)
        context.log.info(tick.summary)
        return dg.SensorResult(run_requests=[_run_request(r) for r in tick.requests], cursor=tick.cursor)

    return landing_files_sensor


def sensor_definitions(project: Project, jobs: list) -> dg.Definitions:
    return dg.Definitions(sensors=[landing_sensor(project, jobs, minimum_interval_seconds=every(30))])


def _run_request(request: IngestRequest) -> dg.RunRequest:
    return dg.RunRequest(
        run_key=request.run_key,
        job_name=ingest_job_name(request.source),
        run_config=ingest_run_config(request.source, [request.file]),
        tags={
            ASSET_PARTITION_RANGE_START_TAG: request.first.isoformat(),
            ASSET_PARTITION_RANGE_END_TAG: request.last.isoformat(),
            **request.tags,
        },
    )


def _runs(instance: dg.DagsterInstance, run_key: str) -> list[RunOutcome]:
    """The runs launched under ``run_key`` and Dagster's retries of them, newest first."""
    runs = instance.get_runs(dg.RunsFilter(tags={RUN_KEY_TAG: run_key}))
    return [_outcome(instance, run, newest=i == 0) for i, run in enumerate(runs)]


def _outcome(instance: dg.DagsterInstance, run: dg.DagsterRun, *, newest: bool) -> RunOutcome:
    if run.is_success:
        return RunOutcome(SUCCEEDED, run.run_id)
    if not run.is_finished:
        return RunOutcome(IN_PROGRESS, run.run_id)
    if run.is_complete_and_waiting_to_retry:
        return RunOutcome(WILL_RETRY, run.run_id)
    # Only the newest run's error is reported; the older ones' would cost a query a tick during Dagster's retries.
    return RunOutcome(FAILED, run.run_id, _run_error(instance, run) if newest else "")


def _run_error(instance: dg.DagsterInstance, run: dg.DagsterRun) -> str:
    """What made ``run`` fail: its first failed step's error, else the run's own failure or cancel message."""
    kinds = {dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.RUN_FAILURE, dg.DagsterEventType.RUN_CANCELED}
    events = [r.event_log_entry.dagster_event for r in instance.get_records_for_run(run.run_id, of_type=kinds).records]
    events = [e for e in events if e is not None]
    step = next((e for e in events if e.event_type == dg.DagsterEventType.STEP_FAILURE), None)
    if step is not None:
        data = step.step_failure_data
        described = data.user_failure_data.description if data.user_failure_data else None
        return clip(f"{step.step_key}: {described or _error_text(data.error)}")
    for event in reversed(events):
        error = getattr(event.event_specific_data, "error", None)
        if error is not None:
            return clip(_error_text(error))
        if event.message:
            return clip(event.message)
    return f"run {run.status.value.lower()}"


def _error_text(error) -> str:
    while error.cause is not None:  # a step's user-code error wraps what the code raised
        error = error.cause
    message = error.message.strip()
    qualified = message.split(":", 1)[0]
    if qualified.endswith(error.cls_name):
        message = f"{error.cls_name}:{message.split(':', 1)[1]}"
    return message
