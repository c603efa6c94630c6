"""Monitoring alerts: check evaluations in, one deduplicated alert per condition out, to the
console, a JSONL file and a Slack-compatible webhook.

``reconcile`` is the whole alerting policy and a pure function of (open conditions,
evaluations): a condition fires once when its check starts failing, fires again only if it
escalates from WARN to ERROR, and sends one ``resolved`` alert when the check passes again.
``flush_outbox`` delivers new alerts plus those a sink failed to take before, so an outage
of the webhook delays alerts instead of losing them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import email.utils
import hashlib
import http.client
import json
import math
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal, Protocol

from keel.config import Settings, redact_url

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


# Sinks ---------------------------------------------------------------------------------------


class Sink(Protocol):
    """Somewhere alerts go. ``send`` raises when the alert did not get there."""

    name: str

    def send(self, alert: Alert) -> None: ...


class ConsoleSink:
    """One human-readable line per alert; stderr unless told otherwise."""

    def __init__(self, stream: IO[str] | None = None, *, name: str = "console") -> None:
        self._stream = stream
        self.name = name

    def send(self, alert: Alert) -> None:
        stream = self._stream or sys.stderr
        stream.write(format_line(alert) + "\n")
        stream.flush()


def format_line(alert: Alert) -> str:
    """``2026-03-02T01:00:05Z FIRING   ERROR monitoring/churn_drift:drift is failing: ... <run url>``."""
    status = "FIRING" if alert.status == "firing" else "RESOLVED"
    body = " | ".join(line for line in alert.text.splitlines() if line.strip())
    head = alert.title.split("] ", 1)[-1]
    line = f"{alert.ts:%Y-%m-%dT%H:%M:%SZ} {status:<8} {alert.severity:<5} {head}"
    if body:
        line += f": {body}"
    return line + (f" <{alert.run_url}>" if alert.run_url else "")


class JsonlSink:
    """Appends one JSON object per alert to ``path``, folders created as needed.

    Each alert is one ``write`` of a whole line to a file opened for appending, then fsynced;
    if a crash ever left a line without its newline, the next alert starts on a fresh line so
    only that torn line is unreadable.
    """

    def __init__(self, path: str | os.PathLike, *, name: str = "file") -> None:
        self.path = Path(path)
        self.name = name

    def send(self, alert: Alert) -> None:
        line = json.dumps(alert.to_dict(), sort_keys=True, ensure_ascii=False) + "\n"
        data = line.encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(f"alert file {self.path}: wrote {written} of {len(data)} bytes (is the disk full?)")
            os.fsync(fd)
        finally:
            os.close(fd)


class WebhookError(RuntimeError):
    """The webhook did not take an alert; the message names the (redacted) URL, what happened and the fix."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # urllib would replay a redirected POST as a GET without its body; report the redirect instead.
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class WebhookSink:
    """Posts Slack-compatible JSON (``text`` plus a mrkdwn section block) to an incoming webhook.

    Connection errors, timeouts, HTTP 5xx and 429 are retried ``retries`` times with
    exponential backoff (``backoff_s`` doubling up to ``max_backoff_s``); a 429's
    ``Retry-After`` is waited when it is at most ``max_backoff_s``, and a longer one ends the
    attempt (the caller retries later, as the server asked). Other answers are not retried.
    ``budget_s`` bounds the time all ``send`` calls of this sink spend together, counted from
    the first: build one sink per batch (a sensor tick) so the batch stays within its limit.
    """

    def __init__(
        self,
        url: str,
        *,
        retries: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8,
        timeout_s: float = 5,
        budget_s: float = 30,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        name: str = "webhook",
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"webhook {redact_url(url)}: not an http(s) URL (set KEEL_ALERT_WEBHOOK to https://...)")
        self.url = url
        self.shown_url = redact_url(url)
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.timeout_s, self.budget_s = timeout_s, budget_s
        self._sleep, self._clock = sleep, clock
        self._deadline: float | None = None
        self._opener = urllib.request.build_opener(_NoRedirect)
        self.name = name

    def send(self, alert: Alert) -> None:
        body = json.dumps(slack_payload(alert)).encode()
        if self._deadline is None:
            self._deadline = self._clock() + self.budget_s
        attempts = 0
        problem = ""
        while True:
            remaining = self._deadline - self._clock()
            if remaining <= 0:
                raise WebhookError(
                    f"webhook {self.shown_url}: not sent, this batch's {self.budget_s:g} s time budget is spent"
                    + (f" (last problem: {problem})" if problem else "")
                    + "; the alert is kept and retried with the next batch"
                )
            attempts += 1
            wait = min(self.backoff_s * 2 ** (attempts - 1), self.max_backoff_s)
            try:
                self._post(body, min(self.timeout_s, remaining))
                return
            except urllib.error.HTTPError as exc:
                status = exc.code
                detail = _body_excerpt(exc)
                problem = f"HTTP {status}" + (f" ({detail})" if detail else "")
                if status != 429 and status < 500:
                    raise WebhookError(
                        f"webhook {self.shown_url} answered {problem}: {_fix_for(status, exc.headers)}"
                    ) from None
                asked = _retry_after(exc.headers.get("Retry-After")) if status == 429 else None
                if asked is not None:
                    if asked > self.max_backoff_s:
                        raise WebhookError(
                            f"webhook {self.shown_url} answered {problem} and asked to wait {asked:g} s, "
                            f"longer than the {self.max_backoff_s:g} s waited within a batch; the alert is kept "
                            "and retried with a later batch"
                        ) from None
                    wait = asked
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
                if isinstance(reason, ssl.SSLCertVerificationError):
                    raise WebhookError(
                        f"webhook {self.shown_url}: its TLS certificate is not trusted ({reason.verify_message}); "
                        "fix the server's certificate, or point SSL_CERT_FILE at the CA bundle that signs it"
                    ) from None
                problem = f"no answer ({type(reason).__name__}: {reason})" if str(reason) else type(reason).__name__
            if attempts > self.retries or self._clock() + wait >= self._deadline:
                raise WebhookError(
                    f"webhook {self.shown_url}: {problem} after {attempts} attempt(s): check the server is up "
                    "and reachable and that KEEL_ALERT_WEBHOOK is right; the alert is kept and retried"
                )
            self._sleep(wait)

    def _post(self, body: bytes, timeout: float) -> None:
        request = urllib.request.Request(
            self.url, data=body, method="POST", headers={"Content-Type": "application/json; charset=utf-8"}
        )
        with self._opener.open(request, timeout=timeout) as response:
            response.read()


def _body_excerpt(exc: urllib.error.HTTPError) -> str:
    try:
        text = exc.read(300).decode("utf-8", "replace")
    except (OSError, http.client.HTTPException):
        return ""
    finally:
        exc.close()
    return " ".join(text.split())[:200]


def _fix_for(status: int, headers) -> str:
    if 300 <= status < 400:
        target = headers.get("Location") if headers else None
        where = f" to {redact_url(target)}" if target else ""
        return f"the URL redirects{where}; set KEEL_ALERT_WEBHOOK to the final https:// address"
    if status in (401, 403):
        return "the webhook refuses the request (revoked token or removed app); create a new incoming webhook and set KEEL_ALERT_WEBHOOK to it"
    if status in (404, 410):
        return "there is no webhook at this address (deleted or mistyped); set KEEL_ALERT_WEBHOOK to a current incoming webhook URL"
    return "the server rejected the message; check that KEEL_ALERT_WEBHOOK is a Slack-compatible incoming webhook taking JSON posts"


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    with contextlib.suppress(TypeError, ValueError):
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())
    return None


def slack_payload(alert: Alert) -> dict:
    """``text`` for notifications and clients without blocks, and one mrkdwn section with the run link."""
    icon = {
        "firing": ":rotating_light:" if alert.severity == "ERROR" else ":warning:",
        "resolved": ":white_check_mark:",
    }
    lines = [f"{icon[alert.status]} *{_mrkdwn(alert.title)}*"]
    lines += [_mrkdwn(line) for line in alert.text.splitlines() if line.strip()]
    if alert.run_url:
        lines.append(f"<{alert.run_url}|View run {(alert.run_id or '')[:8]} in Dagster>")
    section = "\n".join(lines)
    if len(section) > 3000:
        section = section[:2990] + "\n…"
    context = f"{alert.ts:%Y-%m-%d %H:%M:%S} UTC · alert {alert.id}"
    return {
        "text": f"{alert.title}" + (f" {alert.run_url}" if alert.run_url else ""),
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": section}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": context}]},
        ],
    }


def _mrkdwn(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def sinks_from_settings(
    settings: Settings, *, stream: IO[str] | None = None, sleep: Callable[[float], None] = time.sleep
) -> list[Sink]:
    """The console, ``KEEL_ALERT_FILE``, and ``KEEL_ALERT_WEBHOOK`` when it is set."""
    sinks: list[Sink] = [ConsoleSink(stream), JsonlSink(settings.alert_file)]
    if settings.alert_webhook:
        sinks.append(WebhookSink(settings.alert_webhook, sleep=sleep))
    return sinks


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
