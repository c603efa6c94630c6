"""The landing state machine on plain data: files as (size, mtime), runs as outcomes, a fixed clock.

No Dagster, no files on disk: a file's timestamp range comes from the test, and the runs a tick
sees are whatever the test put under each run key (newest first, as Dagster lists them).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import pytest

from keel.alerts.policy import PendingAlert, flush_outbox
from keel.ingest.file_checks import FileFormatError
from keel.ingest.landing import (
    FAILED,
    IN_PROGRESS,
    LOST_RUN_SECONDS,
    MAX_ATTEMPTS,
    RETRY_BASE_SECONDS,
    SETTLE_SECONDS,
    SHOWN,
    SUCCEEDED,
    WILL_RETRY,
    LandingCursor,
    RunOutcome,
    landing_tick,
    retry_delay,
)
from keel.ingest.landing_folder import LandingFile, file_days

START = dt.date(2026, 1, 1)
T0 = dt.datetime(2026, 1, 10, 12, 0, tzinfo=dt.UTC)
DAGSTER = "http://dagster.test:3000"
FOLDER = "/landing/payments"


def at(day: dt.date, hour: int = 0) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(hour), dt.UTC)


class Sink:
    name = "capture"

    def __init__(self) -> None:
        self.alerts, self.down = [], False

    def send(self, alert) -> None:
        if self.down:
            raise ConnectionError("the capture sink is down")
        self.alerts.append(alert)


class Landing:
    """The landing folder and the runs under each run key as a tick sees them, ticked by hand."""

    def __init__(self, source) -> None:
        self.source, self.now, self.sink = source, T0, Sink()
        self.listed: dict[str, LandingFile] = {}
        self.spans: dict[str, object] = {}
        self.runs: dict[str, list[RunOutcome]] = {}
        self.cursor: str | None = None
        self.looked_up: list[str] = []

    def drop(self, name: str, first: dt.date = START, last: dt.date | None = None, *, size=100, age_s=60.0) -> str:
        path = f"{FOLDER}/{name}"
        mtime_ns = round((self.now.timestamp() - age_s) * 1e9)
        self.listed[path] = LandingFile(path, self.source, size, mtime_ns)
        self.spans[path] = (at(first, 8), at(last or first, 20))
        return path

    def span(self, path, column):
        assert column == self.source.timestamp
        found = self.spans[str(path)]
        if isinstance(found, Exception):
            raise found
        return found

    def run(self, run_key: str, status: str, run_id: str, error: str = "") -> None:
        self.runs.setdefault(run_key, []).insert(0, RunOutcome(status, run_id, error))

    def lookup(self, run_key: str) -> list[RunOutcome]:
        self.looked_up.append(run_key)
        return self.runs.get(run_key, [])

    def tick(self):
        tick = landing_tick(
            self.cursor,
            list(self.listed.values()),
            self.lookup,
            now=self.now,
            start=START,
            dagster_url=DAGSTER,
            span=self.span,
        )
        outcome = flush_outbox(tick.cursor.pending, tick.alerts, [self.sink], now=self.now)
        self.cursor, self.summary = tick.cursor_after(outcome), tick.summary(outcome)
        return tick

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)

    def files(self) -> dict[str, dict]:
        return json.loads(self.cursor)["files"]


@pytest.fixture
def landing(payments) -> Landing:
    return Landing(payments)


def signature(landing: Landing, path: str) -> str:
    return landing.listed[path].signature


def fail_until_given_up(landing: Landing, path: str) -> None:
    for attempt in range(1, MAX_ATTEMPTS + 1):
        (request,) = landing.tick().requests
        assert request.attempt == attempt
        landing.run(request.run_key, FAILED, f"run-{attempt}", f"no valid rows ({attempt})")
        landing.tick()
        if attempt < MAX_ATTEMPTS:
            landing.advance(retry_delay(attempt).total_seconds())


def test_a_new_settled_file_is_requested_over_its_days_under_path_signature_attempt(landing, payments):
    path = landing.drop("a.jsonl", START, START + dt.timedelta(days=2), size=1834)

    tick = landing.tick()

    (request,) = tick.requests
    sig = signature(landing, path)
    assert (request.file, request.source, request.attempt) == (path, payments, 1)
    assert (request.first, request.last, request.days) == (START, dt.date(2026, 1, 3), "2026-01-01..2026-01-03")
    assert request.run_key == f"{path}:{sig}:1" and sig.startswith("1834:")
    assert request.tags == {"keel/file": path, "keel/source": "payments", "keel/attempt": "1"}
    assert json.loads(landing.cursor) == {
        "files": {
            path: {
                "signature": sig,
                "state": "requested",
                "attempt": 1,
                "run_key": request.run_key,
                "days": "2026-01-01..2026-01-03",
                "since": T0.isoformat(),
                "requested_at": T0.isoformat(),
                "runs": 0,
            }
        },
        "pending": [],
    }
    assert landing.summary == "requested 1: payments/a.jsonl"
    assert tick.alerts == [] and tick.warnings == []


def test_a_one_day_file_names_its_day_and_days_are_clipped_to_the_partitions(landing):
    one = landing.drop("one.jsonl", dt.date(2026, 1, 4))
    wide = landing.drop("wide.jsonl", dt.date(2025, 12, 1), dt.date(2026, 2, 1))

    requests = {r.file: r for r in landing.tick().requests}

    assert requests[one].days == "2026-01-04"
    assert (requests[wide].first, requests[wide].last) == (START, T0.date())


def test_a_file_still_being_written_waits_until_it_has_been_still_for_the_settle_time(landing):
    path = landing.drop("copying.jsonl", age_s=0)

    assert landing.tick().requests == []
    assert path not in landing.files()
    landing.advance(SETTLE_SECONDS - 0.5)
    assert landing.tick().requests == []
    landing.advance(0.5)
    assert [r.file for r in landing.tick().requests] == [path]


def test_the_file_waits_while_a_run_is_queued_running_or_about_to_be_retried_by_dagster(landing):
    path = landing.drop("a.jsonl")
    (request,) = landing.tick().requests
    landing.run(request.run_key, IN_PROGRESS, "r1")

    # Runs that exist are waited for however long they take.
    landing.advance(LOST_RUN_SECONDS + 24 * 3600)
    assert landing.tick().requests == []
    assert landing.summary == "no new files; waiting for the runs of 1 file(s)"

    landing.runs[request.run_key] = [RunOutcome(WILL_RETRY, "r1", "the catalog is locked")]
    assert landing.tick().requests == []
    assert landing.files()[path]["state"] == "requested"
    assert landing.looked_up.count(request.run_key) == 2


def test_a_successful_run_lands_the_file_keeping_only_its_signature_and_run_id(landing):
    path = landing.drop("a.jsonl")
    (request,) = landing.tick().requests
    # Dagster's own retry succeeded after the first run failed.
    landing.run(request.run_key, FAILED, "r1", "the catalog is locked")
    landing.run(request.run_key, SUCCEEDED, "r2")

    tick = landing.tick()

    assert landing.summary == "landed 1: payments/a.jsonl"
    assert tick.landed == [path] and tick.warnings == []
    assert landing.files()[path] == {"signature": signature(landing, path), "state": "landed", "run_id": "r2"}
    landing.advance(30 * 24 * 3600)
    assert landing.tick().requests == [] and landing.summary == "no new files"
    assert landing.sink.alerts == []


def test_failed_attempts_are_retried_after_1_2_4_minutes_keeping_since_and_counting_runs(landing):
    assert [retry_delay(a) for a in range(1, MAX_ATTEMPTS)] == [
        dt.timedelta(seconds=RETRY_BASE_SECONDS * f) for f in (1, 2, 4)
    ]
    assert RETRY_BASE_SECONDS == 60 and MAX_ATTEMPTS == 4
    path = landing.drop("a.jsonl")
    (request,) = landing.tick().requests
    for attempt in (1, 2, 3):
        # Two runs per attempt: Dagster retried the run once itself; the newest run's error is reported.
        landing.run(request.run_key, FAILED, f"r{attempt}a", "an older error")
        landing.run(request.run_key, FAILED, f"r{attempt}b", f"the catalog is locked ({attempt})")
        tick = landing.tick()
        retry_at = landing.now + retry_delay(attempt)
        assert tick.requests == [] and tick.retrying == [path]
        assert tick.warnings == [
            f"{path}: attempt {attempt} failed (run r{attempt}b): the catalog is locked ({attempt})"
        ]
        assert landing.summary == (
            f"failed, retrying 1: payments/a.jsonl (attempt {attempt + 1} of 4 at {retry_at:%H:%M:%S} UTC)"
        )
        entry = landing.files()[path]
        assert (entry["state"], entry["attempt"], entry["runs"]) == ("retry_waiting", attempt, 2 * attempt)
        assert (entry["run_id"], entry["error"]) == (f"r{attempt}b", f"the catalog is locked ({attempt})")
        assert dt.datetime.fromisoformat(entry["retry_at"]) == retry_at

        landing.advance(retry_delay(attempt).total_seconds() - 1)
        assert landing.tick().requests == []
        assert landing.summary == f"no new files; 1 waiting to retry, next payments/a.jsonl at {retry_at:%H:%M:%S} UTC"
        landing.advance(1)
        (request,) = landing.tick().requests
        assert (request.attempt, request.run_key) == (attempt + 1, f"{path}:{signature(landing, path)}:{attempt + 1}")
        assert landing.summary == f"requested 1: payments/a.jsonl (attempt {attempt + 1} of 4)"
        entry = landing.files()[path]
        assert (entry["state"], entry["since"], entry["runs"]) == ("requested", T0.isoformat(), 2 * attempt)
        # A new request's entry is built afresh: the failure's run, error and retry time are gone.
        assert set(entry) == {"signature", "state", "attempt", "run_key", "days", "since", "requested_at", "runs"}


def test_after_the_last_attempt_one_alert_goes_out_and_the_file_waits_until_it_changes(landing):
    path = landing.drop("a.jsonl", START, START + dt.timedelta(days=1), size=1834)
    sig = signature(landing, path)

    fail_until_given_up(landing, path)

    assert landing.summary == "gave up on 1 (alerted): payments/a.jsonl after 4 attempts; 1 alert(s) delivered"
    entry = landing.files()[path]
    assert (entry["state"], entry["attempt"], entry["run_id"]) == ("given_up", 4, "run-4")
    assert "retry_at" not in entry
    (alert,) = landing.sink.alerts
    assert alert.id == hashlib.sha256(f"{path}\x1f{sig}\x1fgiven_up".encode()).hexdigest()[:16]
    assert (alert.condition, alert.status, alert.severity) == ("landing/payments:a.jsonl", "firing", "ERROR")
    assert alert.title == "[ERROR] landing/payments:a.jsonl did not land after 4 attempts"
    modified = dt.datetime.fromtimestamp(int(sig.split(":")[1]) / 1e9, dt.UTC)
    assert alert.text == (
        f"file {path} (1,834 bytes, modified {modified:%Y-%m-%d %H:%M:%S} UTC) for source 'payments', "
        "days 2026-01-01..2026-01-02\n"
        "4 ingest attempts failed; the last, run run-4, failed with: no valid rows (4)\n"
        "Not retried until the file changes: fix the cause, then replace the file or touch it "
        "(a changed file starts over), or launch ingest_payments on it from the Dagster UI."
    )
    assert (alert.run_id, alert.run_url, alert.partition) == (
        "run-4",
        f"{DAGSTER}/runs/run-4",
        "2026-01-01..2026-01-02",
    )
    assert (alert.ts, alert.since) == (landing.now, T0)
    assert alert.metadata == {
        "file": path,
        "source": "payments",
        "attempts": 4,
        "runs": 4,
        "run_id": "run-4",
        "error": "no valid rows (4)",
    }

    for _ in range(3):
        landing.advance(24 * 3600)
        assert landing.tick().requests == [] and landing.summary == "no new files"
    assert len(landing.sink.alerts) == 1

    landing.drop("a.jsonl", size=1835)
    (fresh,) = landing.tick().requests
    assert fresh.attempt == 1 and landing.files()[path]["state"] == "requested"


def test_the_give_up_alert_counts_dagsters_own_retries_and_a_run_that_never_appeared(landing):
    path = landing.drop("a.jsonl")
    for attempt in range(1, MAX_ATTEMPTS + 1):
        (request,) = landing.tick().requests
        if attempt < MAX_ATTEMPTS:
            landing.run(request.run_key, FAILED, f"r{attempt}a", "locked")
            landing.run(request.run_key, FAILED, f"r{attempt}b", "locked")
            landing.tick()
            landing.advance(retry_delay(attempt).total_seconds())
    landing.advance(LOST_RUN_SECONDS)
    landing.tick()

    (alert,) = landing.sink.alerts
    assert (
        "4 ingest attempts failed (6 runs with Dagster's own retries); the last failed with: no run with" in alert.text
    )
    assert (alert.run_id, alert.run_url, alert.metadata["run_id"]) == (None, None, "")
    assert landing.files()[path]["state"] == "given_up"


def test_a_changed_file_starts_over_at_once_whether_waiting_to_retry_or_still_running(landing):
    path = landing.drop("a.jsonl")
    (first,) = landing.tick().requests
    landing.run(first.run_key, FAILED, "r1", "locked")
    landing.tick()
    landing.advance(RETRY_BASE_SECONDS)
    (second,) = landing.tick().requests
    landing.run(second.run_key, FAILED, "r2", "locked")
    landing.tick()
    assert landing.files()[path]["attempt"] == 2

    landing.drop("a.jsonl", dt.date(2026, 1, 4), size=200)
    (fresh,) = landing.tick().requests
    assert (fresh.attempt, fresh.first) == (1, dt.date(2026, 1, 4))
    assert fresh.run_key == f"{path}:{signature(landing, path)}:1" != first.run_key
    entry = landing.files()[path]
    assert (entry["state"], entry["attempt"], entry["runs"], entry["since"]) == (
        "requested",
        1,
        0,
        landing.now.isoformat(),
    )
    assert "error" not in entry

    landing.run(fresh.run_key, IN_PROGRESS, "r3")
    landing.drop("a.jsonl", dt.date(2026, 1, 5), size=300)
    (newer,) = landing.tick().requests
    assert (newer.attempt, newer.first) == (1, dt.date(2026, 1, 5))


def test_a_requested_run_that_never_appears_fails_the_attempt_after_the_lost_run_time(landing):
    path = landing.drop("a.jsonl")
    (request,) = landing.tick().requests

    landing.advance(LOST_RUN_SECONDS - 1)
    assert landing.tick().requests == []
    assert landing.summary == "no new files; waiting for the runs of 1 file(s)"
    landing.advance(1)
    tick = landing.tick()

    assert tick.retrying == [path]
    entry = landing.files()[path]
    assert entry["error"] == (
        f"no run with run key {request.run_key} found 15 min after it was requested (deleted, or never launched)"
    )
    # The cursor says null, as it always has, for an attempt without a run.
    assert "run_id" in entry and entry["run_id"] is None
    assert tick.warnings == [f"{path}: attempt 1 failed (run None): {entry['error']}"]


def test_files_that_cannot_be_ingested_are_alerted_once_with_why_and_never_requested(landing, payments):
    broken = landing.drop("broken.parquet", size=10)
    landing.spans[broken] = FileFormatError(f"{broken}: not a Parquet file")
    empty = landing.drop("empty.jsonl")
    landing.spans[empty] = None
    old = landing.drop("old.jsonl", dt.date(2020, 5, 1))

    tick = landing.tick()

    assert tick.requests == []
    assert landing.summary == (
        f"cannot ingest 3 (alerted): {broken}: not a Parquet file; {empty}: no parsable event_ts values; "
        f"{old}: events fall outside 2026-01-01..2026-01-10; 3 alert(s) delivered"
    )
    files = landing.files()
    assert files[old] == {
        "signature": signature(landing, old),
        "state": "unreadable",
        "error": f"{old}: events fall outside 2026-01-01..2026-01-10",
    }
    alert = {a.condition: a for a in landing.sink.alerts}["landing/payments:broken.parquet"]
    sig = signature(landing, broken)
    assert alert.id == hashlib.sha256(f"{broken}\x1f{sig}\x1funreadable".encode()).hexdigest()[:16]
    assert alert.title == "[ERROR] landing/payments:broken.parquet cannot be ingested"
    lines = alert.text.split("\n")
    assert lines[0].startswith(f"file {broken} (10 bytes, modified ") and lines[0].endswith(" for source 'payments'")
    assert lines[1] == "not a Parquet file"
    assert lines[2] == (
        "No run was started and this version of the file is not tried again: replace it with a readable file "
        "whose event_ts values fall in the partitions."
    )
    assert (alert.run_url, alert.run_id, alert.partition, alert.since) == (None, None, None, T0)
    assert alert.metadata == {"file": broken, "source": "payments", "error": f"{broken}: not a Parquet file"}

    landing.advance(24 * 3600)
    assert landing.tick().alerts == [] and landing.summary == "no new files"
    assert len(landing.sink.alerts) == 3


def test_a_removed_file_is_forgotten_said_so_only_if_it_was_waiting_to_retry(landing):
    waiting = landing.drop("waiting.jsonl")
    running = landing.drop("running.jsonl")
    landed = landing.drop("landed.jsonl")
    requests = {r.file: r for r in landing.tick().requests}
    landing.run(requests[waiting].run_key, FAILED, "r1", "locked")
    landing.run(requests[running].run_key, IN_PROGRESS, "r2")
    landing.run(requests[landed].run_key, SUCCEEDED, "r3")
    landing.tick()
    landing.listed.clear()

    tick = landing.tick()

    assert (
        landing.summary
        == "removed before landing, not retried: payments/waiting.jsonl; waiting for the runs of 1 file(s)"
    )
    assert tick.warnings == [f"{waiting} was removed before it landed; it is not retried"]
    # A requested file stays until its run ends, so a run still going is not lost track of.
    assert list(landing.files()) == [running]


def test_a_file_gone_between_listing_and_looking_at_it_is_neither_requested_nor_forgotten(landing, payments):
    path = landing.drop("a.jsonl")
    (request,) = landing.tick().requests
    landing.run(request.run_key, FAILED, "r1", "locked")
    landing.tick()
    landing.advance(RETRY_BASE_SECONDS)
    landing.listed[path] = LandingFile(path, payments)

    tick = landing.tick()

    assert tick.requests == [] and tick.removed == []
    assert landing.files()[path]["state"] == "retry_waiting"


def test_the_earlier_cursor_shape_is_read_as_runs_to_follow(landing):
    landed = landing.drop("landed.jsonl")
    failed = landing.drop("failed.jsonl")
    never = landing.drop("never.jsonl")
    unreadable = landing.drop("old.jsonl", dt.date(2020, 5, 1))
    gone = f"{FOLDER}/gone.jsonl"
    signatures = {p: signature(landing, p) for p in (landed, failed, never, unreadable)} | {gone: "5:6"}
    landing.run(f"{landed}:{signatures[landed]}", SUCCEEDED, "r1")
    landing.run(f"{failed}:{signatures[failed]}", FAILED, "r2", "locked")
    landing.cursor = json.dumps(signatures)

    parsed = LandingCursor.parse(landing.cursor, T0)
    assert parsed.pending == []
    assert parsed.files[gone] == {
        "signature": "5:6",
        "state": "requested",
        "attempt": 1,
        "run_key": f"{gone}:5:6",
        "since": T0.isoformat(),
        "requested_at": T0.isoformat(),
        "runs": 0,
        "legacy": True,
    }

    tick = landing.tick()

    files = landing.files()
    assert {k: e["state"] for k, e in files.items()} == {
        landed: "landed",
        failed: "retry_waiting",
        never: "requested",
        unreadable: "unreadable",
    }
    assert files[landed]["run_id"] == "r1"
    assert "legacy" not in files[failed] and (files[failed]["attempt"], files[failed]["runs"]) == (1, 1)
    # A file with no run under the old key is looked at afresh, under a key of the new shape.
    assert [r.run_key for r in tick.requests] == [f"{never}:{signatures[never]}:1"]
    assert [a.condition for a in landing.sink.alerts] == ["landing/payments:old.jsonl"]
    landing.advance(RETRY_BASE_SECONDS)
    assert [(r.file, r.attempt) for r in landing.tick().requests] == [(failed, 2)]


def test_the_cursor_round_trips_with_its_pending_alerts(landing):
    landing.drop("old.jsonl", dt.date(2020, 5, 1))
    landing.sink.down = True
    landing.tick()
    assert landing.summary == "cannot ingest 1 (alerted): " + (
        f"{FOLDER}/old.jsonl: events fall outside 2026-01-01..2026-01-10; 1 alert(s) pending for capture"
    )

    cursor = LandingCursor.parse(landing.cursor, landing.now)
    (pending,) = cursor.pending
    assert isinstance(pending, PendingAlert) and pending.sinks == ("capture",)
    assert "the capture sink is down" in pending.error
    assert json.loads(cursor.dumps()) == json.loads(landing.cursor)

    landing.advance(60)
    assert landing.tick().alerts == []
    assert landing.summary == "no new files; 1 alert(s) pending for capture"
    landing.sink.down = False
    landing.tick()
    assert landing.summary == "no new files; 1 alert(s) delivered"
    assert json.loads(landing.cursor)["pending"] == []


def test_the_summary_names_the_first_files_counts_the_rest_and_the_next_retry(landing):
    paths = [landing.drop(f"f{i:02}.jsonl") for i in range(SHOWN + 2)]
    requests = {r.file: r for r in landing.tick().requests}
    assert landing.summary == (
        "requested 12: " + ", ".join(f"payments/f{i:02}.jsonl" for i in range(SHOWN)) + " and 2 more"
    )
    landing.run(requests[paths[0]].run_key, FAILED, "r0", "locked")
    landing.tick()
    landing.advance(1)
    landing.run(requests[paths[1]].run_key, FAILED, "r1", "locked")
    landing.run(requests[paths[2]].run_key, SUCCEEDED, "r2")

    landing.tick()

    retry_at = landing.now + retry_delay(1)
    first_retry = retry_at - dt.timedelta(seconds=1)
    assert landing.summary == (
        "landed 1: payments/f02.jsonl; "
        f"failed, retrying 1: payments/f01.jsonl (attempt 2 of 4 at {retry_at:%H:%M:%S} UTC); "
        "waiting for the runs of 9 file(s); "
        f"1 waiting to retry, next payments/f00.jsonl at {first_retry:%H:%M:%S} UTC"
    )


def test_file_days_reads_the_range_with_the_source_timestamp_column(payments):
    seen = []

    def span(path, column):
        seen.append((str(path), column))
        return at(dt.date(2026, 1, 2), 23), at(dt.date(2026, 1, 3), 1)

    assert file_days(Path("/x/a.csv"), payments, START, T0.date(), span) == (dt.date(2026, 1, 2), dt.date(2026, 1, 3))
    assert seen == [("/x/a.csv", "event_ts")]


def test_the_run_keys_of_a_file_as_it_is_now_share_its_version_prefix(tmp_path):
    from keel.ingest.landing_folder import run_key, version_prefix

    path = tmp_path / "a.csv"
    path.write_text("event_id\n1\n")
    stat = path.stat()
    prefix = version_prefix(path)
    assert run_key(str(path), f"{stat.st_size}:{stat.st_mtime_ns}", 3).startswith(prefix)
    path.write_text("event_id\n1\n2\n")  # a changed file is another version
    assert version_prefix(path) != prefix
