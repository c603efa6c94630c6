"""The write-audit-publish audit: each kind of defect is caught by the right expectation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pytest

from keel.dsl import Column, Entity, EventSource
from keel.lakehouse.audit import audit_events, combine_reports
from pipelines.sources import CURRENCIES, signups, transactions
from tests.factories.audit import DAY, txn_rows


def txn_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=transactions.arrow_schema())


def only_failure(report):
    assert len(report.failures) == 1, report.summary()
    return report.failures[0]


def test_clean_batch_passes_every_expectation():
    report = audit_events(txn_table(txn_rows(20)), transactions, recent_partition_rows=[20, 22, 18])

    assert report.success, report.summary()
    assert report.table == "raw.transactions" and report.row_count == 20
    checked = {(o.expectation, o.column) for o in report.outcomes}
    expected = {
        ("expect_table_row_count_to_be_between", None),
        ("expect_table_columns_to_match_ordered_list", None),
        ("expect_column_values_to_be_between", "amount"),
        ("expect_column_values_to_be_unique", "event_id"),
        ("expect_daily_row_count_to_be_between", "event_ts"),
    }
    names = transactions.arrow_schema().names
    expected |= {("expect_column_values_to_not_be_null", c) for c in names}
    expected |= {("expect_column_type_to_match_declaration", c) for c in names}
    expected |= {("expect_column_values_to_be_in_set", c) for c in ("currency", "country", "merchant_category")}
    assert checked == expected
    assert len(report.outcomes) == len(expected)
    assert report.summary() == f"all {len(expected)} expectations passed"


@pytest.mark.parametrize("column", ["event_id", "user_id", "event_ts", "currency"])
def test_null_in_a_non_nullable_column_is_caught(column):
    rows = txn_rows(10)
    rows[3][column] = None
    rows[7][column] = None

    failure = only_failure(audit_events(txn_table(rows), transactions))

    assert (failure.expectation, failure.column) == ("expect_column_values_to_not_be_null", column)
    assert failure.unexpected_count == 2
    assert failure.detail == "2 of 10 rows NULL"


def test_value_out_of_range_is_caught():
    rows = txn_rows(10)
    rows[1]["amount"] = -5.0
    rows[2]["amount"] = 60_000.0

    failure = only_failure(audit_events(txn_table(rows), transactions))

    assert (failure.expectation, failure.column) == ("expect_column_values_to_be_between", "amount")
    assert failure.unexpected_count == 2
    assert sorted(failure.sample) == [-5.0, 60_000.0]
    assert failure.detail == "2 of 10 rows outside 0..50000"


def test_int_range_ignores_nulls_in_a_nullable_column():
    rows = [
        {
            "event_id": f"s{i}",
            "user_id": f"u{i}",
            "event_ts": DAY,
            "country": "US",
            "device": "web",
            "plan": "free",
            "age": age,
        }
        for i, age in enumerate([30, None, 12, 101, 45])
    ]
    report = audit_events(pa.Table.from_pylist(rows, schema=signups.arrow_schema()), signups)

    failure = only_failure(report)
    assert (failure.expectation, failure.column) == ("expect_column_values_to_be_between", "age")
    assert failure.unexpected_count == 2
    assert sorted(failure.sample) == [12, 101]
    # Positions survive GX dropping the NULL row first; the ages stay integers (pandas holds them as floats).
    assert failure.examples == [
        {"event_id": "s2", "column": "age", "value": 12},
        {"event_id": "s3", "column": "age", "value": 101},
    ]
    assert all(type(e["value"]) is int for e in failure.examples)


def test_value_not_in_allowed_set_is_caught():
    rows = txn_rows(10)
    rows[4]["currency"] = "XXX"

    failure = only_failure(audit_events(txn_table(rows), transactions))

    assert (failure.expectation, failure.column) == ("expect_column_values_to_be_in_set", "currency")
    assert failure.unexpected_count == 1
    assert failure.sample == ["XXX"]


def test_duplicate_event_id_is_caught():
    rows = txn_rows(10)
    rows[6]["event_id"] = rows[2]["event_id"]

    failure = only_failure(audit_events(txn_table(rows), transactions))

    assert (failure.expectation, failure.column) == ("expect_column_values_to_be_unique", "event_id")
    assert failure.unexpected_count == 2  # both rows sharing the id
    assert failure.sample == [rows[2]["event_id"]]


# Each failing expectation points at its rows: the event id (or keys and timestamp), the column, the value.


def test_range_failure_lists_the_event_ids_and_values():
    rows = txn_rows(10)
    rows[1]["amount"] = -5.0
    rows[2]["amount"] = 60_000.0

    failure = only_failure(audit_events(txn_table(rows), transactions))

    assert failure.examples == [
        {"event_id": "e1", "column": "amount", "value": -5.0},
        {"event_id": "e2", "column": "amount", "value": 60_000.0},
    ]


def test_category_failure_lists_the_event_ids_and_values():
    rows = txn_rows(10)
    rows[4]["currency"] = "XXX"
    rows[8]["currency"] = "usd"

    failure = only_failure(audit_events(txn_table(rows), transactions))

    assert failure.examples == [
        {"event_id": "e4", "column": "currency", "value": "XXX"},
        {"event_id": "e8", "column": "currency", "value": "usd"},
    ]


def test_duplicate_event_ids_are_told_apart_by_keys_and_timestamp():
    rows = txn_rows(10)
    rows[6]["event_id"] = rows[2]["event_id"]

    failure = only_failure(audit_events(txn_table(rows), transactions))

    assert failure.examples == [
        {"user_id": "u2", "event_ts": rows[2]["event_ts"].isoformat(), "column": "event_id", "value": "e2"},
        {"user_id": "u6", "event_ts": rows[6]["event_ts"].isoformat(), "column": "event_id", "value": "e2"},
    ]


@pytest.mark.parametrize("column", ["user_id", "event_ts", "currency"])
def test_null_failure_lists_the_event_ids(column):
    rows = txn_rows(10)
    rows[3][column] = None
    rows[7][column] = None

    failure = only_failure(audit_events(txn_table(rows), transactions))

    assert failure.examples == [
        {"event_id": "e3", "column": column, "value": None},
        {"event_id": "e7", "column": column, "value": None},
    ]


def test_null_event_id_is_pointed_at_by_keys_and_timestamp():
    rows = txn_rows(10)
    rows[5]["event_id"] = None

    failure = only_failure(audit_events(txn_table(rows), transactions))

    assert failure.examples == [
        {"user_id": "u5", "event_ts": rows[5]["event_ts"].isoformat(), "column": "event_id", "value": None}
    ]


def test_nan_is_reported_as_nan_not_as_null():
    rows = txn_rows(10)
    rows[0]["amount"] = float("nan")

    failure = only_failure(audit_events(txn_table(rows), transactions))

    assert (failure.expectation, failure.column) == ("expect_column_values_to_not_be_null", "amount")
    assert failure.detail == "1 of 10 rows NaN"
    assert failure.examples == [{"event_id": "e0", "column": "amount", "value": "NaN"}]


def test_nan_and_null_in_one_column_are_told_apart():
    rows = txn_rows(10)
    rows[2]["amount"] = None
    rows[4]["amount"] = float("nan")

    report = audit_events(txn_table(rows), transactions)

    failure = only_failure(report)
    assert failure.detail == "2 of 10 rows NULL or NaN (1 NULL, 1 NaN)"
    assert failure.examples == [
        {"event_id": "e2", "column": "amount", "value": None},
        {"event_id": "e4", "column": "amount", "value": "NaN"},
    ]
    assert "event_id=e2 amount=NULL, event_id=e4 amount=NaN" in report.summary()


def test_infinity_and_timestamps_are_json_safe_text():
    rows = txn_rows(10)
    rows[9]["amount"] = float("inf")

    report = audit_events(txn_table(rows), transactions)

    failure = only_failure(report)
    assert failure.examples == [{"event_id": "e9", "column": "amount", "value": "inf"}]
    assert failure.sample == ["inf"]
    json.dumps(report.to_metadata(), allow_nan=False)


def test_a_table_without_event_ids_points_at_rows_by_keys_and_timestamp():
    buyer = Entity(name="buyer", join_keys={"user_id": "string"})
    tips = EventSource(
        name="tips", entity=buyer, columns=(Column("tip", "float64", nullable=False, min=0),), event_id=None
    )
    rows = [{"user_id": f"u{i}", "event_ts": DAY + timedelta(hours=i), "tip": 1.0} for i in range(5)]
    rows[3]["tip"] = -2.0

    failure = only_failure(audit_events(pa.Table.from_pylist(rows, schema=tips.arrow_schema()), tips))

    assert failure.examples == [
        {"user_id": "u3", "event_ts": "2026-01-05T03:00:00+00:00", "column": "tip", "value": -2.0}
    ]


def test_examples_stop_at_twenty_in_row_order():
    rows = txn_rows(50)
    for row in rows[5:35]:
        row["amount"] = -1.0

    failure = only_failure(audit_events(txn_table(rows), transactions))

    assert failure.unexpected_count == 30
    assert [e["event_id"] for e in failure.examples] == [f"e{i}" for i in range(5, 25)]


def test_daily_row_count_failure_lists_the_offending_days():
    rows = txn_rows(100, DAY) + txn_rows(10, DAY + timedelta(days=1), prefix="f")
    rows += txn_rows(900, DAY + timedelta(days=2), prefix="g")

    report = audit_events(txn_table(rows), transactions, recent_partition_rows=[95, 100, 110, 100])

    failure = only_failure(report)
    assert failure.examples == [{"day": "2026-01-06", "rows": 10}, {"day": "2026-01-07", "rows": 900}]


def test_summary_has_one_line_per_failing_expectation_with_its_first_examples():
    rows = txn_rows(10)
    for i in (1, 2, 3, 4):
        rows[i]["amount"] = -float(i)
    rows[6]["currency"] = "XXX"

    report = audit_events(txn_table(rows), transactions)

    assert report.summary().splitlines() == [
        "expect_column_values_to_be_between(amount): 4 of 10 rows outside 0..50000; "
        "e.g. event_id=e1 amount=-1.0, event_id=e2 amount=-2.0, event_id=e3 amount=-3.0",
        f"expect_column_values_to_be_in_set(currency): 1 of 10 rows not in the {len(CURRENCIES)} allowed values; "
        "e.g. event_id=e6 currency=XXX",
    ]


def test_passing_outcomes_have_no_examples():
    report = audit_events(txn_table(txn_rows(20)), transactions, recent_partition_rows=[20, 22, 18])

    assert report.success and all(o.examples == [] for o in report.outcomes)


def test_combined_reports_keep_every_parts_examples():
    rows = txn_rows(10)
    rows[1]["amount"] = -1.0
    first = audit_events(txn_table(rows), transactions)
    rows = txn_rows(6, DAY + timedelta(days=1), prefix="f")
    rows[4]["amount"] = -4.0
    second = audit_events(txn_table(rows), transactions)

    failure = only_failure(combine_reports([first, second]))

    assert failure.examples == [
        {"event_id": "e1", "column": "amount", "value": -1.0},
        {"event_id": "f4", "column": "amount", "value": -4.0},
    ]


def test_missing_and_unexpected_columns_are_caught():
    table = txn_table(txn_rows(10)).rename_columns(
        ["event_id", "user_id", "event_ts", "amt", "currency", "country", "merchant_category", "is_refund"]
    )

    report = audit_events(table, transactions)

    schema = next(o for o in report.failures if o.expectation == "expect_table_columns_to_match_ordered_list")
    assert schema.unexpected_count == 2
    assert schema.sample == ["amount", "amt"]
    assert schema.detail == "missing ['amount'], unexpected ['amt']"
    # The declared checks on the absent column fail as unchecked rather than pass silently.
    unchecked = {(o.expectation, o.column) for o in report.failures if o is not schema}
    assert unchecked == {
        ("expect_column_values_to_not_be_null", "amount"),
        ("expect_column_values_to_be_between", "amount"),
    }
    assert all(o.detail.startswith("not checked") for o in report.failures if o is not schema)


def test_columns_in_the_wrong_order_are_caught():
    table = txn_table(txn_rows(5))
    names = table.column_names
    table = table.select([names[1], names[0], *names[2:]])

    failure = only_failure(audit_events(table, transactions))

    assert failure.expectation == "expect_table_columns_to_match_ordered_list"
    assert failure.unexpected_count == 2
    assert "wrong order" in failure.detail


def test_column_of_the_wrong_type_is_caught():
    table = txn_table(txn_rows(5))
    as_text = table.column("amount").cast(pa.string())
    table = table.set_column(table.schema.get_field_index("amount"), "amount", as_text)

    report = audit_events(table, transactions)

    failed = {(o.expectation, o.column) for o in report.failures}
    assert ("expect_column_type_to_match_declaration", "amount") in failed
    typed = next(
        o
        for o in report.failures
        if o.column == "amount" and o.expectation == "expect_column_type_to_match_declaration"
    )
    assert typed.sample == ["string"]


def test_naive_timestamp_does_not_fit_the_declared_utc_timestamp():
    table = txn_table(txn_rows(5))
    naive = table.column("event_ts").cast(pa.timestamp("us"))
    table = table.set_column(table.schema.get_field_index("event_ts"), "event_ts", naive)

    failure = only_failure(audit_events(table, transactions))

    assert (failure.expectation, failure.column) == ("expect_column_type_to_match_declaration", "event_ts")


def test_empty_batch_is_caught():
    report = audit_events(txn_table([]), transactions, recent_partition_rows=[100, 100, 100])

    failure = only_failure(report)
    assert failure.expectation == "expect_table_row_count_to_be_between"
    assert failure.unexpected_count == 0
    assert report.row_count == 0


def test_day_with_ten_times_fewer_rows_than_history_is_caught():
    rows = txn_rows(100, DAY) + txn_rows(10, DAY + timedelta(days=1), prefix="f")

    report = audit_events(txn_table(rows), transactions, recent_partition_rows=[95, 100, 110, 100])

    failure = only_failure(report)
    assert (failure.expectation, failure.column) == ("expect_daily_row_count_to_be_between", "event_ts")
    assert failure.unexpected_count == 1
    assert failure.sample == [{"day": "2026-01-06", "rows": 10}]
    assert failure.detail == "10 rows in 2026-01-06 vs recent median 100 (allowed 25..400)"


def test_day_near_its_history_passes():
    report = audit_events(txn_table(txn_rows(10)), transactions, recent_partition_rows=[9, 12, 10])

    daily = report.outcomes[-1]
    assert daily.expectation == "expect_daily_row_count_to_be_between"
    assert report.success, report.summary()
    assert daily.detail == "1 days within allowed 2.5..40 (recent median 10)"


def test_tolerance_sets_the_allowed_band():
    rows = txn_rows(10)
    history = [25, 25, 25]

    assert audit_events(txn_table(rows), transactions, recent_partition_rows=history).success
    assert not audit_events(
        txn_table(rows), transactions, recent_partition_rows=history, row_count_tolerance=2.0
    ).success


@pytest.mark.parametrize("history", [[], [1000], [1000, 1000]])
def test_fewer_than_three_history_values_pass(history):
    report = audit_events(txn_table(txn_rows(10)), transactions, recent_partition_rows=history)

    daily = report.outcomes[-1]
    assert report.success and daily.success
    assert daily.detail == f"not enough history ({len(history)} partitions)"


def test_days_are_counted_in_utc_whatever_the_zone():
    rows = txn_rows(10)
    for row in rows:
        row["event_ts"] = datetime(2026, 1, 6, 2, tzinfo=UTC)  # 21:00 on the 5th in NY
    table = txn_table(rows)
    local = table.column("event_ts").cast(pa.timestamp("us", tz="America/New_York"))
    table = table.set_column(table.schema.get_field_index("event_ts"), "event_ts", local)

    report = audit_events(table, transactions, recent_partition_rows=[100, 100, 100])

    failure = only_failure(report)
    assert failure.sample == [{"day": "2026-01-06", "rows": 10}]


def test_invalid_arguments_name_the_fix():
    table = txn_table(txn_rows(3))
    with pytest.raises(ValueError, match="row_count_tolerance 0.5 must be >= 1"):
        audit_events(table, transactions, row_count_tolerance=0.5)
    with pytest.raises(ValueError, match="partition_column 'amount' is not a timestamp or date"):
        audit_events(table, transactions, partition_column="amount")


def test_metadata_is_json_serialisable():
    rows = txn_rows(50) + txn_rows(2, DAY + timedelta(days=1), prefix="f")
    rows[0]["amount"] = float("nan")
    rows[1]["amount"] = -1.0
    rows[2]["currency"] = "XXX"
    rows[3]["user_id"] = None
    rows[4]["event_id"] = rows[5]["event_id"]
    report = audit_events(txn_table(rows), transactions, recent_partition_rows=[50, 50, 50])

    metadata = json.loads(json.dumps(report.to_metadata(), allow_nan=False))

    assert metadata["success"] is False
    assert metadata["row_count"] == 52
    assert metadata["failed"] == len(report.failures) == 6
    assert len(metadata["results"]) == len(report.outcomes)
    assert {f["expectation"] for f in metadata["failures"]} == {
        "expect_column_values_to_not_be_null",
        "expect_column_values_to_be_between",
        "expect_column_values_to_be_in_set",
        "expect_column_values_to_be_unique",
        "expect_daily_row_count_to_be_between",
    }
    assert len(report.summary().splitlines()) == 6


def test_suite_is_built_once_per_source():
    from keel.lakehouse.expectations import expectation_suite

    table = txn_table(txn_rows(3))
    audit_events(table, transactions)
    misses = expectation_suite.cache_info().misses
    audit_events(table, transactions)
    assert expectation_suite.cache_info().misses == misses


def test_fresh_process_import_and_audit_are_warning_free_and_write_nothing(tmp_path):
    script = textwrap.dedent("""
        import sys, warnings
        import keel.lakehouse.audit
        assert "great_expectations" not in sys.modules, "GX must load lazily"
        shown = warnings.showwarning
        from pipelines.sources import transactions
        import pyarrow as pa
        report = keel.lakehouse.audit.audit_events(
            pa.Table.from_pylist([], schema=transactions.arrow_schema()), transactions)
        assert not report.success
        assert warnings.showwarning is shown, "GX's import must not hijack warnings"
    """)
    env = {**os.environ, "PYTHONWARNINGS": ""}
    proc = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-W", "error::FutureWarning", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr
    assert "Calculating Metrics" not in proc.stderr  # progress bars are off
    assert list(tmp_path.iterdir()) == []  # the ephemeral context writes no project folder


def test_reports_of_parts_combine_into_one():
    first = audit_events(txn_table(txn_rows(10)), transactions)
    rows = txn_rows(6, DAY + timedelta(days=1), prefix="f")
    rows[0]["user_id"] = None
    second = audit_events(txn_table(rows), transactions)

    combined = combine_reports([first, second])

    assert combined.row_count == 16 and combined.table == "raw.transactions"
    assert len(combined.outcomes) == len(first.outcomes)
    failure = only_failure(combined)
    assert (failure.expectation, failure.column) == ("expect_column_values_to_not_be_null", "user_id")
    assert failure.unexpected_count == 1
    assert failure.detail == "1 of 16 rows NULL"
    row_count = next(o for o in combined.outcomes if o.expectation == "expect_table_row_count_to_be_between")
    assert row_count.detail == "16 rows"
    assert combine_reports([first]) is first
    with pytest.raises(ValueError, match="no reports given"):
        combine_reports([])


def test_a_failing_audit_of_many_rows_lists_the_first_examples_of_each_failure():
    """Correctness at scale; the speed against an Arrow floor is bench/audit.py's."""
    n = 3_000  # amounts 12.5 .. 37,500, inside the declared range
    table = txn_table(txn_rows(n))
    assert audit_events(table, transactions, recent_partition_rows=[n] * 7).success

    # Every user_id NULL, every other amount out of range, each listing its first rows.
    amounts = table["amount"].to_numpy().copy()
    amounts[::2] = -1.0
    broken = table.set_column(1, "user_id", pa.nulls(n, pa.string())).set_column(3, "amount", pa.array(amounts))
    report = audit_events(broken, transactions, recent_partition_rows=[n] * 7)
    assert [len(o.examples) for o in report.failures] == [20, 20]
