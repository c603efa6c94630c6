"""The landing-folder sensor: one run request per new or changed file, remembered in a JSON cursor."""

import datetime as dt
import json
import os
import time

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from assets.raw_events import ingest_run_config, raw_event_definitions
from keel.project import Project
from resources import lakehouse_resource
from sensors.landing import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    SETTLE_SECONDS,
    landing_sensor,
)
from tests.conftest import payment_rows

START = dt.date(2026, 1, 1)


@pytest.fixture
def sensor(payments) -> dg.SensorDefinition:
    project = Project(name="test", sources=(payments,), start_date=START)
    return landing_sensor(project, list(raw_event_definitions(project).jobs))


def tick(sensor, settings, cursor: str | None):
    context = dg.build_sensor_context(cursor=cursor, resources={"lakehouse": lakehouse_resource(settings)})
    return sensor.evaluate_tick(context)


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


def test_new_files_become_runs_over_their_days_and_the_cursor_remembers_them(sensor, settings, payments):
    first = drop(settings, "a.jsonl", payment_rows(START, 5) + payment_rows(START + dt.timedelta(days=2), 5))
    second = drop(settings, "b.jsonl", payment_rows(START + dt.timedelta(days=4), 3))

    result = tick(sensor, settings, None)

    requests = {r.tags["keel/file"]: r for r in result.run_requests}
    assert sorted(requests) == [first, second]
    a = requests[first]
    assert a.job_name == "ingest_payments"
    assert a.tags[ASSET_PARTITION_RANGE_START_TAG] == "2026-01-01"
    assert a.tags[ASSET_PARTITION_RANGE_END_TAG] == "2026-01-03"
    assert a.run_config == ingest_run_config(payments, [first])
    assert requests[second].tags[ASSET_PARTITION_RANGE_START_TAG] == "2026-01-05"
    cursor = json.loads(result.cursor)
    assert sorted(cursor) == [first, second]

    # Nothing changed: the next tick asks for nothing.
    again = tick(sensor, settings, result.cursor)
    assert again.run_requests == []
    assert again.skip_message == "no new files"

    # A file replaced in place is ingested again, under a new run key.
    drop(settings, "a.jsonl", payment_rows(START, 6))
    changed = tick(sensor, settings, again.cursor)
    assert [r.tags["keel/file"] for r in changed.run_requests] == [first]
    assert changed.run_requests[0].run_key != a.run_key
    assert changed.run_requests[0].tags[ASSET_PARTITION_RANGE_END_TAG] == "2026-01-01"


def test_a_file_still_being_written_waits_until_it_settles(sensor, settings):
    path = drop(settings, "copying.jsonl", payment_rows(START, 4), age_s=0)

    early = tick(sensor, settings, None)
    assert early.run_requests == []
    assert path not in json.loads(early.cursor)

    settle(settings.landing / "payments" / "copying.jsonl", SETTLE_SECONDS + 1)
    later = tick(sensor, settings, early.cursor)
    assert [r.tags["keel/file"] for r in later.run_requests] == [path]


def test_unusable_files_are_skipped_with_a_reason_and_not_retried(sensor, settings):
    folder = settings.landing / "payments"
    folder.mkdir(parents=True)
    no_ts = folder / "no-timestamp.parquet"
    pq.write_table(pa.table({"event_id": ["x"], "user_id": ["u"]}), no_ts)
    settle(no_ts, 60)
    old = drop(settings, "old.jsonl", payment_rows(dt.date(2020, 5, 1), 2))
    (folder / "notes.txt").write_text("not a data file")

    result = tick(sensor, settings, None)

    assert result.run_requests == []
    reason = result.skip_message
    assert "no-timestamp.parquet" in reason and "event_ts" in reason
    assert f"{old}: events fall outside 2026-01-01.." in reason
    assert sorted(json.loads(result.cursor)) == sorted([str(no_ts), old])
    assert tick(sensor, settings, result.cursor).skip_message == "no new files"


def test_the_sensor_is_part_of_the_code_location():
    from pipelines.definitions import defs

    sensor = defs.resolve_sensor_def("landing_files")
    assert {job.name for job in sensor.jobs} == {
        "ingest_signups",
        "ingest_clicks",
        "ingest_transactions",
        "ingest_churn_labels",
    }
