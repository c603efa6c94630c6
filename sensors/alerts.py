"""The alert sensor: monitoring check evaluations in, deduplicated alerts out (see keel/alerts/policy.py).

Dagster gives a check execution its id when the check is *planned*, at the start of its run,
and fills the row in place when the evaluation arrives; so ids do not come in completion
order, and reading "completed rows above the last id" alone would skip a check that finished
after a later-planned one. The cursor therefore also keeps the ids still planned ("in flight")
below its high-water mark and looks them up again on later ticks, until they complete, their
run ends without them, or a day passes. Evaluations are reconciled in the order they were
evaluated (event time, then id).

Cursor (JSON)::

    {"last_evaluation_id": 41,
     "in_flight": [{"check": "monitoring/churn_drift:drift", "id": 40, "run_id": "..."}],
     "open": {"monitoring/churn_drift:drift": {"severity": "ERROR", "since": "...", "last_seen": "...", "failures": 2}},
     "pending": [{"alert": {...}, "sinks": ["webhook"], "attempts": 3, "first_failed": "...", "error": "..."}]}

Alerts a sink failed to take stay in ``pending`` and are retried first on every tick; after
a day (``keel.alerts.policy.MAX_PENDING_AGE``) or beyond 200 waiting they are dropped with a logged
error. The first tick without a cursor reads only the newest evaluation of each check: the
current state alerts, history from before the sensor ran does not.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable, Sequence

import dagster as dg

# Dagster 1.13 has no public read of a check's execution history; these are its storage call's records and statuses.
from dagster._core.storage.asset_check_execution_record import (
    COMPLETED_ASSET_CHECK_EXECUTION_RECORD_STATUSES,
    AssetCheckExecutionRecord,
    AssetCheckExecutionRecordStatus,
)

from keel.alerts.policy import Evaluation, PendingAlert, Sink, flush_outbox, plain_metadata, reconcile
from keel.alerts.sinks import sinks_from_settings
from keel.config import Settings
from sensors import every

# Evaluations read per check and tick; beyond this only the newest count (the state they end in is right).
HISTORY = 500
_PAGE = 100
# A planned check older than this is given up on: its run died without recording an outcome.
IN_FLIGHT_AGE_SECONDS = 24 * 3600
# Webhook retries stop within this, well inside Dagster's 60 s sensor evaluation limit.
WEBHOOK_BUDGET_SECONDS = 30
# The tag Dagster puts on a run of one partition (its documented run tag; the constant is private).
PARTITION_TAG = "dagster/partition"


def alert_sensor(
    checks: Sequence[dg.AssetCheckKey],
    *,
    name: str = "monitoring_alerts",
    settings_factory: Callable[[], Settings] = Settings.from_env,
    sinks_factory: Callable[[Settings], Sequence[Sink]] = sinks_from_settings,
    minimum_interval_seconds: int = 60,
) -> dg.SensorDefinition:
    watched = {key.to_user_string(): key for key in checks}
    names = ", ".join(watched)

    @dg.sensor(
        name=name,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            f"Sends monitoring alerts for {names}: one alert when a check starts failing, another if it "
            "escalates from WARN to ERROR, and one when it passes again; to the console, KEEL_ALERT_FILE and "
            "KEEL_ALERT_WEBHOOK when set, with a link to the evaluating run. Requests no runs. Alerts a sink "
            "misses are retried on later ticks for up to a day."
        ),
    )
    def monitoring_alerts(context: dg.SensorEvaluationContext):
        settings = settings_factory()
        state = json.loads(context.cursor) if context.cursor else None
        storage = context.instance.event_log_storage
        if state is None:
            records, in_flight = _first_tick(storage, watched.values())
            state = {}
        else:
            records, in_flight = _since(context.instance, watched, state)
        last_id = max(
            [r.id for r in records] + [f["id"] for f in in_flight] + [int(state.get("last_evaluation_id", 0))]
        )
        records.sort(key=lambda r: (r.event.timestamp, r.id))
        run_partitions = _run_partitions(context.instance, records)
        evaluations = [_evaluation(r, run_partitions.get(r.run_id)) for r in records]

        open_ = {c: e for c, e in state.get("open", {}).items() if c in watched}
        alerts, open_ = reconcile(open_, evaluations, dagster_url=settings.dagster_url)
        pending = [PendingAlert.from_dict(p) for p in state.get("pending", [])]
        outcome = flush_outbox(pending, alerts, sinks_factory(settings), now=dt.datetime.now(dt.UTC))
        log_delivery(context.log, outcome)

        cursor = {
            "last_evaluation_id": last_id,
            "in_flight": in_flight,
            "open": open_,
            "pending": [p.to_dict() for p in outcome.pending],
        }
        return dg.SensorResult(
            skip_reason=_summary(len(evaluations), alerts, outcome, names), cursor=json.dumps(cursor, sort_keys=True)
        )

    return monitoring_alerts


def log_delivery(log, outcome) -> None:
    """A sensor tick's log of the alerts a sink missed (kept for a retry) and those given up on."""
    for failure in outcome.report.failures:
        log.warning(f"alert {failure.alert.id} ({failure.alert.title}) not sent to {failure.sink}: {failure.error}")
    for item, why in outcome.dropped:
        log.error(
            f"alert {item.alert.id} ({item.alert.title}) dropped for {', '.join(item.sinks)} after "
            f"{item.attempts} attempt(s), {why}: {item.error}"
        )


def alert_sensor_definitions(checks: Sequence[dg.AssetCheckKey]) -> dg.Definitions:
    return dg.Definitions(sensors=[alert_sensor(checks, minimum_interval_seconds=every(60))])


def _first_tick(storage, keys) -> tuple[list[AssetCheckExecutionRecord], list[dict]]:
    records = []
    for key in keys:
        records += storage.get_asset_check_execution_history(
            key, limit=1, status=COMPLETED_ASSET_CHECK_EXECUTION_RECORD_STATUSES
        )
    newest = max((r.id for r in records), default=0)
    in_flight = []
    for key in keys:
        planned = storage.get_asset_check_execution_history(
            key, limit=_PAGE, status={AssetCheckExecutionRecordStatus.PLANNED}
        )
        in_flight += [_flight(r) for r in planned if r.id < newest and _recent(r)]
    return records, in_flight


def _since(instance, watched, state) -> tuple[list[AssetCheckExecutionRecord], list[dict]]:
    storage = instance.event_log_storage
    after = int(state.get("last_evaluation_id", 0))
    records, in_flight = [], []
    for key in watched.values():
        for r in _newer(storage, key, after):
            if r.status in COMPLETED_ASSET_CHECK_EXECUTION_RECORD_STATUSES:
                records.append(r)
            elif _recent(r):
                in_flight.append(_flight(r))
    for item in state.get("in_flight", []):
        key = watched.get(item["check"])
        if key is None:
            continue
        found = storage.get_asset_check_execution_history(key, limit=1, cursor=int(item["id"]) + 1)
        record = found[0] if found and found[0].id == int(item["id"]) else None
        if record is None:
            continue
        if record.status in COMPLETED_ASSET_CHECK_EXECUTION_RECORD_STATUSES:
            records.append(record)
        elif _recent(record) and not _run_over(instance, record.run_id):
            in_flight.append(item)
    return records, in_flight


def _newer(storage, key: dg.AssetCheckKey, after: int) -> list[AssetCheckExecutionRecord]:
    """Executions of ``key`` with an id above ``after``, newest first, at most ``HISTORY``."""
    out: list[AssetCheckExecutionRecord] = []
    before = None
    while len(out) < HISTORY:
        page = storage.get_asset_check_execution_history(key, limit=_PAGE, cursor=before)
        fresh = [r for r in page if r.id > after]
        out += fresh
        if len(fresh) < len(page) or len(page) < _PAGE:
            break
        before = page[-1].id
    return out[:HISTORY]


def _flight(record: AssetCheckExecutionRecord) -> dict:
    return {"check": record.key.to_user_string(), "id": record.id, "run_id": record.run_id}


def _recent(record: AssetCheckExecutionRecord) -> bool:
    return time.time() - record.create_timestamp < IN_FLIGHT_AGE_SECONDS


def _run_over(instance, run_id: str) -> bool:
    run = instance.get_run_by_id(run_id)
    return run is None or run.is_finished


def _run_partitions(instance, records) -> dict[str, str | None]:
    """The partition of each run that evaluated an unpartitioned check (the usual case: checks of
    a partitioned monitoring asset judge the run's window without being partitioned themselves)."""
    out: dict[str, str | None] = {}
    for r in records:
        if r.run_id not in out and r.partition is None:
            run = instance.get_run_by_id(r.run_id)
            out[r.run_id] = run.tags.get(PARTITION_TAG) if run else None
    return out


def _evaluation(record: AssetCheckExecutionRecord, run_partition: str | None) -> Evaluation:
    # The record's event is the ASSET_CHECK_EVALUATION EventLogEntry; its payload is the AssetCheckEvaluation.
    event = record.event
    check = event.dagster_event.event_specific_data
    return Evaluation(
        condition=record.key.to_user_string(),
        passed=check.passed,
        severity=check.severity.value,
        description=check.description or "",
        run_id=record.run_id,
        partition=check.partition or record.partition or run_partition,
        ts=dt.datetime.fromtimestamp(event.timestamp, dt.UTC),
        metadata=plain_metadata({k: v.value for k, v in check.metadata.items()}),
    )


def _summary(evaluated: int, alerts, outcome, names: str) -> str:
    if not evaluated and not outcome.report.delivered and not outcome.report.failures and not outcome.dropped:
        return f"no new evaluation of {names}"
    parts = [f"{evaluated} new evaluation(s)"]
    if alerts:
        parts.append("alerts: " + "; ".join(f"{a.status} {a.condition} ({a.severity})" for a in alerts))
    else:
        parts.append("no change of state")
    sent = {a.id for a, _ in outcome.report.delivered}
    if sent:
        parts.append(f"{len(sent)} alert(s) delivered")
    if outcome.pending:
        parts.append(
            f"{len(outcome.pending)} pending for {', '.join(sorted({s for p in outcome.pending for s in p.sinks}))}"
        )
    if outcome.dropped:
        parts.append(f"{len(outcome.dropped)} dropped (see the tick's log)")
    return "; ".join(parts)
