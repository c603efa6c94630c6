"""Ingesting event files: bad rows to quarantine, good rows through write-audit-publish to main."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from keel.ingest import parquet_reader, readers, text_readers, validation
from keel.ingest.batch import QUARANTINE_TABLE, IngestError, group_days, ingest_files, prepare
from keel.ingest.file_checks import FileFormatError
from keel.lakehouse import wap
from tests.factories.ingest import (
    COLUMNS,
    DAY,
    NOW,
    TABLE,
    main_ids,
    nullable,
    quarantine_by_row,
    quarantined,
    text,
    write_csv,
    write_jsonl,
)
from tests.factories.payments import payment_rows

# files


def write_parquet(path: Path, rows: list[dict], schema: pa.Schema) -> Path:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def days(first: dt.date, n: int) -> list[dt.date]:
    return [first + dt.timedelta(days=i) for i in range(n)]


# reading back


def main_rows(lake) -> list[dict]:
    return sorted(lake.read(TABLE).to_pylist(), key=lambda r: r["event_id"])


def run_commits(lake, run_id: str) -> list[str]:
    """The partition label of each commit a run made in main's ancestry, oldest first."""
    table = lake.table(TABLE)
    snap, labels = table.current_snapshot(), []
    while snap is not None:
        props = snap.summary.additional_properties
        if props.get("keel.run_id") == run_id:
            labels.append(props["keel.partition"])
        snap = table.snapshot_by_id(snap.parent_snapshot_id) if snap.parent_snapshot_id else None
    return labels[::-1]


def expected_typed(rows: list[dict]) -> list[dict]:
    return sorted(({c: r.get(c) for c in COLUMNS} for r in rows), key=lambda r: r["event_id"])


def template(event_id: str, **changes) -> dict:
    """A valid payment on DAY, with ``changes`` applied."""
    row = payment_rows(DAY, 2, prefix="x")[1]
    return {**row, "event_id": event_id, **changes}


# the key acceptance test, once per format


def csv_case() -> tuple[list[dict], list[dict], dict[str, str]]:
    """Rows for a CSV file: (file rows in order, the good rows typed, bad event id -> reason code)."""
    good = payment_rows(DAY, 30)
    nullable_items = template("ok-no-items", items=None)
    at_skew_limit = template("ok-at-skew-limit", event_ts=NOW + dt.timedelta(hours=1))
    bad = {
        "bad-empty-user": (template("bad-empty-user", user_id=""), "missing_key"),
        "bad-blank-user": (template("bad-blank-user", user_id="   "), "missing_key"),
        "bad-no-ts": (template("bad-no-ts", event_ts=None), "missing_key"),
        "bad-amount-word": (template("bad-amount-word", amount="twelve"), "wrong_type"),
        "bad-items-fraction": (template("bad-items-fraction", items="3.5"), "wrong_type"),
        "bad-two-problems": (template("bad-two-problems", amount="twelve", items="x"), "wrong_type"),
        "bad-refund-word": (template("bad-refund-word", is_refund="maybe"), "wrong_type"),
        "bad-no-amount": (template("bad-no-amount", amount=None), "missing_value"),
        "bad-no-currency": (template("bad-no-currency", currency=None), "missing_value"),
        "bad-ts-word": (template("bad-ts-word", event_ts="yesterday"), "bad_timestamp"),
        "bad-ts-hour-25": (template("bad-ts-hour-25", event_ts="2026-01-05T25:00:00Z"), "bad_timestamp"),
        "bad-future": (template("bad-future", event_ts=NOW + dt.timedelta(hours=1, seconds=1)), "future_timestamp"),
        "bad-far-future": (
            template("bad-far-future", event_ts=dt.datetime(2030, 1, 1, tzinfo=dt.UTC)),
            "future_timestamp",
        ),
    }
    rows = []
    bad_rows = [row for row, _ in bad.values()]
    for i, row in enumerate(good):
        rows.append(row)
        if i % 2 and bad_rows:
            rows.append(bad_rows.pop(0))
    rows += bad_rows
    # An empty event id has no identity to deduplicate on; a repeated one loses to the first.
    rows.insert(5, {**good[20], "event_id": ""})
    rows.append({**good[3], "amount": 999.0})
    rows += [nullable_items, at_skew_limit]
    codes = {row["event_id"]: code for row, code in bad.values()}
    return rows, [*good, nullable_items, at_skew_limit], codes


def expected_quarantine(rows: list[dict], codes: dict[str, str]) -> list[tuple[int, str]]:
    out, seen = [], set()
    for number, row in enumerate(rows, start=1):
        if row["event_id"] == "":
            out.append((number, "missing_key"))
        elif row["event_id"] in codes:
            out.append((number, codes[row["event_id"]]))
        elif row["event_id"] in seen:
            out.append((number, "duplicate_event_id"))
        seen.add(row["event_id"])
    return out


def test_csv_with_bad_rows_publishes_the_good_and_quarantines_each_bad_row_with_its_reason(lake, payments, tmp_path):
    rows, good, codes = csv_case()
    path = write_csv(tmp_path / "payments.csv", rows)

    report = ingest_files(lake, payments, [path], run_id="accept-csv", now=NOW)

    assert report.published, report.summary()
    assert report.rows_read == len(rows) == 47
    assert report.rows_valid == len(good) == 32
    assert report.quarantined == {
        "bad_timestamp": 2,
        "duplicate_event_id": 1,
        "future_timestamp": 2,
        "missing_key": 4,
        "missing_value": 2,
        "wrong_type": 4,
    }
    assert main_rows(lake) == expected_typed(good)
    assert lake.head(TABLE) == report.published_snapshot
    assert quarantined(lake, path) == expected_quarantine(rows, codes)
    assert len(quarantined(lake, path)) == 15


def test_quarantined_rows_say_why_in_words_and_keep_the_raw_record(lake, payments, tmp_path):
    rows, _, _ = csv_case()
    path = write_csv(tmp_path / "payments.csv", rows)
    number = {row["event_id"]: n for n, row in reversed(list(enumerate(rows, start=1)))}

    ingest_files(lake, payments, [path], run_id="reasons", now=NOW)

    by_row = quarantine_by_row(lake, path)
    reasons = {eid: by_row[number[eid]]["reason"] for eid in number if number[eid] in by_row}
    assert reasons["bad-amount-word"] == 'amount: "twelve" is not a number'
    assert reasons["bad-items-fraction"] == 'items: "3.5" is not an integer'
    assert reasons["bad-two-problems"] == 'amount: "twelve" is not a number; items: "x" is not an integer'
    assert reasons["bad-refund-word"] == 'is_refund: "maybe" is not true/false'
    assert reasons["bad-empty-user"] == "missing user_id"
    assert reasons["bad-no-amount"] == "missing amount"
    assert reasons["bad-ts-word"] == 'event_ts: "yesterday" is not a timestamp (ISO 8601, e.g. 2026-01-31T12:00:00Z)'
    assert reasons["bad-future"] == (
        "event_ts: 2026-01-10 01:00:01+00 is after the ingest time plus 3600s (2026-01-10T01:00:00+00:00)"
    )
    duplicate = by_row[len(rows) - 2]
    first_at = number["p-2026-01-05-3"]
    assert duplicate["reason"] == f'duplicate event_id "p-2026-01-05-3" (first at {path.resolve()} row {first_at})'
    assert json.loads(duplicate["record"])["amount"] == "999.0"

    record = json.loads(by_row[number["bad-amount-word"]]["record"])
    assert record == {**{k: text(v) for k, v in template("bad-amount-word", amount="twelve").items()}}
    row = by_row[number["bad-amount-word"]]
    assert (row["source"], row["file"], row["run_id"]) == ("payments", str(path.resolve()), "reasons")
    assert row["quarantined_at"] == NOW


def test_jsonl_with_bad_lines_publishes_the_good_and_quarantines_by_line_number(lake, payments, tmp_path):
    good = payment_rows(DAY, 12)
    lines = [
        good[0],  # 1
        "not json",  # 2: malformed
        good[1],  # 3
        "",  # 4: blank, skipped
        "[1, 2, 3]",  # 5: malformed
        {**good[2], "user_id": None},  # 6: missing key
        good[3],  # 7
        {**good[4], "amount": "twelve"},  # 8: wrong type
        {**good[5], "items": 3.5},  # 9: wrong type
        {**good[6], "items": "4", "user_id": 42},  # 10: good, text that parses
        {**good[7], "event_ts": 1767600000},  # 11: a number is not a timestamp
        {k: v for k, v in good[8].items() if k != "amount"},  # 12: missing value
        {**good[9], "event_ts": "2031-01-01T00:00:00Z"},  # 13: future
        {**good[0], "amount": 1.0},  # 14: duplicate of line 1
        good[10],  # 15
        "   ",  # 16: blank, skipped
        good[11],  # 17
    ]
    path = write_jsonl(tmp_path / "payments.jsonl", lines)

    report = ingest_files(lake, payments, [path], run_id="accept-jsonl", now=NOW)

    assert report.published, report.summary()
    assert report.rows_read == 15
    assert quarantined(lake, path) == [
        (2, "malformed_record"),
        (5, "malformed_record"),
        (6, "missing_key"),
        (8, "wrong_type"),
        (9, "wrong_type"),
        (11, "bad_timestamp"),
        (12, "missing_value"),
        (13, "future_timestamp"),
        (14, "duplicate_event_id"),
    ]
    landed = [good[i] for i in (0, 1, 3, 10, 11)] + [{**good[6], "items": 4, "user_id": "42"}]
    assert main_rows(lake) == expected_typed(landed)
    by_row = quarantine_by_row(lake, path)
    assert (by_row[2]["reason"], by_row[2]["record"]) == ("line is not a JSON object", "not json")
    assert by_row[5]["record"] == "[1, 2, 3]"


def test_parquet_with_bad_rows_publishes_the_good_and_quarantines_by_row(lake, payments, tmp_path):
    good = payment_rows(DAY, 10)
    rows = [
        good[0],
        {**good[1], "user_id": None},  # 2
        {**good[2], "user_id": ""},  # 3
        good[3],
        {**good[4], "event_id": None},  # 5
        {**good[5], "event_ts": None},  # 6
        {**good[6], "amount": None},  # 7
        {**good[7], "event_ts": dt.datetime(2027, 1, 1, tzinfo=dt.UTC)},  # 8
        {**good[0], "amount": 5.0},  # 9: duplicate
        good[8],
        {**good[9], "items": None},
    ]
    path = write_parquet(tmp_path / "payments.parquet", rows, nullable(payments.arrow_schema()))

    report = ingest_files(lake, payments, [path], run_id="accept-parquet", now=NOW)

    assert report.published, report.summary()
    assert (report.rows_read, report.rows_valid) == (11, 4)
    assert quarantined(lake, path) == [
        (2, "missing_key"),
        (3, "missing_key"),
        (5, "missing_key"),
        (6, "missing_key"),
        (7, "missing_value"),
        (8, "future_timestamp"),
        (9, "duplicate_event_id"),
    ]
    assert main_rows(lake) == expected_typed([good[0], good[3], good[8], {**good[9], "items": None}])


@pytest.mark.parametrize(
    ("ts_type", "items_type"),
    [
        (pa.timestamp("ms", tz="UTC"), pa.int32()),
        (pa.timestamp("ns", tz="Europe/Paris"), pa.int64()),
        (pa.timestamp("us"), pa.string()),
        (pa.string(), pa.string()),
    ],
    ids=["ms-int32", "ns-paris", "naive", "text"],
)
def test_parquet_columns_of_other_types_convert_to_the_declared_ones(lake, payments, tmp_path, ts_type, items_type):
    good = payment_rows(DAY, 6)
    rows = [dict(r) for r in good]
    if items_type == pa.string():
        rows = [{**r, "items": str(r["items"])} for r in rows]
        rows.append({**payment_rows(DAY, 7)[6], "event_id": "bad-items", "items": "3.5"})
    for r in rows:
        if ts_type == pa.timestamp("us"):
            r["event_ts"] = r["event_ts"].replace(tzinfo=None)
        elif ts_type == pa.string():
            r["event_ts"] = r["event_ts"].isoformat()
    schema = (
        nullable(payments.arrow_schema()).set(2, pa.field("event_ts", ts_type)).set(5, pa.field("items", items_type))
    )
    path = write_parquet(tmp_path / "payments.parquet", rows, schema)

    report = ingest_files(lake, payments, [path], run_id="types", now=NOW)

    assert report.published, report.summary()
    assert main_rows(lake) == expected_typed(good)
    assert quarantined(lake, path) == ([(7, "wrong_type")] if items_type == pa.string() else [])


# a file that passes row validation but fails the audit


def test_a_day_far_smaller_than_recent_days_fails_the_audit_and_main_stays(lake, payments, tmp_path):
    history = [r for day in days(DAY, 3) for r in payment_rows(day, 40)]
    first = ingest_files(lake, payments, [write_csv(tmp_path / "history.csv", history)], run_id="history", now=NOW)
    assert first.published, first.summary()
    before = lake.head(TABLE)
    thin_day = DAY + dt.timedelta(days=3)
    thin = write_csv(tmp_path / "thin.csv", payment_rows(thin_day, 3, prefix="thin"))

    report = ingest_files(lake, payments, [thin], run_id="thin-run", now=NOW)

    assert not report.published and report.published_snapshot is None
    assert lake.head(TABLE) == before == report.previous_snapshot
    assert main_ids(lake) == sorted(r["event_id"] for r in history)
    assert [(f.expectation, f.column) for f in report.audit.failures] == [
        ("expect_daily_row_count_to_be_between", "event_ts")
    ]
    assert report.audit.failures[0].detail == "3 rows in 2026-01-08 vs recent median 40 (allowed 10..160)"
    assert report.error == f"audit failed, main left at snapshot {before}; branch audit_thin-run kept for inspection"
    # The staged data waits on the branch for a person to look at.
    assert wap.branch_name("thin-run") in lake.table(TABLE).refs()
    on_branch = lake.read(TABLE, branch="audit_thin-run", columns=["event_id"])["event_id"].to_pylist()
    assert sorted(on_branch) == sorted([r["event_id"] for r in history] + [f"thin-{thin_day}-{i}" for i in range(3)])
    assert report.summary().splitlines()[-1] == f"  NOT published: {report.error}"


def test_old_days_landing_after_later_ones_are_judged_against_the_days_before_them_only(lake, payments, tmp_path):
    """A backfill of early days is not judged against later days that did not exist yet then."""
    later = [r for day in days(DAY + dt.timedelta(days=4), 3) for r in payment_rows(day, 40, prefix="late")]
    assert ingest_files(lake, payments, [write_csv(tmp_path / "later.csv", later)], now=NOW).published
    early = [r for day in days(DAY - dt.timedelta(days=3), 3) for r in payment_rows(day, 40, prefix="early")]
    assert ingest_files(lake, payments, [write_csv(tmp_path / "early.csv", early)], now=NOW).published
    # A thin day after the early ones is judged against them: 3 rows against a median of 40.
    thin = write_csv(tmp_path / "thin.csv", payment_rows(DAY, 3, prefix="thin"))
    report = ingest_files(lake, payments, [thin], now=NOW)
    assert not report.published and "vs recent median 40" in report.audit.failures[0].detail
    # The first early day has no earlier day at all: nothing to judge its volume against.
    first = write_csv(tmp_path / "first.csv", payment_rows(DAY - dt.timedelta(days=6), 3, prefix="first"))
    report = ingest_files(lake, payments, [first], now=NOW)
    assert report.published, report.summary()
    daily = [o for o in report.audit.outcomes if o.expectation == "expect_daily_row_count_to_be_between"]
    assert daily[0].detail == "not enough history (0 partitions)"


def test_a_day_near_recent_days_passes_the_same_audit(lake, payments, tmp_path):
    history = [r for day in days(DAY, 3) for r in payment_rows(day, 40)]
    ingest_files(lake, payments, [write_csv(tmp_path / "history.csv", history)], run_id="history", now=NOW)
    day = DAY + dt.timedelta(days=3)

    report = ingest_files(lake, payments, [write_csv(tmp_path / "d.csv", payment_rows(day, 30))], now=NOW)

    assert report.published, report.summary()
    assert len(main_ids(lake)) == 150


def test_values_outside_the_declared_range_or_set_fail_the_audit_and_nothing_is_published(lake, payments, tmp_path):
    rows = payment_rows(DAY, 10)
    rows[2]["amount"] = 20_000.0
    rows[4]["amount"] = -1.0
    rows[6]["currency"] = "GBP"
    rows[8]["items"] = 0
    path = write_csv(tmp_path / "payments.csv", rows)

    report = ingest_files(lake, payments, [path], run_id="range", now=NOW)

    assert not report.published
    assert report.rows_valid == 10 and report.quarantined == {}
    assert lake.head(TABLE) == report.previous_snapshot
    assert main_ids(lake) == []
    failures = {
        (f.expectation, f.column): (f.unexpected_count, sorted(map(str, f.sample))) for f in report.audit.failures
    }
    assert failures == {
        ("expect_column_values_to_be_between", "amount"): (2, ["-1.0", "20000.0"]),
        ("expect_column_values_to_be_between", "items"): (1, ["0"]),
        ("expect_column_values_to_be_in_set", "currency"): (1, ["GBP"]),
    }
    assert "audit_range" in lake.table(TABLE).refs()
    assert quarantined(lake, path) == []


# re-ingesting


def test_ingesting_the_same_file_twice_leaves_main_and_quarantine_as_after_once(lake, payments, tmp_path):
    rows, good, codes = csv_case()
    path = write_csv(tmp_path / "payments.csv", rows)
    ingest_files(lake, payments, [path], run_id="once", now=NOW)
    once_main, once_quarantine = main_rows(lake), quarantined(lake)

    again = ingest_files(lake, payments, [path], run_id="twice", now=NOW)

    assert again.published, again.summary()
    assert main_rows(lake) == once_main == expected_typed(good)
    assert quarantined(lake) == once_quarantine == expected_quarantine(rows, codes)
    assert {r["run_id"] for r in lake.read(QUARANTINE_TABLE).to_pylist()} == {"twice"}


def test_re_ingesting_a_corrected_file_replaces_its_quarantine_rows_only(lake, payments, tmp_path):
    a_rows = payment_rows(DAY, 8, prefix="a")
    b_rows = payment_rows(DAY, 8, prefix="b")
    broken_a = [*a_rows[:3], {**a_rows[3], "amount": "twelve"}, *a_rows[4:6], {**a_rows[6], "user_id": ""}, a_rows[7]]
    broken_b = [*b_rows[:5], {**b_rows[5], "items": "many"}, *b_rows[6:]]
    a = write_csv(tmp_path / "a.csv", broken_a)
    b = write_csv(tmp_path / "b.csv", broken_b)
    ingest_files(lake, payments, [a], run_id="a1", now=NOW)
    ingest_files(lake, payments, [b], run_id="b1", now=NOW)
    assert quarantined(lake, a) == [(4, "wrong_type"), (7, "missing_key")]
    assert quarantined(lake, b) == [(6, "wrong_type")]

    write_csv(a, [{**a_rows[3], "amount": 12.0}, {**a_rows[6], "user_id": "u6"}])
    report = ingest_files(lake, payments, [a], run_id="a2", now=NOW)

    assert report.published and report.quarantined == {}
    assert quarantined(lake, a) == []
    assert quarantined(lake, b) == [(6, "wrong_type")]
    assert main_ids(lake) == sorted(r["event_id"] for r in a_rows + b_rows if r is not b_rows[5])
    fixed = {r["event_id"]: r for r in main_rows(lake)}[a_rows[3]["event_id"]]
    assert fixed["amount"] == 12.0


def test_two_files_of_the_same_day_both_keep_their_rows_and_a_resent_event_replaces_its_copy(lake, payments, tmp_path):
    a_rows, b_rows = payment_rows(DAY, 20, prefix="a"), payment_rows(DAY, 15, prefix="b")
    ingest_files(lake, payments, [write_csv(tmp_path / "a.csv", a_rows)], now=NOW)
    corrected = {**a_rows[4], "amount": 77.5}

    report = ingest_files(lake, payments, [write_csv(tmp_path / "b.csv", [*b_rows, corrected])], now=NOW)

    assert report.published, report.summary()
    expected = [r for r in a_rows if r is not a_rows[4]] + b_rows + [corrected]
    assert main_rows(lake) == expected_typed(expected)


def test_an_event_id_repeated_across_files_of_one_ingest_is_quarantined_in_the_later_file(lake, payments, tmp_path):
    rows = payment_rows(DAY, 6)
    a = write_csv(tmp_path / "a.csv", rows[:4])
    b = write_csv(tmp_path / "b.csv", [rows[4], {**rows[1], "amount": 1.0}, rows[5]])

    report = ingest_files(lake, payments, [a, b], now=NOW)

    assert report.published and report.files == [str(a.resolve()), str(b.resolve())]
    assert quarantined(lake, a) == []
    assert quarantined(lake, b) == [(2, "duplicate_event_id")]
    assert main_rows(lake) == expected_typed(rows)
    reason = quarantine_by_row(lake, b)[2]["reason"]
    assert reason == f'duplicate event_id "{rows[1]["event_id"]}" (first at {a.resolve()} row 2)'


# files larger than one batch


@pytest.fixture
def small_batches(monkeypatch):
    """Read a few hundred bytes or 16 rows at a time, and land one day per chunk."""
    monkeypatch.setattr(text_readers, "BATCH_BYTES", 600)
    monkeypatch.setattr(parquet_reader, "BATCH_ROWS", 16)
    monkeypatch.setattr(validation, "CHUNK_ROWS", 50)
    sizes: list[int] = []

    def counted(path, columns, **options):
        for batch in readers.read_batches(path, columns, **options):
            sizes.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(validation, "read_batches", counted)
    return sizes


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_a_file_of_many_batches_lands_the_same_as_one_batch(lake, payments, tmp_path, small_batches, fmt):
    good = [r for day in days(DAY, 4) for r in payment_rows(day, 45)]
    rows = list(good)
    # Bad rows late in the file, and a duplicate of the first row at its end. Parquet is typed,
    # so there a missing amount stands in for an unparsable timestamp.
    rows.insert(100, {**good[100], "event_id": "late-bad", "user_id": None})
    late_bad = {"amount": None} if fmt == "parquet" else {"event_ts": "soon"}
    rows.insert(150, {**good[150], "event_id": "later-bad", **late_bad})
    rows.append({**good[0], "amount": 3.0})
    path = tmp_path / f"payments.{fmt}"
    if fmt == "csv":
        write_csv(path, rows)
    elif fmt == "jsonl":
        write_jsonl(path, rows)
    else:
        write_parquet(path, rows, nullable(payments.arrow_schema()))

    report = ingest_files(lake, payments, [path], run_id="big", now=NOW)

    assert report.published, report.summary()
    assert len(small_batches) >= 10 and max(small_batches) <= 16
    assert sum(small_batches) == report.rows_read == 183
    assert main_rows(lake) == expected_typed(good)
    assert quarantined(lake, path) == [
        (101, "missing_key"),
        (151, "bad_timestamp" if fmt != "parquet" else "missing_value"),
        (183, "duplicate_event_id"),
    ]
    # One day per chunk: each day was written in its own commit of the run.
    assert run_commits(lake, "big") == [d.isoformat() for d in days(DAY, 4)]


def test_chunks_hold_whole_days_of_about_the_asked_size(payments, tmp_path):
    sizes = {0: 30, 1: 10, 2: 25, 3: 70, 4: 5}
    rows = [r for i, n in sizes.items() for r in payment_rows(DAY + dt.timedelta(days=i), n)]
    path = write_csv(tmp_path / "p.csv", rows)

    with prepare(payments, [path], now=NOW) as prepared:
        chunks = list(prepared.chunks(max_rows=40))

    assert [c.num_rows for c in chunks] == [40, 25, 70, 5]
    assert all(c.schema == payments.arrow_schema() for c in chunks)
    assert sorted(r["event_id"] for c in chunks for r in c.to_pylist()) == sorted(r["event_id"] for r in rows)


def test_group_days_packs_consecutive_days_and_leaves_a_big_day_alone():
    d = days(DAY, 5)
    assert group_days({d[0]: 30, d[1]: 10, d[2]: 25, d[3]: 70, d[4]: 5}, 40) == [[d[0], d[1]], [d[2]], [d[3]], [d[4]]]
    assert group_days({d[2]: 1, d[0]: 1, d[1]: 1}, 10) == [[d[0], d[1], d[2]]]
    assert group_days({}, 10) == []


# main moving between stage and publish


def test_main_moving_before_publish_makes_the_ingest_stage_again_and_keep_both_writes(
    lake, payments, tmp_path, monkeypatch
):
    ours = payment_rows(DAY, 20, prefix="ours")
    theirs = payment_rows(DAY, 12, prefix="theirs")
    ingest_files(lake, payments, [write_csv(tmp_path / "base.csv", payment_rows(DAY, 5, prefix="base"))], now=NOW)
    other = write_csv(tmp_path / "theirs.csv", theirs)
    real_publish = wap.publish
    calls: list[str] = []
    other_report = {}

    def publish_after_another_writer(lake_, staged):
        calls.append(staged.run_id)
        if len(calls) == 1:
            # Another writer lands its file between our stage and our publish.
            other_report["r"] = ingest_files(lake_, payments, [other], run_id="theirs", now=NOW)
        return real_publish(lake_, staged)

    monkeypatch.setattr(wap, "publish", publish_after_another_writer)

    report = ingest_files(lake, payments, [write_csv(tmp_path / "ours.csv", ours)], run_id="ours", now=NOW)

    assert calls == ["ours", "theirs", "ours"]
    assert other_report["r"].published
    assert report.published, report.summary()
    assert report.previous_snapshot == other_report["r"].published_snapshot
    assert lake.head(TABLE) == report.published_snapshot
    expected = payment_rows(DAY, 5, prefix="base") + theirs + ours
    assert main_rows(lake) == expected_typed(expected)
    assert set(lake.table(TABLE).refs()) == {"main"}


def test_when_main_keeps_moving_the_ingest_gives_up_without_losing_the_other_write(
    lake, payments, tmp_path, monkeypatch
):
    theirs = payment_rows(DAY, 12, prefix="theirs")
    other = write_csv(tmp_path / "theirs.csv", theirs)
    real_publish = wap.publish

    def publish_after_another_writer(lake_, staged):
        if staged.run_id == "ours":
            ingest_files(lake_, payments, [other], run_id=f"theirs-{staged.snapshot_id}", now=NOW)
        return real_publish(lake_, staged)

    monkeypatch.setattr(wap, "publish", publish_after_another_writer)

    report = ingest_files(
        lake,
        payments,
        [write_csv(tmp_path / "ours.csv", payment_rows(DAY, 20, prefix="ours"))],
        run_id="ours",
        now=NOW,
        max_attempts=2,
    )

    assert not report.published
    assert "main moved to snapshot" in report.error and "Stage the run again" in report.error
    assert main_rows(lake) == expected_typed(theirs)
    assert "audit_ours" in lake.table(TABLE).refs()


# reports, windows, edge cases


def test_summary_lists_rows_read_landed_quarantined_by_reason_and_the_snapshot(lake, payments, tmp_path):
    rows = payment_rows(DAY, 10)
    rows[2]["amount"] = "twelve"
    rows[5]["user_id"] = ""
    rows[7]["user_id"] = None
    path = write_csv(tmp_path / "p.csv", rows)

    report = ingest_files(lake, payments, [path], run_id="sum", now=NOW)

    assert report.summary().splitlines() == [
        "source payments: 1 file(s), 10 rows read, 7 valid, 3 quarantined",
        "  quarantined        2  missing_key",
        "  quarantined        1  wrong_type",
        "  staged 2026-01-05 on branch audit_sum (7 rows)",
        f"  audit: all {len(report.audit.outcomes)} expectations passed",
        f"  published: main {report.previous_snapshot} -> {report.published_snapshot}",
    ]
    assert report.previous_snapshot is not None and report.previous_snapshot != report.published_snapshot


def test_published_snapshots_carry_the_run_partition_source_and_code_version(lake, payments, tmp_path):
    rows = [*payment_rows(DAY, 5), *payment_rows(DAY + dt.timedelta(days=1), 5)]

    report = ingest_files(lake, payments, [write_csv(tmp_path / "p.csv", rows)], run_id="stamped", now=NOW)

    head = lake.snapshots(TABLE)[-1]
    assert head.snapshot_id == report.published_snapshot
    assert head.properties == {
        "keel.run_id": "stamped",
        "keel.partition": "2026-01-05..2026-01-06",
        "keel.code_version": "test-sha",
        "keel.source": "ingest:payments",
        "keel.base_snapshot": str(report.previous_snapshot),
        # What became of event ids the table held already (keel.ingest.resent): nothing, here.
        "keel.rows.unchanged": "0",
        "keel.rows.replaced": "0",
        "keel.rows.duplicate": "0",
    }


def test_a_file_of_only_bad_rows_publishes_nothing_and_says_why(lake, payments, tmp_path):
    rows = [{**r, "user_id": ""} for r in payment_rows(DAY, 3)]
    path = write_csv(tmp_path / "bad.csv", rows)

    report = ingest_files(lake, payments, [path], run_id="allbad", now=NOW)

    assert not report.published and report.staged is None and report.audit is None
    assert report.error == (
        "source 'payments': no valid rows to land from 1 file(s) (3 read, 3 quarantined (missing_key 3), "
        "0 outside the run's days); see `keel quarantine --source payments`"
    )
    assert lake.head(TABLE) == report.previous_snapshot
    assert quarantined(lake, path) == [(1, "missing_key"), (2, "missing_key"), (3, "missing_key")]
    assert report.summary().splitlines() == [
        "source payments: 1 file(s), 3 rows read, 0 valid, 3 quarantined",
        "  quarantined        3  missing_key",
        f"  NOT published: {report.error}",
    ]


def test_a_window_lands_only_its_days_and_counts_the_rest(lake, payments, tmp_path):
    rows = [r for day in days(DAY, 4) for r in payment_rows(day, 10)]
    rows.append({**payment_rows(DAY, 1, prefix="w")[0], "user_id": ""})
    window = (DAY + dt.timedelta(days=1), DAY + dt.timedelta(days=2))

    report = ingest_files(lake, payments, [write_csv(tmp_path / "p.csv", rows)], now=NOW, window=window)

    assert report.published, report.summary()
    assert (report.rows_read, report.rows_valid, report.rows_outside_window) == (41, 20, 20)
    assert report.quarantined == {"missing_key": 1}
    assert main_ids(lake) == sorted(r["event_id"] for r in rows[10:30])
    assert "  skipped 20 rows outside the run's partitions" in report.summary().splitlines()


def test_a_file_missing_a_declared_column_fails_before_anything_is_written(lake, payments, tmp_path):
    path = tmp_path / "short.csv"
    path.write_text("event_id,user_id,event_ts,amount,currency,is_refund\ne1,u1,2026-01-05,1,EUR,false\n")

    with pytest.raises(FileFormatError, match=r"short\.csv' lacks column\(s\) items that its source declares"):
        ingest_files(lake, payments, [path], now=NOW)

    assert lake.tables() == []


def test_no_files_is_an_error_naming_the_source(lake, payments):
    with pytest.raises(IngestError, match="source 'payments': no files given to ingest"):
        ingest_files(lake, payments, [], now=NOW)


def test_prepare_removes_its_staging_folder_when_done_or_failing(payments, tmp_path):
    path = write_csv(tmp_path / "p.csv", payment_rows(DAY, 3))
    with prepare(payments, [path], now=NOW) as prepared:
        workdir = prepared.workdir
        assert workdir.is_dir() and prepared.rows_valid == 3
    assert not workdir.exists()

    (tmp_path / "bad.csv").write_text("event_id\n")
    # This process's folders only: other test processes stage in the same temporary folder.
    mine = f"keel-ingest-payments-{os.getpid()}-*"
    before = set(Path(workdir).parent.glob(mine))
    with pytest.raises(FileFormatError):
        prepare(payments, [path, tmp_path / "bad.csv"], now=NOW)
    assert set(Path(workdir).parent.glob(mine)) == before
