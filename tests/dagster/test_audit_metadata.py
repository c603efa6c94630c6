"""The audit check's metadata points at the failing rows: a table of examples per failing expectation."""

import json

import pyarrow as pa

from assets.metadata import audit_check_result, audit_metadata
from keel.lakehouse.audit import audit_events
from pipelines.sources import CURRENCIES, transactions
from tests.factories.audit import txn_rows
from tests.factories.dagster_runs import START, check_evaluation, run_ingest, write_csv
from tests.factories.payments import payment_rows


def failing_report():
    rows = txn_rows(10)
    rows[1]["amount"] = -5.0
    rows[2]["amount"] = float("nan")
    rows[3]["amount"] = None
    rows[6]["currency"] = "XXX"
    return audit_events(pa.Table.from_pylist(rows, schema=transactions.arrow_schema()), transactions)


def test_examples_are_a_markdown_table_per_failing_expectation():
    report = failing_report()

    examples = audit_metadata(report, "audit_x")["examples"].value

    assert examples.split("\n\n") == [
        "**expect_column_values_to_not_be_null(amount)**: 2 of 10 rows NULL or NaN (1 NULL, 1 NaN)",
        "| event_id | column | value |\n|---|---|---|\n| e2 | amount | NaN |\n| e3 | amount | NULL |",
        "**expect_column_values_to_be_between(amount)**: 1 of 10 rows outside 0..50000",
        "| event_id | column | value |\n|---|---|---|\n| e1 | amount | -5.0 |",
        f"**expect_column_values_to_be_in_set(currency)**: 1 of 10 rows not in the {len(CURRENCIES)} allowed values",
        "| event_id | column | value |\n|---|---|---|\n| e6 | currency | XXX |",
    ]


def test_json_results_carry_the_examples_and_the_description_the_first_ones():
    report = failing_report()

    check = audit_check_result(report, "audit_x")

    results = json.loads(json.dumps(check.metadata["results"].value, allow_nan=False))
    by_column = {(f["expectation"], f["column"]): f["examples"] for f in results["failures"]}
    assert by_column[("expect_column_values_to_not_be_null", "amount")] == [
        {"event_id": "e2", "column": "amount", "value": "NaN"},
        {"event_id": "e3", "column": "amount", "value": None},
    ]
    assert by_column[("expect_column_values_to_be_in_set", "currency")] == [
        {"event_id": "e6", "column": "currency", "value": "XXX"}
    ]
    assert "e.g. event_id=e2 amount=NaN, event_id=e3 amount=NULL" in check.description


def test_a_passing_audit_has_no_examples():
    report = audit_events(pa.Table.from_pylist(txn_rows(5), schema=transactions.arrow_schema()), transactions)

    assert audit_metadata(report, "audit_x")["examples"].value == "all expectations passed"


def test_a_failed_audit_in_a_run_names_the_offending_events(ingest_defs, instance, keel_home):
    rows = payment_rows(START, 10)
    rows[4]["amount"] = 20_000.0
    rows[7]["currency"] = "GBP"
    path = write_csv(keel_home / "landing" / "payments" / "bad.csv", rows)

    result = run_ingest(ingest_defs, instance, [path], START, START)

    assert not result.success
    check = check_evaluation(result)
    examples = check.metadata["examples"].value
    assert f"| {rows[4]['event_id']} | amount | 20000.0 |" in examples
    assert f"| {rows[7]['event_id']} | currency | GBP |" in examples
    assert f"event_id={rows[4]['event_id']} amount=20000.0" in check.description
