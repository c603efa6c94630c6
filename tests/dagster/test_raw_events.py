"""The raw event assets run as Dagster runs: stage, blocking audit, publish."""

import datetime as dt

import dagster as dg
import pytest

from assets.raw_events import ingest_job_name
from keel.ingest.batch import QUARANTINE_TABLE
from keel.lakehouse import wap
from tests.factories.dagster_runs import START, check_evaluation, run_ingest, write_csv
from tests.factories.payments import payment_rows


def days(first: dt.date, n: int) -> list[dt.date]:
    return [first + dt.timedelta(days=i) for i in range(n)]


def materializations(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetMaterialization]:
    """The run's materializations of raw/payments by partition."""
    events = result.get_asset_materialization_events()
    return {e.materialization.partition: e.materialization for e in events}


def step_failure(result: dg.ExecuteInProcessResult) -> str:
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert len(failures) == 1
    return failures[0].event_specific_data.error.message


def test_a_partition_range_is_staged_audited_and_published_in_one_run(ingest_defs, instance, lake, keel_home, payments):
    rows = [r for day in days(START, 3) for r in payment_rows(day, 20)]
    bad = {**rows[0], "event_id": "bad-1", "amount": "lots"}
    path = write_csv(keel_home / "landing" / "payments" / "batch.csv", [*rows, bad])

    # The range runs a day past the file's events: that day is covered by the run but not written.
    result = run_ingest(ingest_defs, instance, [path], START, START + dt.timedelta(days=3))

    assert result.success
    assert ingest_job_name(payments) == "ingest_payments"
    main = lake.read("raw.payments")
    assert sorted(main.column("event_id").to_pylist()) == sorted(r["event_id"] for r in rows)
    check = check_evaluation(result)
    assert check.passed
    assert check.metadata["failed_expectations"].value == 0
    # The run's figures are on the check; each day's materialization describes that day only.
    assert check.metadata["rows_read"].value == 61 and check.metadata["rows_quarantined"].value == 1
    assert (check.metadata["rows_replaced"].value, check.metadata["rows_unchanged"].value) == (0, 0)
    by_day = materializations(result)
    assert sorted(by_day) == [d.isoformat() for d in days(START, 4)]
    empty = by_day.pop(days(START, 4)[-1].isoformat()).metadata
    assert empty["dagster/row_count"].value == 0 and not empty["written_by_run"].value and "preview" not in empty
    for day, event in by_day.items():
        assert event.metadata["dagster/row_count"].value == 20 and event.metadata["written_by_run"].value
        assert event.metadata["snapshot_id"].value == str(lake.head("raw.payments"))
        preview = event.metadata["preview"].value
        assert preview.count(f"| {day}") == 10 and all(f"| {d}" not in preview for d in by_day if d != day)
    assert lake.read(QUARANTINE_TABLE).column("reason_code").to_pylist() == ["wrong_type"]
    # The run's branch is gone once main holds its head.
    assert [ref for ref in lake.table("raw.payments").refs() if ref.startswith("audit_")] == []
    # A materialization per partition in the range, so the UI shows every day of the range filled.
    partitions = instance.get_materialized_partitions(dg.AssetKey(["raw", "payments"]))
    assert partitions == {d.isoformat() for d in days(START, 4)}


def test_a_failed_audit_blocks_the_publish_and_keeps_the_branch(ingest_defs, instance, lake, keel_home):
    history = [r for day in days(START, 5) for r in payment_rows(day, 200)]
    ok = run_ingest(
        ingest_defs, instance, [write_csv(keel_home / "h.csv", history)], START, START + dt.timedelta(days=4)
    )
    assert ok.success
    main_before = lake.head("raw.payments")

    # Every row is valid on its own, but the day holds 3 rows against a median of 200.
    thin_day = START + dt.timedelta(days=5)
    thin = write_csv(keel_home / "thin.csv", payment_rows(thin_day, 3))
    result = run_ingest(ingest_defs, instance, [thin], thin_day, thin_day)

    assert not result.success
    check = check_evaluation(result)
    assert not check.passed
    assert check.metadata["failed_expectations"].value == 1
    assert "expect_daily_row_count_to_be_between" in check.metadata["failures"].value
    assert "3 rows in 2026-01-06" in check.metadata["failures"].value
    # The publish step never ran; main is where it was and the branch is kept for inspection.
    assert materializations(result) == {}
    assert lake.head("raw.payments") == main_before
    branch = check.metadata["branch"].value
    assert branch == wap.branch_name(result.run_id)
    assert lake.read("raw.payments", branch=branch).num_rows == 1003


def test_a_crash_before_publish_then_a_rerun_leaves_one_copy(ingest_defs, instance, lake, keel_home, monkeypatch):
    rows = [r for day in days(START, 2) for r in payment_rows(day, 30)]
    path = write_csv(keel_home / "two-days.csv", rows)

    def crash(*args, **kwargs):
        raise SystemError("worker lost between the branch write and the publish")

    with monkeypatch.context() as patch:
        patch.setattr(wap, "publish", crash)
        crashed = run_ingest(ingest_defs, instance, [path], START, START + dt.timedelta(days=1))
    assert not crashed.success
    assert lake.read("raw.payments").num_rows == 0
    assert lake.read("raw.payments", branch=wap.branch_name(crashed.run_id)).num_rows == 60

    rerun = run_ingest(ingest_defs, instance, [path], START, START + dt.timedelta(days=1))

    assert rerun.success
    main = lake.read("raw.payments")
    assert main.num_rows == 60
    assert sorted(main.column("event_id").to_pylist()) == sorted(r["event_id"] for r in rows)


def test_running_the_same_partition_twice_is_idempotent_and_time_travel_sees_the_first(
    ingest_defs, instance, lake, keel_home
):
    path = write_csv(keel_home / "day.csv", payment_rows(START, 25))
    assert run_ingest(ingest_defs, instance, [path], START, START).success
    first_snapshot = lake.head("raw.payments")
    first = lake.read("raw.payments").sort_by("event_id")

    # The same partition again, this time with one amount corrected.
    corrected = payment_rows(START, 25)
    corrected[3]["amount"] = 999.0
    again = run_ingest(ingest_defs, instance, [write_csv(keel_home / "day.csv", corrected)], START, START)
    assert again.success

    second = lake.read("raw.payments").sort_by("event_id")
    assert second.num_rows == 25
    assert second.column("event_id") == first.column("event_id")
    (check,) = [e.event_specific_data for e in again.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    assert (check.metadata["rows_replaced"].value, check.metadata["rows_unchanged"].value) == (1, 24)
    assert 999.0 in second.column("amount").to_pylist()
    assert lake.read("raw.payments", snapshot_id=first_snapshot).sort_by("event_id") == first


def test_no_files_fails_with_a_message_naming_the_folder(ingest_defs, instance, keel_home):
    result = run_ingest(ingest_defs, instance, [], START, START)
    assert not result.success
    message = step_failure(result)
    assert "no files for source 'payments'" in message
    assert str(keel_home / "landing" / "payments") in message


def test_a_run_whose_publish_conflicts_stages_again_and_keeps_both_writes(
    ingest_defs, instance, lake, keel_home, payments
):
    """Another writer (here `keel ingest`) publishes between this run's stage and its publish:
    the run stages again on main's new head, audits it and publishes, instead of failing."""
    from keel.ingest.batch import ingest_files

    ours = payment_rows(START, 20, prefix="ours")
    theirs = payment_rows(START, 12, prefix="theirs")
    other = write_csv(keel_home / "theirs.csv", theirs)
    real_publish = wap.publish
    published: list[str] = []

    def another_writer_first(lake_, staged):
        published.append(staged.run_id)
        if len(published) == 1:
            assert ingest_files(lake_, payments, [other], run_id="theirs").published
        return real_publish(lake_, staged)

    monkeypatch = pytest.MonkeyPatch()
    with monkeypatch.context() as patch:
        patch.setattr(wap, "publish", another_writer_first)
        result = run_ingest(ingest_defs, instance, [write_csv(keel_home / "ours.csv", ours)], START, START)

    assert result.success
    assert published == [result.run_id, "theirs", result.run_id]
    ids = sorted(lake.read("raw.payments").column("event_id").to_pylist())
    assert ids == sorted(r["event_id"] for r in ours + theirs)
    assert materializations(result)[START.isoformat()].metadata["dagster/row_count"].value == 32
    assert any("staged again 1 time(s)" in e.user_message for e in instance.all_logs(result.run_id))
