"""Monitoring alerts: check evaluations in, one deduplicated alert per condition out, to the
console, a JSONL file and a Slack-compatible webhook.

``reconcile`` is the whole alerting policy and a pure function of (open conditions,
evaluations): a condition fires once when its check starts failing, fires again only if it
escalates from WARN to ERROR, and sends one ``resolved`` alert when the check passes again.
``flush_outbox`` delivers new alerts plus those a sink failed to take before, so an outage
of the webhook delays alerts instead of losing them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol


class Sink(Protocol):
    """Somewhere alerts go (keel.alerts.sinks has the console, JSONL and webhook ones). ``send`` raises when the alert did not get there."""

    name: str

    def send(self, alert: Alert) -> None: ...


SEVERITIES = ("WARN", "ERROR")
_RANK = {"WARN": 0, "ERROR": 1}
# Pending alerts wait for a sink at most this long, then are dropped with an error. Time, not a
# count of attempts: how many ticks an outage spans depends on the tick interval.
MAX_PENDING_AGE = dt.timedelta(days=1)
# ... and at most this many wait, the oldest dropped first, so the sensor cursor stays small.
MAX_PENDING = 200
_METADATA_ITEMS = 12
_METADATA_TEXT = 200

Scalar = bool | int | float | str


@dataclass(frozen=True, kw_only=True)
class Evaluation:
    """One evaluation of a monitoring check, as the alert engine sees it."""

    condition: str
    passed: bool
    severity: str
    ts: dt.datetime
    description: str = ""
    run_id: str | None = None
    partition: str | None = None
    metadata: Mapping[str, Scalar] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"evaluation of '{self.condition}': severity {self.severity!r} is not WARN or ERROR")
        if self.ts.tzinfo is None:
            raise ValueError(f"evaluation of '{self.condition}': ts {self.ts} has no time zone (give a UTC datetime)")


@dataclass(frozen=True, kw_only=True)
class Alert:
    """What is sent. ``id`` is stable: the same condition, episode, status and severity always
    give the same id, so a receiver can drop a delivery retried after a partial failure."""

    id: str
    condition: str
    status: Literal["firing", "resolved"]
    severity: str
    title: str
    text: str
    run_url: str | None
    run_id: str | None
    partition: str | None
    ts: dt.datetime
    since: dt.datetime
    metadata: Mapping[str, Scalar] = field(default_factory=dict)

    def to_dict(self) -> dict:
        row = dataclasses.asdict(self)
        row["ts"], row["since"] = self.ts.isoformat(), self.since.isoformat()
        row["metadata"] = dict(self.metadata)
        return row

    @classmethod
    def from_dict(cls, row: Mapping) -> Alert:
        return cls(
            **{
                **row,
                "ts": dt.datetime.fromisoformat(row["ts"]),
                "since": dt.datetime.fromisoformat(row["since"]),
            }
        )


def plain_metadata(values: Mapping[str, object]) -> dict[str, Scalar]:
    """The numbers, booleans and short texts of ``values``, at most a dozen: what fits in an alert."""
    out: dict[str, Scalar] = {}
    for key, value in values.items():
        if len(out) == _METADATA_ITEMS:
            break
        if isinstance(value, float) and not math.isfinite(value):
            out[key] = str(value)
        elif isinstance(value, bool | int | float) or (isinstance(value, str) and len(value) <= _METADATA_TEXT):
            out[key] = value
    return out


def run_url(dagster_url: str | None, run_id: str | None) -> str | None:
    return f"{dagster_url.rstrip('/')}/runs/{run_id}" if dagster_url and run_id else None


def reconcile(
    state: Mapping[str, Mapping], evaluations: Iterable[Evaluation], *, dagster_url: str | None = None
) -> tuple[list[Alert], dict[str, dict]]:
    """The alerts ``evaluations`` call for, in order, and the open conditions after them.

    ``state`` maps each open (failing) condition to when it opened, its severity, when it was
    last seen failing and how often; it is not modified. A condition open at ERROR stays at
    ERROR through WARN failures, so WARN-ERROR-WARN-ERROR flapping escalates once.
    """
    open_ = {condition: dict(episode) for condition, episode in state.items()}
    alerts: list[Alert] = []
    for e in evaluations:
        episode = open_.get(e.condition)
        ts = e.ts.astimezone(dt.UTC)
        if not e.passed and episode is None:
            open_[e.condition] = {
                "severity": e.severity,
                "since": ts.isoformat(),
                "last_seen": ts.isoformat(),
                "failures": 1,
            }
            alerts.append(_firing(e, ts, ts, dagster_url, escalated_from=None))
        elif not e.passed:
            episode["last_seen"] = ts.isoformat()
            episode["failures"] = int(episode.get("failures", 1)) + 1
            if _RANK[e.severity] > _RANK[episode["severity"]]:
                since = dt.datetime.fromisoformat(episode["since"])
                alerts.append(_firing(e, ts, since, dagster_url, escalated_from=episode["severity"]))
                episode["severity"] = e.severity
        elif episode is not None:
            del open_[e.condition]
            alerts.append(_resolved(e, ts, episode, dagster_url))
    return alerts, open_


def _alert_id(condition: str, since: dt.datetime, status: str, severity: str) -> str:
    key = "\x1f".join((condition, since.isoformat(), status, severity))
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _details(e: Evaluation) -> str:
    parts = [e.description.strip()] if e.description.strip() else []
    if e.partition:
        parts.append(f"partition {e.partition}")
    if e.metadata:
        parts.append(", ".join(f"{k}={_number(v)}" for k, v in e.metadata.items()))
    return "\n".join(parts)


def _number(value: Scalar) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _firing(
    e: Evaluation, ts: dt.datetime, since: dt.datetime, dagster_url: str | None, *, escalated_from: str | None
) -> Alert:
    if escalated_from:
        title = f"[{e.severity}] {e.condition} escalated from {escalated_from}"
        lead = (
            f"failing since {since:%Y-%m-%d %H:%M} UTC ({_duration((ts - since).total_seconds())}), now at {e.severity}"
        )
    else:
        title = f"[{e.severity}] {e.condition} is failing"
        lead = ""
    return Alert(
        id=_alert_id(e.condition, since, "firing", e.severity),
        condition=e.condition,
        status="firing",
        severity=e.severity,
        title=title,
        text="\n".join(p for p in (lead, _details(e)) if p),
        run_url=run_url(dagster_url, e.run_id),
        run_id=e.run_id,
        partition=e.partition,
        ts=ts,
        since=since,
        metadata=dict(e.metadata),
    )


def _resolved(e: Evaluation, ts: dt.datetime, episode: Mapping, dagster_url: str | None) -> Alert:
    since = dt.datetime.fromisoformat(episode["since"])
    failures = int(episode.get("failures", 1))
    lead = (
        f"passing again after {_duration((ts - since).total_seconds())} "
        f"(failing since {since:%Y-%m-%d %H:%M} UTC, {failures} failed evaluation{'s' if failures != 1 else ''})"
    )
    return Alert(
        id=_alert_id(e.condition, since, "resolved", episode["severity"]),
        condition=e.condition,
        status="resolved",
        severity=episode["severity"],
        title=f"[RESOLVED] {e.condition} is passing again",
        text="\n".join(p for p in (lead, _details(e)) if p),
        run_url=run_url(dagster_url, e.run_id),
        run_id=e.run_id,
        partition=e.partition,
        ts=ts,
        since=since,
        metadata=dict(e.metadata),
    )


def _duration(seconds: float) -> str:
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    minutes, hours, days = s // 60 % 60, s // 3600 % 24, s // 86400
    if days:
        return f"{days} d {hours} h"
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"


# Delivery ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryFailure:
    alert: Alert
    sink: str
    error: str


@dataclass
class DeliveryReport:
    delivered: list[tuple[Alert, str]] = field(default_factory=list)
    failures: list[DeliveryFailure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def failed_sinks(self, alert: Alert) -> tuple[str, ...]:
        return tuple(f.sink for f in self.failures if f.alert.id == alert.id)


def deliver(alerts: Sequence[Alert], sinks: Sequence[Sink]) -> DeliveryReport:
    """Each alert to each sink; a sink that fails does not stop the others."""
    report = DeliveryReport()
    for alert in alerts:
        for sink in sinks:
            try:
                sink.send(alert)
            except Exception as exc:  # any sink failure is reported, not raised: the others still get the alert
                report.failures.append(DeliveryFailure(alert, sink.name, str(exc) or type(exc).__name__))
            else:
                report.delivered.append((alert, sink.name))
    return report


@dataclass(frozen=True)
class PendingAlert:
    """An alert some sinks have not taken yet."""

    alert: Alert
    sinks: tuple[str, ...]
    attempts: int
    first_failed: dt.datetime
    error: str

    def to_dict(self) -> dict:
        return {
            "alert": self.alert.to_dict(),
            "sinks": list(self.sinks),
            "attempts": self.attempts,
            "first_failed": self.first_failed.isoformat(),
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, row: Mapping) -> PendingAlert:
        return cls(
            alert=Alert.from_dict(row["alert"]),
            sinks=tuple(row["sinks"]),
            attempts=int(row["attempts"]),
            first_failed=dt.datetime.fromisoformat(row["first_failed"]),
            error=str(row.get("error", "")),
        )


@dataclass
class OutboxResult:
    report: DeliveryReport
    pending: list[PendingAlert]
    dropped: list[tuple[PendingAlert, str]]


def flush_outbox(
    pending: Sequence[PendingAlert],
    alerts: Sequence[Alert],
    sinks: Sequence[Sink],
    *,
    now: dt.datetime,
    max_age: dt.timedelta = MAX_PENDING_AGE,
    max_pending: int = MAX_PENDING,
) -> OutboxResult:
    """Retry ``pending`` on the sinks that missed them, then send ``alerts`` everywhere.

    Alerts still missing a sink stay pending, until ``max_age`` after their first failure or
    until more than ``max_pending`` wait; those are returned as dropped, with why.
    """
    by_name = {sink.name: sink for sink in sinks}
    report = DeliveryReport()
    kept: list[PendingAlert] = []
    dropped: list[tuple[PendingAlert, str]] = []
    for item in pending:
        targets = [by_name[name] for name in item.sinks if name in by_name]
        if not targets:
            dropped.append((item, f"sink(s) {', '.join(item.sinks)} no longer configured"))
            continue
        retried = deliver([item.alert], targets)
        report.delivered += retried.delivered
        report.failures += retried.failures
        if retried.failures:
            again = dataclasses.replace(
                item,
                sinks=tuple(f.sink for f in retried.failures),
                attempts=item.attempts + 1,
                error=retried.failures[-1].error,
            )
            if now - item.first_failed >= max_age:
                dropped.append((again, f"undelivered for {_duration((now - item.first_failed).total_seconds())}"))
            else:
                kept.append(again)
    fresh = deliver(alerts, sinks)
    report.delivered += fresh.delivered
    report.failures += fresh.failures
    for alert in alerts:
        missed = fresh.failed_sinks(alert)
        if missed:
            error = next(f.error for f in reversed(fresh.failures) if f.alert.id == alert.id)
            kept.append(PendingAlert(alert, missed, 1, now, error))
    if len(kept) > max_pending:
        overflow, kept = kept[: len(kept) - max_pending], kept[len(kept) - max_pending :]
        dropped += [(item, f"more than {max_pending} alerts pending") for item in overflow]
    return OutboxResult(report, kept, dropped)
