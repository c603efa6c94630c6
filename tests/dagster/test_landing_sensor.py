"""The landing-folder sensor on a real temporary instance: one run request per new or changed file,
followed until its run succeeds, retried with backoff when it fails, alerted when it cannot land.

Runs are created as the sensor daemon creates them (the job's, the request's and the sensor's
tags and the run key) and moved through their states by reporting events to the instance; the
sensor's clock is a test clock and its alerts go to a capturing sink.
"""

import dataclasses
import datetime as dt
import json
import os
import time

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster._core.remote_origin import InProcessCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

from assets.raw_events import ingest_run_config, raw_event_definitions
from keel.project import Project
from resources import lakehouse_resource
from sensors.landing import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    LOST_RUN_SECONDS,
    MAX_ATTEMPTS,
    RETRY_BASE_SECONDS,
    RUN_KEY_TAG,
    SETTLE_SECONDS,
    landing_sensor,
)
from tests.factories.payments import payment_rows

START = dt.date(2026, 1, 1)
DAGSTER = "http://dagster.test:3000"
# Where a queued run says its job comes from: the code location's Definitions.
REPOSITORY = RemoteRepositoryOrigin(
    InProcessCodeLocationOrigin(LoadableTargetOrigin(module_name="pipelines.definitions", attribute="defs")),
    "__repository__",
)


class Clock:
    """The sensor's clock, moved by the test; it starts at the real time, so files dropped now are settled."""

    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


class CapturingSink:
    name = "capture"

    def __init__(self) -> None:
        self.alerts = []
        self.down = False

    def send(self, alert) -> None:
        if self.down:
            raise ConnectionError("the capture sink is down")
        self.alerts.append(alert)


class Landing:
    """The landing sensor of a one-source project, ticked by hand, and the runs it asks for."""

    def __init__(self, instance, settings, payments) -> None:
        project = Project(name="test", sources=(payments,), start_date=START)
        raw = raw_event_definitions(project)
        self.defs = dg.Definitions.merge(raw, dg.Definitions(resources={"lakehouse": lakehouse_resource(settings)}))
        self.instance, self.settings = instance, settings
        self.clock, self.sink = Clock(), CapturingSink()
        self.sensor = landing_sensor(
            project,
            list(raw.jobs),
            settings_factory=lambda: dataclasses.replace(settings, dagster_url=DAGSTER),
            sinks_factory=lambda _: [self.sink],
            clock=self.clock,
        )
        self.cursor: str | None = None

    def tick(self):
        context = dg.build_sensor_context(
            instance=self.instance, cursor=self.cursor, resources={"lakehouse": lakehouse_resource(self.settings)}
        )
        result = self.sensor.evaluate_tick(context)
        self.cursor = result.cursor
        return result

    def files(self) -> dict[str, dict]:
        return json.loads(self.cursor)["files"]

    def states(self) -> dict[str, str]:
        return {os.path.basename(k): e["state"] for k, e in self.files().items()}

    def launch(self, request: dg.RunRequest) -> dg.DagsterRun:
        """The request's run as the sensor daemon creates it under the production profile's queued
        run coordinator: the job's, the request's and the sensor's tags, the run key, queued."""
        job = self.defs.resolve_job_def(request.job_name)
        tags = {**job.tags, **request.tags, "dagster/sensor_name": "landing_files", RUN_KEY_TAG: request.run_key}
        return self.instance.create_run_for_job(
            job_def=job,
            run_config=request.run_config,
            tags=tags,
            status=dg.DagsterRunStatus.QUEUED,
            remote_job_origin=RemoteJobOrigin(repository_origin=REPOSITORY, job_name=job.name),
        )

    def report(self, run: dg.DagsterRun, event: dg.DagsterEventType) -> None:
        self.instance.report_dagster_event(
            dg.DagsterEvent(event_type_value=event.value, job_name=run.job_name), run_id=run.run_id
        )

    def start(self, run: dg.DagsterRun) -> None:
        self.report(run, dg.DagsterEventType.RUN_START)

    def succeed(self, run: dg.DagsterRun) -> None:
        self.start(run)
        self.report(run, dg.DagsterEventType.RUN_SUCCESS)

    def fail(self, run: dg.DagsterRun, message: str = "the catalog is locked") -> None:
        self.start(run)
        self.instance.report_run_failed(self.instance.get_run_by_id(run.run_id), message)

    def cancel(self, run: dg.DagsterRun) -> None:
        self.instance.report_run_canceled(self.instance.get_run_by_id(run.run_id), "canceled by a person")


@pytest.fixture
def landing(instance, settings, payments) -> Landing:
    return Landing(instance, settings, payments)


def drop(settings, name: str, rows: list[dict], *, age_s: float = 60) -> str:
    folder = settings.landing / "payments"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    lines = [json.dumps({**r, "event_ts": r["event_ts"].isoformat()}) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    settle(path, age_s)
    return str(path)


def settle(path, age_s: float) -> None:
    then = time.time() - age_s
    os.utime(path, (then, then))


def signature(path: str) -> str:
    stat = os.stat(path)
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def one(result) -> dg.RunRequest:
    (request,) = result.run_requests
    return request


def test_new_files_become_runs_over_their_days_and_the_cursor_follows_them(landing, settings, payments):
    first = drop(settings, "a.jsonl", payment_rows(START, 5) + payment_rows(START + dt.timedelta(days=2), 5))
    second = drop(settings, "b.jsonl", payment_rows(START + dt.timedelta(days=4), 3))

    result = landing.tick()

    requests = {r.tags["keel/file"]: r for r in result.run_requests}
    assert sorted(requests) == [first, second]
    a = requests[first]
    assert a.job_name == "ingest_payments"
    assert a.tags[ASSET_PARTITION_RANGE_START_TAG] == "2026-01-01"
    assert a.tags[ASSET_PARTITION_RANGE_END_TAG] == "2026-01-03"
    assert a.tags["keel/attempt"] == "1"
    assert a.run_config == ingest_run_config(payments, [first])
    assert requests[second].tags[ASSET_PARTITION_RANGE_START_TAG] == "2026-01-05"
    files = landing.files()
    assert sorted(files) == [first, second]
    assert files[first]["signature"] == signature(first)
    assert (files[first]["state"], files[first]["attempt"], files[first]["run_key"]) == ("requested", 1, a.run_key)
    assert files[first]["days"] == "2026-01-01..2026-01-03"

    # Nothing changed and no run has finished: the next tick asks for nothing and says it is waiting.
    again = landing.tick()
    assert again.run_requests == []
    assert again.skip_message == "no new files; waiting for the runs of 2 file(s)"

    # A file replaced in place is ingested again, under a new run key.
    drop(settings, "a.jsonl", payment_rows(START, 6))
    changed = landing.tick()
    assert [r.tags["keel/file"] for r in changed.run_requests] == [first]
    assert changed.run_requests[0].run_key != a.run_key
    assert changed.run_requests[0].tags[ASSET_PARTITION_RANGE_END_TAG] == "2026-01-01"


def test_a_file_still_being_written_waits_until_it_settles(landing, settings):
    path = drop(settings, "copying.jsonl", payment_rows(START, 4), age_s=0)

    early = landing.tick()
    assert early.run_requests == []
    assert path not in landing.files()

    settle(settings.landing / "payments" / "copying.jsonl", SETTLE_SECONDS + 1)
    later = landing.tick()
    assert [r.tags["keel/file"] for r in later.run_requests] == [path]


def test_a_failed_or_canceled_run_is_requested_again_after_the_backoff_and_not_before(landing, settings):
    path = drop(settings, "a.jsonl", payment_rows(START, 5))
    first = one(landing.tick())
    landing.fail(landing.launch(first), "the catalog is locked")

    failed = landing.tick()
    assert failed.run_requests == []
    retry_at = landing.clock.now + dt.timedelta(seconds=RETRY_BASE_SECONDS)
    assert failed.skip_message == (
        f"failed, retrying 1: payments/a.jsonl (attempt 2 of {MAX_ATTEMPTS} at {retry_at:%H:%M:%S} UTC)"
    )
    entry = landing.files()[path]
    assert (entry["state"], entry["attempt"], entry["error"]) == ("retry_waiting", 1, "the catalog is locked")
    assert dt.datetime.fromisoformat(entry["retry_at"]) == retry_at

    landing.clock.advance(RETRY_BASE_SECONDS - 1)
    early = landing.tick()
    assert early.run_requests == []
    assert early.skip_message == f"no new files; 1 waiting to retry, next payments/a.jsonl at {retry_at:%H:%M:%S} UTC"

    landing.clock.advance(1)
    second = one(landing.tick())
    assert second.run_key != first.run_key
    assert second.tags["keel/attempt"] == "2"
    assert second.run_config == first.run_config
    assert second.tags[ASSET_PARTITION_RANGE_START_TAG] == first.tags[ASSET_PARTITION_RANGE_START_TAG]
    assert landing.files()[path]["state"] == "requested"

    # A canceled run is retried the same way, after twice the wait.
    landing.cancel(landing.launch(second))
    assert "attempt 3 of" in landing.tick().skip_message
    assert landing.files()[path]["error"] == "canceled by a person"
    landing.clock.advance(2 * RETRY_BASE_SECONDS - 1)
    assert landing.tick().run_requests == []
    landing.clock.advance(1)
    assert one(landing.tick()).tags["keel/attempt"] == "3"


def test_a_successful_run_lands_the_file_and_it_is_never_requested_again(landing, settings):
    path = drop(settings, "a.jsonl", payment_rows(START, 5))
    run = landing.launch(one(landing.tick()))
    landing.start(run)
    assert landing.tick().skip_message == "no new files; waiting for the runs of 1 file(s)"

    landing.succeed(run)
    landed = landing.tick()
    assert landed.skip_message == "landed 1: payments/a.jsonl"
    entry = landing.files()[path]
    assert (entry["state"], entry["run_id"]) == ("landed", run.run_id)

    for _ in range(3):
        landing.clock.advance(24 * 3600)
        later = landing.tick()
        assert later.run_requests == [] and later.skip_message == "no new files"
    assert landing.sink.alerts == []


def test_after_the_last_failure_one_alert_goes_out_and_the_file_waits_until_it_changes(landing, settings):
    path = drop(settings, "a.jsonl", payment_rows(START, 5) + payment_rows(START + dt.timedelta(days=1), 5))
    request = one(landing.tick())
    for attempt in range(1, MAX_ATTEMPTS + 1):
        assert request.tags["keel/attempt"] == str(attempt)
        run = landing.launch(request)
        landing.fail(run, f"raw__payments_staged: no valid rows (attempt {attempt})")
        result = landing.tick()
        assert result.run_requests == []
        if attempt < MAX_ATTEMPTS:
            landing.clock.advance(RETRY_BASE_SECONDS * 2 ** (attempt - 1))
            request = one(landing.tick())

    assert result.skip_message == (
        f"gave up on 1 (alerted): payments/a.jsonl after {MAX_ATTEMPTS} attempts; 1 alert(s) delivered"
    )
    (alert,) = landing.sink.alerts
    assert alert.condition == "landing/payments:a.jsonl"
    assert (alert.status, alert.severity) == ("firing", "ERROR")
    assert alert.title == f"[ERROR] landing/payments:a.jsonl did not land after {MAX_ATTEMPTS} attempts"
    assert (alert.run_id, alert.run_url) == (run.run_id, f"{DAGSTER}/runs/{run.run_id}")
    assert f"file {path} (" in alert.text and "for source 'payments', days 2026-01-01..2026-01-02" in alert.text
    assert f"{MAX_ATTEMPTS} ingest attempts failed; the last, run {run.run_id}, failed with: " in alert.text
    assert f"no valid rows (attempt {MAX_ATTEMPTS})" in alert.text
    assert alert.metadata["attempts"] == MAX_ATTEMPTS and alert.metadata["source"] == "payments"
    assert alert.metadata["file"] == path and alert.metadata["run_id"] == run.run_id
    assert alert.partition == "2026-01-01..2026-01-02"
    assert landing.files()[path]["state"] == "given_up"

    for _ in range(3):
        landing.clock.advance(24 * 3600)
        assert landing.tick().run_requests == []
    assert len(landing.sink.alerts) == 1

    drop(settings, "a.jsonl", payment_rows(START, 6))
    fresh = one(landing.tick())
    assert fresh.tags["keel/attempt"] == "1"
    assert (landing.files()[path]["state"], landing.files()[path]["attempt"]) == ("requested", 1)


def test_a_changed_file_starts_over_without_waiting_for_its_retry(landing, settings):
    path = drop(settings, "a.jsonl", payment_rows(START, 5))
    landing.fail(landing.launch(one(landing.tick())))
    assert landing.tick().run_requests == []
    landing.clock.advance(RETRY_BASE_SECONDS)
    second = one(landing.tick())
    landing.fail(landing.launch(second))
    landing.tick()
    assert landing.files()[path]["attempt"] == 2

    drop(settings, "a.jsonl", payment_rows(START + dt.timedelta(days=3), 5))
    fresh = one(landing.tick())
    assert fresh.tags["keel/attempt"] == "1"
    assert fresh.tags[ASSET_PARTITION_RANGE_START_TAG] == "2026-01-04"
    entry = landing.files()[path]
    assert (entry["state"], entry["attempt"], entry["run_key"]) == ("requested", 1, fresh.run_key)

    # A file replaced while its run is still going is asked for again at once, for its new content.
    landing.start(landing.launch(fresh))
    drop(settings, "a.jsonl", payment_rows(START + dt.timedelta(days=4), 5))
    newer = one(landing.tick())
    assert newer.tags[ASSET_PARTITION_RANGE_START_TAG] == "2026-01-05" and newer.tags["keel/attempt"] == "1"


def test_runs_still_queued_or_in_progress_are_waited_for_and_never_requested_twice(landing, settings):
    path = drop(settings, "a.jsonl", payment_rows(START, 5))
    request = one(landing.tick())

    # The daemon has not created the run yet.
    assert landing.tick().run_requests == []
    run = landing.launch(request)
    landing.clock.advance(LOST_RUN_SECONDS + 24 * 3600)
    queued = landing.tick()
    assert queued.run_requests == [] and queued.skip_message == "no new files; waiting for the runs of 1 file(s)"
    landing.start(run)
    landing.clock.advance(24 * 3600)
    assert landing.tick().run_requests == []

    # A failed run Dagster will retry itself (run_retries in the production profile) is waited for too,
    # and the retry, which keeps the run's tags, lands the file.
    landing.fail(run)
    landing.instance.add_run_tags(run.run_id, {"dagster/will_retry": "true"})
    assert landing.tick().run_requests == []
    assert landing.files()[path]["state"] == "requested"
    job = landing.defs.resolve_job_def(request.job_name)
    retry = landing.instance.create_run_for_job(
        job_def=job,
        run_config=run.run_config,
        tags={**run.tags, "dagster/parent_run_id": run.run_id, "dagster/root_run_id": run.run_id},
        parent_run_id=run.run_id,
        root_run_id=run.run_id,
    )
    landing.instance.add_run_tags(run.run_id, {"dagster/auto_retry_run_id": retry.run_id})
    assert landing.tick().run_requests == []
    landing.succeed(retry)
    assert landing.tick().skip_message == "landed 1: payments/a.jsonl"
    assert landing.files()[path] == {"signature": signature(path), "state": "landed", "run_id": retry.run_id}


def test_a_requested_run_that_never_appears_counts_as_a_failed_attempt(landing, settings):
    path = drop(settings, "a.jsonl", payment_rows(START, 5))
    first = one(landing.tick())

    landing.clock.advance(LOST_RUN_SECONDS - 1)
    assert landing.tick().skip_message == "no new files; waiting for the runs of 1 file(s)"
    landing.clock.advance(1)
    assert "failed, retrying 1: payments/a.jsonl (attempt 2" in landing.tick().skip_message
    assert f"no run with run key {first.run_key} found" in landing.files()[path]["error"]
    landing.clock.advance(RETRY_BASE_SECONDS)
    assert one(landing.tick()).tags["keel/attempt"] == "2"


def test_twelve_files_at_once_give_twelve_requests_and_stay_in_the_cursor_until_their_runs_finish(landing, settings):
    paths = [drop(settings, f"f{i:02}.jsonl", payment_rows(START + dt.timedelta(days=i), 3)) for i in range(12)]

    result = landing.tick()

    assert sorted(r.tags["keel/file"] for r in result.run_requests) == paths
    assert len({r.run_key for r in result.run_requests}) == 12
    assert set(landing.states().values()) == {"requested"}
    runs = {r.tags["keel/file"]: landing.launch(r) for r in result.run_requests}
    for path in paths[:5]:
        landing.succeed(runs[path])
    for path in paths[5:8]:
        landing.fail(runs[path])
    landing.start(runs[paths[8]])
    landing.start(runs[paths[9]])

    after = landing.tick()

    assert after.run_requests == []
    assert after.skip_message.startswith(
        "landed 5: payments/f00.jsonl, payments/f01.jsonl, payments/f02.jsonl, payments/f03.jsonl, "
        "payments/f04.jsonl; failed, retrying 3: payments/f05.jsonl (attempt 2 of"
    )
    assert after.skip_message.endswith("; waiting for the runs of 4 file(s)")
    states = landing.states()
    assert len(states) == 12
    assert [states[os.path.basename(p)] for p in paths] == ["landed"] * 5 + ["retry_waiting"] * 3 + ["requested"] * 4

    landing.clock.advance(RETRY_BASE_SECONDS)
    retries = landing.tick()
    assert sorted(r.tags["keel/file"] for r in retries.run_requests) == paths[5:8]
    for request in retries.run_requests:
        landing.succeed(landing.launch(request))
    for path in paths[8:]:
        landing.succeed(runs[path])
    done = landing.tick()
    assert done.skip_message.startswith("landed 7: ")
    assert set(landing.states().values()) == {"landed"}
    assert landing.tick().skip_message == "no new files"


def test_files_that_cannot_be_ingested_are_alerted_once_and_not_retried(landing, settings):
    folder = settings.landing / "payments"
    folder.mkdir(parents=True)
    no_ts = folder / "no-timestamp.parquet"
    pq.write_table(pa.table({"event_id": ["x"], "user_id": ["u"]}), no_ts)
    settle(no_ts, 60)
    old = drop(settings, "old.jsonl", payment_rows(dt.date(2020, 5, 1), 2))
    (folder / "notes.txt").write_text("not a data file")

    result = landing.tick()

    assert result.run_requests == []
    reason = result.skip_message
    assert reason.startswith("cannot ingest 2 (alerted): ") and reason.endswith("; 2 alert(s) delivered")
    assert "no-timestamp.parquet" in reason and "event_ts" in reason
    assert f"{old}: events fall outside 2026-01-01.." in reason
    assert landing.states() == {"no-timestamp.parquet": "unreadable", "old.jsonl": "unreadable"}
    alerts = {a.condition: a for a in landing.sink.alerts}
    assert sorted(alerts) == ["landing/payments:no-timestamp.parquet", "landing/payments:old.jsonl"]
    alert = alerts["landing/payments:old.jsonl"]
    assert alert.title == "[ERROR] landing/payments:old.jsonl cannot be ingested"
    assert f"file {old} (" in alert.text and "for source 'payments'" in alert.text
    assert "\nevents fall outside 2026-01-01.." in alert.text
    assert alert.run_url is None and alert.metadata["file"] == old

    landing.clock.advance(24 * 3600)
    assert landing.tick().skip_message == "no new files"
    assert len(landing.sink.alerts) == 2


def test_an_alert_a_sink_misses_stays_pending_and_is_sent_on_a_later_tick(landing, settings):
    drop(settings, "old.jsonl", payment_rows(dt.date(2020, 5, 1), 2))
    landing.sink.down = True

    missed = landing.tick()
    assert missed.skip_message.endswith("; 1 alert(s) pending for capture")
    (pending,) = json.loads(landing.cursor)["pending"]
    assert pending["sinks"] == ["capture"] and "the capture sink is down" in pending["error"]
    assert pending["alert"]["condition"] == "landing/payments:old.jsonl"

    assert landing.tick().skip_message == "no new files; 1 alert(s) pending for capture"
    landing.sink.down = False
    sent = landing.tick()
    assert sent.skip_message == "no new files; 1 alert(s) delivered"
    assert [a.condition for a in landing.sink.alerts] == ["landing/payments:old.jsonl"]
    assert json.loads(landing.cursor)["pending"] == []


def test_a_file_removed_while_waiting_for_its_retry_is_dropped_and_said_so(landing, settings):
    path = drop(settings, "a.jsonl", payment_rows(START, 5))
    landing.fail(landing.launch(one(landing.tick())))
    landing.tick()
    os.remove(path)

    gone = landing.tick()
    assert gone.skip_message == "removed before landing, not retried: payments/a.jsonl"
    assert landing.files() == {}


def test_a_tick_that_requests_runs_logs_what_it_did(landing, settings, capfd):
    drop(settings, "a.jsonl", payment_rows(START, 5))
    landing.tick()
    assert "INFO - requested 1: payments/a.jsonl" in capfd.readouterr().err


def test_the_runs_of_the_previous_cursor_are_followed(landing, settings, payments):
    # The sensor's earlier cursor mapped each file to its signature, with run key "path:signature".
    landed = drop(settings, "landed.jsonl", payment_rows(START, 3))
    failed = drop(settings, "failed.jsonl", payment_rows(START, 4))
    old = drop(settings, "old.jsonl", payment_rows(dt.date(2020, 5, 1), 2))
    signatures = {p: signature(p) for p in (landed, failed, old)}
    for path, finish in ((landed, landing.succeed), (failed, landing.fail)):
        request = dg.RunRequest(
            run_key=f"{path}:{signatures[path]}",
            job_name="ingest_payments",
            run_config=ingest_run_config(payments, [path]),
        )
        finish(landing.launch(request))
    landing.cursor = json.dumps(signatures)

    result = landing.tick()

    assert result.run_requests == []
    assert landing.states() == {"landed.jsonl": "landed", "failed.jsonl": "retry_waiting", "old.jsonl": "unreadable"}
    assert [a.condition for a in landing.sink.alerts] == ["landing/payments:old.jsonl"]
    landing.clock.advance(RETRY_BASE_SECONDS)
    assert one(landing.tick()).tags["keel/file"] == failed


def test_a_real_failed_ingest_run_reports_its_failing_step(landing, settings):
    # Negative amounts pass validation and fail the audit, so the run fails in a step, as a bad file's does.
    path = drop(settings, "negative.jsonl", [{**r, "amount": -5.0} for r in payment_rows(START, 3)])
    request = one(landing.tick())
    job = landing.defs.resolve_job_def(request.job_name)
    tags = {**request.tags, "dagster/sensor_name": "landing_files", RUN_KEY_TAG: request.run_key}

    run = job.execute_in_process(
        instance=landing.instance, run_config=request.run_config, tags=tags, raise_on_error=False
    )

    assert not run.success
    (step, *_) = run.get_step_failure_events()
    landing.tick()
    entry = landing.files()[path]
    assert (entry["state"], entry["run_id"]) == ("retry_waiting", run.run_id)
    assert entry["error"].startswith(f"{step.step_key}: ") and "audit" in entry["error"]


def test_the_sensor_is_on_by_default_says_what_it_does_and_is_part_of_the_code_location():
    from pipelines.definitions import defs

    sensor = defs.resolve_sensor_def("landing_files")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert {job.name for job in sensor.jobs} == {
        "ingest_signups",
        "ingest_clicks",
        "ingest_transactions",
        "ingest_churn_labels",
    }
    text = sensor.description
    assert f"retried after 1, 2, 4 min, {MAX_ATTEMPTS} attempts in all" in text
    assert "one alert goes to the console, KEEL_ALERT_FILE and KEEL_ALERT_WEBHOOK" in text
    assert "`dagster sensor stop landing_files`" in text
