"""The landing folder's state machine: a new or changed file is ingested over the days it holds,
and stays in the cursor until that ingest has succeeded. sensors/landing.py runs it once a tick
(``tick_landing_folder``) with what only Dagster knows: the runs it holds under each run key.

Cursor (JSON)::

    {"files": {"/landing/payments/a.jsonl": {
         "signature": "1834:1765076400000000000", "state": "retry_waiting", "attempt": 1,
         "run_key": "/landing/payments/a.jsonl:1834:1765076400000000000:1", "days": "2026-01-01..2026-01-03",
         "since": "...", "requested_at": "...", "retry_at": "...", "runs": 1, "run_id": "...", "error": "..."}},
     "pending": [{"alert": {...}, "sinks": ["webhook"], "attempts": 1, "first_failed": "...", "error": "..."}]}

A file's ``signature`` is its size and mtime; a new signature starts the file afresh at attempt 1.
Its ``state`` is one of

- ``requested``: a run was asked for under ``run_key`` (Dagster tags every run a sensor launches
  with its run key, and its automatic retries keep the tag). Each tick looks the runs up: one
  succeeded, the file is ``landed``; one is queued, running or about to be retried by Dagster
  itself, the file waits; all failed or were canceled, the attempt failed.
- ``retry_waiting``: the attempt failed; the file is asked for again at ``retry_at``.
- ``landed``: never asked for again until it changes; only the signature and the run id are kept.
- ``given_up``: ``MAX_ATTEMPTS`` attempts failed; one alert was sent, and the file waits until it changes.
- ``unreadable``: the file cannot be ingested at all (unreadable, no timestamps, days outside the
  partitions); one alert was sent.

A cursor of the earlier shape, ``{path: signature}``, is read as files requested under the run
key ``path:signature``: runs that failed before the upgrade are retried, and a file that never
had a run is looked at afresh.

Alerts go out through keel.alerts.policy.flush_outbox as the monitoring alerts do; those a sink missed
stay in ``pending`` and are retried on later ticks.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from keel.alerts.policy import Alert, OutboxResult, PendingAlert, Sink, flush_outbox
from keel.dsl import EventSource
from keel.ingest.landing_alerts import given_up_alert, unreadable_alert
from keel.ingest.landing_folder import LandingFile, Span, file_days, list_landing_folder, run_key
from keel.ingest.readers import timestamp_range

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

# A run's outcome as the state machine needs it. A run Dagster will retry itself is still going.
SUCCEEDED = "succeeded"
IN_PROGRESS = "in_progress"
WILL_RETRY = "will_retry"
FAILED = "failed"  # or canceled


@dataclasses.dataclass(frozen=True)
class RunOutcome:
    """One run under a file's run key; ``error`` says why it failed."""

    status: str
    run_id: str
    error: str = ""


@dataclasses.dataclass(frozen=True)
class IngestRequest:
    """An ingest run of one file over the day partitions its events fall in."""

    file: str
    source: EventSource
    first: dt.date
    last: dt.date
    run_key: str
    attempt: int

    @property
    def days(self) -> str:
        return f"{self.first}..{self.last}" if self.first != self.last else str(self.first)

    @property
    def tags(self) -> dict[str, str]:
        return {"keel/file": self.file, "keel/source": self.source.name, "keel/attempt": str(self.attempt)}


def retry_delay(attempt: int) -> dt.timedelta:
    """How long after failed attempt ``attempt`` the next one starts."""
    return dt.timedelta(seconds=RETRY_BASE_SECONDS * 2 ** (attempt - 1))


@dataclasses.dataclass
class LandingCursor:
    files: dict[str, dict]
    pending: list[PendingAlert]

    @classmethod
    def parse(cls, text: str | None, now: dt.datetime) -> LandingCursor:
        if not text:
            return cls({}, [])
        state = json.loads(text)
        if "files" in state:
            return cls(state["files"], [PendingAlert.from_dict(p) for p in state.get("pending", [])])
        # The cursor of the sensor before file states: {path: signature}, each file requested once
        # under the run key "path:signature" (or skipped as unreadable, with no run). Follow those runs.
        files = {
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
        }
        return cls(files, [])

    def dumps(self) -> str:
        return json.dumps({"files": self.files, "pending": [p.to_dict() for p in self.pending]}, sort_keys=True)


@dataclasses.dataclass
class LandingTick:
    """What one tick decided: the cursor after it, the runs to request, the alerts to send, what to log."""

    cursor: LandingCursor
    requests: list[IngestRequest] = dataclasses.field(default_factory=list)
    alerts: list[Alert] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    requested: list[str] = dataclasses.field(default_factory=list)
    landed: list[str] = dataclasses.field(default_factory=list)
    retrying: list[str] = dataclasses.field(default_factory=list)
    given_up: list[str] = dataclasses.field(default_factory=list)
    unreadable: list[str] = dataclasses.field(default_factory=list)  # why, per file
    removed: list[str] = dataclasses.field(default_factory=list)

    def cursor_after(self, outcome: OutboxResult) -> str:
        return dataclasses.replace(self.cursor, pending=list(outcome.pending)).dumps()

    def summary(self, outcome: OutboxResult) -> str:
        return _summary(self, self.cursor.files, outcome)


def landing_tick(
    cursor: str | None,
    listed: Sequence[LandingFile],
    runs: Callable[[str], Sequence[RunOutcome]],
    *,
    now: dt.datetime,
    start: dt.date,
    dagster_url: str | None = None,
    span: Span = timestamp_range,
) -> LandingTick:
    """One tick over the files ``listed`` now, in order. ``runs`` gives the runs under a run key,
    newest first; ``span`` the earliest and latest timestamp in a file."""
    tick = LandingTick(LandingCursor.parse(cursor, now))
    files = tick.cursor.files
    for key, entry in list(files.items()):
        if entry["state"] == REQUESTED:
            followed = _follow(key, entry, runs(entry["run_key"]), now, dagster_url, tick)
            if followed is None:
                del files[key]
            else:
                files[key] = followed
    for file in listed:
        request = _consider(file, files, now, start, span, tick)
        if request is not None:
            tick.requests.append(request)
    seen = {file.path for file in listed}
    for key in [k for k, e in files.items() if k not in seen and e["state"] != REQUESTED]:
        if files.pop(key)["state"] == RETRY_WAITING:
            tick.removed.append(key)
            tick.warnings.append(f"{key} was removed before it landed; it is not retried")
    return tick


@dataclasses.dataclass(frozen=True)
class FolderTick:
    """A tick over the landing folder, its alerts delivered: the runs to request, what to log, the cursor to keep."""

    requests: list[IngestRequest]
    warnings: list[str]
    delivery: OutboxResult
    summary: str
    cursor: str


def tick_landing_folder(
    cursor: str | None,
    landing: Path,
    sources: Sequence[EventSource],
    runs: Callable[[str], Sequence[RunOutcome]],
    sinks: Sequence[Sink],
    *,
    now: dt.datetime,
    start: dt.date,
    dagster_url: str | None = None,
) -> FolderTick:
    """``landing_tick`` over the files waiting in ``landing/<source>/`` now, then its alerts and those
    still pending from earlier ticks sent to ``sinks``."""
    tick = landing_tick(
        cursor, list_landing_folder(landing, sources), runs, now=now, start=start, dagster_url=dagster_url
    )
    delivery = flush_outbox(tick.cursor.pending, tick.alerts, sinks, now=now)
    return FolderTick(tick.requests, tick.warnings, delivery, tick.summary(delivery), tick.cursor_after(delivery))


def _follow(
    key: str, entry: dict, runs: Sequence[RunOutcome], now: dt.datetime, dagster_url: str | None, tick: LandingTick
) -> dict | None:
    """The entry of a requested file after its runs; None to forget it (start afresh)."""
    succeeded = next((r for r in runs if r.status == SUCCEEDED), None)
    if succeeded is not None:
        tick.landed.append(key)
        return {"signature": entry["signature"], "state": LANDED, "run_id": succeeded.run_id}
    if any(r.status in (IN_PROGRESS, WILL_RETRY) for r in runs):
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
        run_id, error = runs[0].run_id, runs[0].error
    attempt = int(entry["attempt"])
    failed = _keep(entry, run_id=run_id, error=error, runs=entry.get("runs", 0) + len(runs))
    tick.warnings.append(f"{key}: attempt {attempt} failed (run {run_id}): {error}")
    if attempt >= MAX_ATTEMPTS:
        tick.given_up.append(key)
        tick.alerts.append(given_up_alert(key, failed, now, dagster_url))
        return {**failed, "state": GIVEN_UP}
    tick.retrying.append(key)
    return {**failed, "state": RETRY_WAITING, "retry_at": (now + retry_delay(attempt)).isoformat()}


def _keep(entry: dict, **changes) -> dict:
    out = {**entry, **changes}
    for gone in ("legacy", "retry_at"):
        out.pop(gone, None)
    return out


def _consider(
    file: LandingFile, files: dict, now: dt.datetime, start: dt.date, span: Span, tick: LandingTick
) -> IngestRequest | None:
    """The ingest ``file`` calls for now, if any; its cursor entry updated."""
    if file.mtime_ns is None:
        return None
    key, signature = file.path, file.signature
    entry = files.get(key)
    if entry is not None and entry["signature"] == signature:
        if entry["state"] != RETRY_WAITING or now < dt.datetime.fromisoformat(entry["retry_at"]):
            return None
        attempt, since, runs = int(entry["attempt"]) + 1, entry["since"], entry.get("runs", 0)
    else:
        if now.timestamp() - file.mtime_ns / 1e9 < SETTLE_SECONDS:
            return None
        attempt, since, runs = 1, now.isoformat(), 0

    days = file_days(Path(key), file.source, start, now.date(), span)
    if isinstance(days, str):
        files[key] = {"signature": signature, "state": UNREADABLE, "error": days}
        tick.unreadable.append(days)
        tick.alerts.append(unreadable_alert(key, file.source, signature, days, now))
        return None
    request = IngestRequest(key, file.source, *days, run_key=run_key(key, signature, attempt), attempt=attempt)
    files[key] = {
        "signature": signature,
        "state": REQUESTED,
        "attempt": attempt,
        "run_key": request.run_key,
        "days": request.days,
        "since": since,
        "requested_at": now.isoformat(),
        "runs": runs,
    }
    tick.requested.append(key)
    return request


# The tick's summary ---------------------------------------------------------------------------


def _name(key: str) -> str:
    path = Path(key)
    return f"{path.parent.name}/{path.name}"


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


def _summary(tick: LandingTick, files: dict, outcome: OutboxResult) -> str:
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
