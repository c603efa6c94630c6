"""The landing-folder sensor: a new or changed file starts an ingest run over the days it holds,
and the file stays in the cursor until that run has succeeded.

Cursor (JSON)::

    {"files": {"/landing/payments/a.jsonl": {
         "signature": "1834:1765076400000000000", "state": "retry_waiting", "attempt": 1,
         "run_key": "/landing/payments/a.jsonl:1834:1765076400000000000:1", "days": "2026-01-01..2026-01-03",
         "since": "...", "requested_at": "...", "retry_at": "...", "runs": 1, "run_id": "...", "error": "..."}},
     "pending": [{"alert": {...}, "sinks": ["webhook"], "attempts": 1, "first_failed": "...", "error": "..."}]}

A file's ``signature`` is its size and mtime; a new signature starts the file afresh at attempt 1.
Its ``state`` is one of

- ``requested``: a run was asked for under ``run_key`` (Dagster tags every run a sensor launches
  with its run key, and its automatic retries keep the tag). Each tick looks the
  runs up: one succeeded, the file is ``landed``; one is queued, running or about to be retried
  by Dagster itself, the file waits; all failed or were canceled, the attempt failed.
- ``retry_waiting``: the attempt failed; the file is asked for again at ``retry_at``.
- ``landed``: never asked for again until it changes; only the signature and the run id are kept.
- ``given_up``: ``MAX_ATTEMPTS`` attempts failed; one alert was sent, and the file waits until it changes.
- ``unreadable``: the file cannot be ingested at all (unreadable, no timestamps, days outside the
  partitions); one alert was sent.

A cursor of the earlier shape, ``{path: signature}``, is read as files requested under the run
key ``path:signature``: runs that failed before the upgrade are retried, and a file that never
had a run is looked at afresh.

Alerts go out through keel.alerts.flush_outbox as the monitoring alerts do; those a sink missed
stay in ``pending`` and are retried on later ticks (see sensors/alerts.py).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import dagster as dg

from assets.raw_events import ingest_job_name, ingest_run_config, landing_files
from keel.alert_sinks import Sink, sinks_from_settings
from keel.alerts import Alert, PendingAlert, flush_outbox, plain_metadata, run_url
from keel.config import Settings
from keel.dsl import EventSource
from keel.project import Project
from keel.readers import FileFormatError, timestamp_range
from resources import LakehouseResource

# Dagster's run tags for a single run over a partition range (BackfillPolicy.single_run()).
ASSET_PARTITION_RANGE_START_TAG = "dagster/asset_partition_range_start"
ASSET_PARTITION_RANGE_END_TAG = "dagster/asset_partition_range_end"
# Dagster puts a sensor run request's run key on the run under this tag.
RUN_KEY_TAG = "dagster/run_key"
# A file still being copied changes size and mtime; wait until it has been still this long.
SETTLE_SECONDS = 5.0
# What is worth retrying (a lock, a commit conflict, a catalog restarting) clears within minutes;
# a bad file fails every time and should reach a person within about ten minutes. Attempt n+1
# starts RETRY_BASE_SECONDS * 2**(n-1) after attempt n failed: 1, 2, then 4 min.
MAX_ATTEMPTS = 4
RETRY_BASE_SECONDS = 60
# A requested run still not found this long after the request was deleted or never launched:
# the attempt counts as failed. (The daemon creates a sensor's runs within the same tick.)
LOST_RUN_SECONDS = 15 * 60
# File names listed in a tick's summary; the rest are counted.
SHOWN = 10

# A file's states in the cursor (see above).
REQUESTED = "requested"
LANDED = "landed"
RETRY_WAITING = "retry_waiting"
GIVEN_UP = "given_up"
UNREADABLE = "unreadable"


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclasses.dataclass
class _Tick:
    """What one tick did, for its summary, its log and its alerts."""

    requested: list[str] = dataclasses.field(default_factory=list)
    landed: list[str] = dataclasses.field(default_factory=list)
    retrying: list[str] = dataclasses.field(default_factory=list)
    given_up: list[str] = dataclasses.field(default_factory=list)
    unreadable: list[str] = dataclasses.field(default_factory=list)  # why, per file
    removed: list[str] = dataclasses.field(default_factory=list)
    alerts: list[Alert] = dataclasses.field(default_factory=list)


def landing_sensor(
    project: Project,
    jobs: list,
    *,
    settings_factory: Callable[[], Settings] = Settings.from_env,
    sinks_factory: Callable[[Settings], Sequence[Sink]] = sinks_from_settings,
    clock: Callable[[], dt.datetime] = _utc_now,
    minimum_interval_seconds: int = 30,
) -> dg.SensorDefinition:
    sources = {source.name: source for source in project.sources}
    waits = ", ".join(f"{RETRY_BASE_SECONDS * 2**i / 60:g}" for i in range(MAX_ATTEMPTS - 1))

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
        now = clock()
        settings = settings_factory()
        files, pending = _load(context.cursor, now)
        tick = _Tick()
        for key, entry in list(files.items()):
            if entry["state"] == REQUESTED:
                followed = _follow(context, key, entry, now, settings, sources, tick)
                if followed is None:
                    del files[key]
                else:
                    files[key] = followed

        requests, seen = [], set()
        landing = lakehouse.settings().landing
        for source in project.sources:
            for path in landing_files(landing, source):
                seen.add(str(path))
                request = _consider(path, source, files, now, project.start_date, tick)
                if request is not None:
                    requests.append(request)
        for key in [k for k, e in files.items() if k not in seen and e["state"] != REQUESTED]:
            if files.pop(key)["state"] == RETRY_WAITING:
                tick.removed.append(key)
                context.log.warning(f"{key} was removed before it landed; it is not retried")

        outcome = flush_outbox(
            [PendingAlert.from_dict(p) for p in pending], tick.alerts, sinks_factory(settings), now=now
        )
        for failure in outcome.report.failures:
            context.log.warning(
                f"alert {failure.alert.id} ({failure.alert.title}) not sent to {failure.sink}: {failure.error}"
            )
        for item, why in outcome.dropped:
            context.log.error(
                f"alert {item.alert.id} ({item.alert.title}) dropped for {', '.join(item.sinks)} after "
                f"{item.attempts} attempt(s), {why}: {item.error}"
            )

        summary = _summary(tick, files, outcome)
        cursor = json.dumps({"files": files, "pending": [p.to_dict() for p in outcome.pending]}, sort_keys=True)
        if not requests:
            return dg.SensorResult(skip_reason=summary, cursor=cursor)
        context.log.info(summary)
        return dg.SensorResult(run_requests=requests, cursor=cursor)

    return landing_files_sensor


def sensor_definitions(project: Project, jobs: list) -> dg.Definitions:
    return dg.Definitions(sensors=[landing_sensor(project, jobs)])


def _load(cursor: str | None, now: dt.datetime) -> tuple[dict[str, dict], list[dict]]:
    if not cursor:
        return {}, []
    state = json.loads(cursor)
    if "files" in state:
        return state["files"], state.get("pending", [])
    # The cursor of the sensor before file states: {path: signature}, each file requested once
    # under the run key "path:signature" (or skipped as unreadable, with no run). Follow those runs.
    return {
        path: {
            "signature": signature,
            "state": REQUESTED,
            "attempt": 1,
            "run_key": f"{path}:{signature}",
            "since": now.isoformat(),
            "requested_at": now.isoformat(),
            "runs": 0,
            "legacy": True,
        }
        for path, signature in state.items()
    }, []


def _follow(context, key: str, entry: dict, now: dt.datetime, settings: Settings, sources, tick: _Tick) -> dict | None:
    """The entry of a requested file after looking up its runs; None to forget it (start afresh)."""
    runs = context.instance.get_runs(dg.RunsFilter(tags={RUN_KEY_TAG: entry["run_key"]}))
    succeeded = next((r for r in runs if r.is_success), None)
    if succeeded is not None:
        tick.landed.append(key)
        return {"signature": entry["signature"], "state": LANDED, "run_id": succeeded.run_id}
    if any(not r.is_finished or r.is_complete_and_waiting_to_retry for r in runs):
        return entry
    if not runs:
        if entry.get("legacy"):
            return None
        if now - dt.datetime.fromisoformat(entry["requested_at"]) < dt.timedelta(seconds=LOST_RUN_SECONDS):
            return entry
        run_id = None
        error = (
            f"no run with run key {entry['run_key']} found {LOST_RUN_SECONDS // 60} min after it was requested "
            "(deleted, or never launched)"
        )
    else:
        run_id, error = runs[0].run_id, _run_error(context.instance, runs[0])
    attempt = int(entry["attempt"])
    failed = _keep(entry, run_id=run_id, error=error, runs=entry.get("runs", 0) + len(runs))
    context.log.warning(f"{key}: attempt {attempt} failed (run {run_id}): {error}")
    if attempt >= MAX_ATTEMPTS:
        tick.given_up.append(key)
        tick.alerts.append(_given_up_alert(key, failed, now, settings, sources))
        return {**failed, "state": GIVEN_UP}
    retry_at = now + dt.timedelta(seconds=RETRY_BASE_SECONDS * 2 ** (attempt - 1))
    tick.retrying.append(key)
    return {**failed, "state": RETRY_WAITING, "retry_at": retry_at.isoformat()}


def _keep(entry: dict, **changes) -> dict:
    out = {**entry, **changes}
    for gone in ("legacy", "retry_at"):
        out.pop(gone, None)
    return out


def _consider(
    path: Path, source: EventSource, files: dict, now: dt.datetime, start: dt.date, tick: _Tick
) -> dg.RunRequest | None:
    """The run request ``path`` calls for now, if any; its cursor entry updated."""
    key = str(path)
    try:
        stat = path.stat()
    except FileNotFoundError:  # removed since it was listed
        return None
    signature = f"{stat.st_size}:{stat.st_mtime_ns}"
    entry = files.get(key)
    if entry is not None and entry["signature"] == signature:
        if entry["state"] != RETRY_WAITING or now < dt.datetime.fromisoformat(entry["retry_at"]):
            return None
        attempt, since, runs = int(entry["attempt"]) + 1, entry["since"], entry.get("runs", 0)
    else:
        if now.timestamp() - stat.st_mtime < SETTLE_SECONDS:
            return None
        attempt, since, runs = 1, now.isoformat(), 0

    days = _days(path, source, start, now.date())
    if isinstance(days, str):
        files[key] = {"signature": signature, "state": UNREADABLE, "error": days}
        tick.unreadable.append(days)
        tick.alerts.append(_unreadable_alert(key, source, signature, days, now))
        return None
    first, last = days
    run_key = f"{key}:{signature}:{attempt}"
    files[key] = {
        "signature": signature,
        "state": REQUESTED,
        "attempt": attempt,
        "run_key": run_key,
        "days": f"{first}..{last}" if first != last else str(first),
        "since": since,
        "requested_at": now.isoformat(),
        "runs": runs,
    }
    tick.requested.append(key)
    return dg.RunRequest(
        run_key=run_key,
        job_name=ingest_job_name(source),
        run_config=ingest_run_config(source, [path]),
        tags={
            ASSET_PARTITION_RANGE_START_TAG: first.isoformat(),
            ASSET_PARTITION_RANGE_END_TAG: last.isoformat(),
            "keel/file": key,
            "keel/source": source.name,
            "keel/attempt": str(attempt),
        },
    )


def _days(path: Path, source: EventSource, start: dt.date, today: dt.date) -> tuple[dt.date, dt.date] | str:
    """The first and last day partition the file's events fall in, or why it cannot be ingested."""
    try:
        span = timestamp_range(path, source.timestamp)
    except FileFormatError as exc:
        return str(exc)
    if span is None:
        return f"{path}: no parsable {source.timestamp} values"
    first, last = max(span[0].date(), start), min(span[1].date(), today)
    if first > last:
        return f"{path}: events fall outside {start}..{today}"
    return first, last


def _run_error(instance, run: dg.DagsterRun) -> str:
    """What made ``run`` fail: its first failed step's error, else the run's own failure or cancel message."""
    kinds = {dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.RUN_FAILURE, dg.DagsterEventType.RUN_CANCELED}
    events = [r.event_log_entry.dagster_event for r in instance.get_records_for_run(run.run_id, of_type=kinds).records]
    events = [e for e in events if e is not None]
    step = next((e for e in events if e.event_type == dg.DagsterEventType.STEP_FAILURE), None)
    if step is not None:
        data = step.step_failure_data
        described = data.user_failure_data.description if data.user_failure_data else None
        return _clip(f"{step.step_key}: {described or _error_text(data.error)}")
    for event in reversed(events):
        error = getattr(event.event_specific_data, "error", None)
        if error is not None:
            return _clip(_error_text(error))
        if event.message:
            return _clip(event.message)
    return f"run {run.status.value.lower()}"


def _error_text(error) -> str:
    while error.cause is not None:  # a step's user-code error wraps what the code raised
        error = error.cause
    message = error.message.strip()
    qualified = message.split(":", 1)[0]
    if qualified.endswith(error.cls_name):
        message = f"{error.cls_name}:{message.split(':', 1)[1]}"
    return message


def _clip(text: str, limit: int = 500) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _name(key: str) -> str:
    path = Path(key)
    return f"{path.parent.name}/{path.name}"


def _condition(key: str) -> str:
    # The landing asset of the file's source (landing/<source>), then the file, as a check is named.
    path = Path(key)
    return f"landing/{path.parent.name}:{path.name}"


def _alert_id(key: str, signature: str, status: str) -> str:
    return hashlib.sha256("\x1f".join((key, signature, status)).encode()).hexdigest()[:16]


def _file_line(key: str, signature: str) -> str:
    size, mtime_ns = signature.split(":")
    modified = dt.datetime.fromtimestamp(int(mtime_ns) / 1e9, dt.UTC)
    return f"file {key} ({int(size):,} bytes, modified {modified:%Y-%m-%d %H:%M:%S} UTC)"


def _given_up_alert(key: str, entry: dict, now: dt.datetime, settings: Settings, sources) -> Alert:
    source = Path(key).parent.name
    attempts, runs = int(entry["attempt"]), int(entry.get("runs", 0))
    job = ingest_job_name(sources[source]) if source in sources else f"ingest_{source}"
    counted = f" ({runs} runs with Dagster's own retries)" if runs > attempts else ""
    last = f"the last, run {entry['run_id']}," if entry.get("run_id") else "the last"
    return Alert(
        id=_alert_id(key, entry["signature"], "given_up"),
        condition=_condition(key),
        status="firing",
        severity="ERROR",
        title=f"[ERROR] {_condition(key)} did not land after {attempts} attempts",
        text="\n".join(
            (
                f"{_file_line(key, entry['signature'])} for source '{source}', days {entry.get('days', '?')}",
                f"{attempts} ingest attempts failed{counted}; {last} failed with: {entry.get('error', '')}",
                "Not retried until the file changes: fix the cause, then replace the file or touch it "
                f"(a changed file starts over), or launch {job} on it from the Dagster UI.",
            )
        ),
        run_url=run_url(settings.dagster_url, entry.get("run_id")),
        run_id=entry.get("run_id"),
        partition=entry.get("days"),
        ts=now,
        since=dt.datetime.fromisoformat(entry["since"]),
        metadata=plain_metadata(
            {
                "file": key,
                "source": source,
                "attempts": attempts,
                "runs": runs,
                "run_id": entry.get("run_id") or "",
                "error": _clip(entry.get("error", ""), 200),
            }
        ),
    )


def _unreadable_alert(key: str, source: EventSource, signature: str, reason: str, now: dt.datetime) -> Alert:
    return Alert(
        id=_alert_id(key, signature, "unreadable"),
        condition=_condition(key),
        status="firing",
        severity="ERROR",
        title=f"[ERROR] {_condition(key)} cannot be ingested",
        text="\n".join(
            (
                f"{_file_line(key, signature)} for source '{source.name}'",
                reason.removeprefix(f"{key}: "),
                "No run was started and this version of the file is not tried again: replace it with a "
                f"readable file whose {source.timestamp} values fall in the partitions.",
            )
        ),
        run_url=None,
        run_id=None,
        partition=None,
        ts=now,
        since=now,
        metadata=plain_metadata({"file": key, "source": source.name, "error": _clip(reason, 200)}),
    )


def _listed(keys: list[str], files: dict, detail: Callable[[dict], str] = lambda entry: "") -> str:
    shown = ", ".join(_name(key) + detail(files[key]) for key in keys[:SHOWN])
    return shown + (f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else "")


def _attempt(entry: dict) -> str:
    return f" (attempt {entry['attempt']} of {MAX_ATTEMPTS})" if int(entry["attempt"]) > 1 else ""


def _attempts(entry: dict) -> str:
    return f" after {entry['attempt']} attempts"


def _retry(entry: dict) -> str:
    at = dt.datetime.fromisoformat(entry["retry_at"])
    return f" (attempt {int(entry['attempt']) + 1} of {MAX_ATTEMPTS} at {at:%H:%M:%S} UTC)"


def _summary(tick: _Tick, files: dict, outcome) -> str:
    parts = []
    if tick.requested:
        parts.append(f"requested {len(tick.requested)}: {_listed(tick.requested, files, _attempt)}")
    if tick.landed:
        parts.append(f"landed {len(tick.landed)}: {_listed(tick.landed, files)}")
    if tick.retrying:
        parts.append(f"failed, retrying {len(tick.retrying)}: {_listed(tick.retrying, files, _retry)}")
    if tick.given_up:
        parts.append(f"gave up on {len(tick.given_up)} (alerted): {_listed(tick.given_up, files, _attempts)}")
    if tick.unreadable:
        parts.append(f"cannot ingest {len(tick.unreadable)} (alerted): {'; '.join(tick.unreadable[:SHOWN])}")
    if tick.removed:
        parts.append(f"removed before landing, not retried: {', '.join(_name(k) for k in tick.removed)}")
    if not parts:
        parts.append("no new files")
    in_flight = sum(1 for e in files.values() if e["state"] == REQUESTED) - len(tick.requested)
    if in_flight:
        parts.append(f"waiting for the runs of {in_flight} file(s)")
    waiting = sorted(
        (e["retry_at"], key) for key, e in files.items() if e["state"] == RETRY_WAITING and key not in tick.retrying
    )
    if waiting:
        when, key = waiting[0]
        at = dt.datetime.fromisoformat(when)
        parts.append(f"{len(waiting)} waiting to retry, next {_name(key)} at {at:%H:%M:%S} UTC")
    sent = {a.id for a, _ in outcome.report.delivered}
    if sent:
        parts.append(f"{len(sent)} alert(s) delivered")
    if outcome.pending:
        sinks = ", ".join(sorted({s for p in outcome.pending for s in p.sinks}))
        parts.append(f"{len(outcome.pending)} alert(s) pending for {sinks}")
    if outcome.dropped:
        parts.append(f"{len(outcome.dropped)} alert(s) dropped (see the tick's log)")
    return "; ".join(parts)
