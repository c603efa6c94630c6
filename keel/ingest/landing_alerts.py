"""The landing folder's alerts: a file given up on after its last attempt, or one that cannot be ingested.

Each names the file's version (size, mtime), its source and days, why it failed and what a
person does next; its id follows from the file's version and what happened to it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

from keel.alerts.policy import Alert, plain_metadata, run_url
from keel.dsl import EventSource


def clip(text: str, limit: int = 500) -> str:
    """``text`` on one line, at most ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


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


def given_up_alert(key: str, entry: dict, now: dt.datetime, dagster_url: str | None) -> Alert:
    source = Path(key).parent.name
    attempts, runs = int(entry["attempt"]), int(entry.get("runs", 0))
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
                f"(a changed file starts over), or launch ingest_{source} on it from the Dagster UI.",
            )
        ),
        run_url=run_url(dagster_url, entry.get("run_id")),
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
                "error": clip(entry.get("error", ""), 200),
            }
        ),
    )


def unreadable_alert(key: str, source: EventSource, signature: str, reason: str, now: dt.datetime) -> Alert:
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
        metadata=plain_metadata({"file": key, "source": source.name, "error": clip(reason, 200)}),
    )
