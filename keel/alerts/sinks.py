"""Where monitoring alerts go: the console, a JSONL file, a Slack-compatible webhook.

Each sink's ``send`` raises when the alert did not get there, so ``keel.alerts.policy.deliver``
can keep it pending. The webhook retries connection errors, timeouts, 5xx and 429 (waiting
as Retry-After says, within bounds) with capped exponential backoff inside a time budget,
never retries another 4xx, and never prints its URL whole: a Slack webhook URL is a secret.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.utils
import http.client
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO

from keel.alerts.policy import Alert, Sink
from keel.config import Settings, redact_url


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
