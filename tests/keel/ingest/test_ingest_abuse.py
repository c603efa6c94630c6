"""A careless upstream (issue 17): every row read is landed, quarantined or counted outside the
run's days, and every file that cannot be read is refused by name, place and fix, with nothing
published."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from keel.dsl import Column, DeclarationError, EventSource
from keel.ingest import validation
from keel.ingest.batch import QUARANTINE_TABLE, IngestError, ingest_files
from keel.ingest.file_checks import FileFormatError
from keel.ingest.staging import OWNER_FILE
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
    write_jsonl,
)
from tests.factories.payments import payment_rows, payments_source

HEADER = ",".join(COLUMNS)


def csv_line(row: dict) -> str:
    return ",".join(text(row.get(c)) for c in COLUMNS)


def write_lines(path: Path, lines: list[str], *, encoding: str = "utf-8") -> Path:
    path.write_bytes("".join(line + "\n" for line in [HEADER, *lines]).encode(encoding))
    return path


def good_rows(n: int = 12, prefix: str = "g") -> list[dict]:
    return payment_rows(DAY, n, prefix=prefix)


def assert_accounted(report) -> None:
    assert report.rows_read == report.rows_valid + sum(report.quarantined.values()) + report.rows_outside_window


def assert_nothing_landed(lake) -> None:
    assert not lake.exists(TABLE) or lake.read(TABLE).num_rows == 0


# timestamps that are no moment of the source's events


def test_infinite_nan_and_ancient_timestamps_are_quarantined_and_every_row_is_accounted_for(lake, payments, tmp_path):
    good = good_rows()
    bad = {
        "minus-inf": "-infinity",
        "plus-inf": "infinity",
        "nan": "NaN",
        "year-1": "0001-01-01T00:00:00Z",
        "epoch": "epoch",
        "unix-zero": "1970-01-01T00:00:00Z",
        "last-second-of-1999": "1999-12-31T23:59:59Z",
    }
    lines = [csv_line(r) for r in good[:6]]
    lines += [csv_line({**good[0], "event_id": eid, "event_ts": ts}) for eid, ts in bad.items()]
    lines += [csv_line(r) for r in good[6:]]
    lines.append(csv_line({**good[0], "event_id": "first-moment-of-2000", "event_ts": "2000-01-01T00:00:00Z"}))
    path = write_lines(tmp_path / "p.csv", lines)

    report = ingest_files(lake, payments, [path], run_id="ts", now=NOW)

    assert report.published, report.summary()
    assert_accounted(report)
    assert (report.rows_read, report.rows_valid) == (20, 13)
    assert report.quarantined == {"bad_timestamp": 7}
    assert quarantined(lake, path) == [(n, "bad_timestamp") for n in range(7, 14)]
    assert main_ids(lake) == sorted([r["event_id"] for r in good] + ["first-moment-of-2000"])
    reasons = {json.loads(r["record"])["event_id"]: r["reason"] for r in quarantine_by_row(lake, path).values()}
    assert reasons["minus-inf"] == 'event_ts: "-infinity" is not a finite timestamp'
    assert reasons["plus-inf"] == 'event_ts: "infinity" is not a finite timestamp'
    assert reasons["nan"] == 'event_ts: "NaN" is not a timestamp (ISO 8601, e.g. 2026-01-31T12:00:00Z)'
    assert reasons["year-1"] == (
        "event_ts: 0001-01-01 00:00:00+00 is before the source's earliest date 2000-01-01 "
        "(declare EventSource(earliest=...) if such old events are real)"
    )
    assert reasons["epoch"].startswith("event_ts: 1970-01-01 00:00:00+00 is before the source's earliest date")


def test_a_source_declares_its_earliest_date(lake, buyer, tmp_path):
    source = EventSource(
        name="payments", entity=buyer, columns=payments_source(buyer).columns, earliest=dt.date(2026, 1, 5)
    )
    before, on = payment_rows(DAY - dt.timedelta(days=1), 3, prefix="b"), good_rows(3, "on")
    path = write_lines(tmp_path / "p.csv", [csv_line(r) for r in before + on])

    report = ingest_files(lake, source, [path], now=NOW)

    assert report.published, report.summary()
    assert report.quarantined == {"bad_timestamp": 3}
    assert main_ids(lake) == sorted(r["event_id"] for r in on)


@pytest.mark.parametrize(
    ("earliest", "message"),
    [
        ("2000-01-01", "earliest '2000-01-01' is not a date (use e.g. earliest=datetime.date(2000, 1, 1))"),
        (
            dt.datetime(2000, 1, 1),
            "earliest datetime.datetime(2000, 1, 1, 0, 0) is not a date (use e.g. earliest=datetime.date(2000, 1, 1))",
        ),
        (None, "earliest None is not a date (use e.g. earliest=datetime.date(2000, 1, 1))"),
    ],
)
def test_earliest_must_be_a_date(buyer, earliest, message):
    with pytest.raises(DeclarationError) as err:
        EventSource(name="payments", entity=buyer, columns=(), earliest=earliest)
    assert str(err.value) == f"event source 'payments': {message}"


# numbers that are not finite


def test_nan_and_infinite_amounts_are_quarantined_per_row_and_the_good_rows_land(lake, payments, tmp_path):
    good = good_rows()
    odd = {"nan": "NaN", "inf": "inf", "minus-inf": "-Infinity", "overflow": "1e999"}
    lines = [csv_line(r) for r in good]
    lines[3:3] = [csv_line({**good[0], "event_id": eid, "amount": v}) for eid, v in odd.items()]
    path = write_lines(tmp_path / "p.csv", lines)

    report = ingest_files(lake, payments, [path], run_id="nan", now=NOW)

    assert report.published, report.summary()
    assert report.quarantined == {"non_finite": 4}
    assert quarantined(lake, path) == [(4, "non_finite"), (5, "non_finite"), (6, "non_finite"), (7, "non_finite")]
    assert main_ids(lake) == sorted(r["event_id"] for r in good)
    assert quarantine_by_row(lake, path)[4]["reason"] == (
        'amount: "NaN" is not a finite number (declare Column(..., allow_non_finite=True) if it may be)'
    )


def test_nan_in_a_parquet_float_column_and_in_json_is_quarantined(lake, payments, tmp_path):
    good = good_rows(8)
    rows = [*good, {**good[0], "event_id": "nan", "amount": float("nan")}]
    pq.write_table(pa.Table.from_pylist(rows, schema=nullable(payments.arrow_schema())), tmp_path / "p.parquet")
    lines = [*good[:4], '{"event_id": "j-nan", "user_id": "u1", "event_ts": "2026-01-05T01:00:00Z", '
             '"amount": NaN, "currency": "EUR", "is_refund": false}']  # fmt: skip
    write_jsonl(tmp_path / "p.jsonl", lines)

    parquet = ingest_files(lake, payments, [tmp_path / "p.parquet"], now=NOW)
    jsonl = ingest_files(lake, payments, [tmp_path / "p.jsonl"], now=NOW)

    assert parquet.published and parquet.quarantined == {"non_finite": 1}
    assert jsonl.published and jsonl.quarantined == {"non_finite": 1}
    assert main_ids(lake) == sorted(r["event_id"] for r in good)


def test_a_column_may_declare_non_finite_values_allowed(lake, buyer, tmp_path):
    source = EventSource(
        name="payments",
        entity=buyer,
        columns=(Column("amount", "float64", nullable=False), Column("ratio", "float64", allow_non_finite=True)),
    )
    path = tmp_path / "r.csv"
    path.write_text(
        "event_id,user_id,event_ts,amount,ratio\n"
        "e1,u1,2026-01-05T01:00:00Z,1.5,NaN\n"
        "e2,u1,2026-01-05T02:00:00Z,2.5,inf\n"
        "e3,u1,2026-01-05T03:00:00Z,nan,0.5\n"
    )

    report = ingest_files(lake, source, [path], now=NOW)

    assert report.published, report.summary()
    assert report.quarantined == {"non_finite": 1}
    ratios = dict(zip(*lake.read(TABLE).select(["event_id", "ratio"]).to_pydict().values(), strict=True))
    assert ratios["e2"] == float("inf") and ratios["e1"] != ratios["e1"]  # NaN


def test_allow_non_finite_is_for_float_columns_only():
    with pytest.raises(DeclarationError) as err:
        Column("items", "int64", allow_non_finite=True)
    assert str(err.value) == (
        "column 'items': allow_non_finite applies to float64 columns only, not 'int64' (remove it)"
    )


# ids with control characters


def test_control_characters_in_ids_and_keys_are_quarantined(lake, payments, tmp_path):
    good = good_rows()
    lines = [csv_line(r) for r in good]
    lines += [
        csv_line({**good[0], "event_id": "nul\x00id"}),
        csv_line({**good[1], "event_id": "bell\x07"}),
        csv_line({**good[2], "event_id": "del\x7f"}),
        csv_line({**good[3], "event_id": "c1\x85"}),
        csv_line({**good[4], "event_id": "tab-key", "user_id": "u1\t"}),
    ]
    path = write_lines(tmp_path / "p.csv", lines)

    report = ingest_files(lake, payments, [path], now=NOW)

    assert report.published, report.summary()
    assert report.quarantined == {"control_character": 5}
    assert main_ids(lake) == sorted(r["event_id"] for r in good)
    by_row = quarantine_by_row(lake, path)
    assert by_row[13]["reason"] == 'event_id: "nul\\u0000id" holds control character U+0000 (ids and keys must not)'
    assert by_row[17]["reason"] == 'user_id: "u1\\t" holds control character U+0009 (ids and keys must not)'


# the counts add up, or nothing is staged


def test_a_row_lost_in_validation_stops_the_ingest_with_the_numbers(lake, payments, tmp_path, monkeypatch):
    path = write_lines(tmp_path / "p.csv", [csv_line(r) for r in good_rows(10)])

    def drop_one_silently(con, source, window):
        con.execute("DELETE FROM good WHERE _row = 3")
        return 0

    monkeypatch.setattr(validation, "_drop_outside", drop_one_silently)

    with pytest.raises(IngestError) as err:
        ingest_files(lake, payments, [path], now=NOW, window=(DAY, DAY))

    assert str(err.value) == (
        "source 'payments': 10 rows read but 9 valid + 0 quarantined + 0 outside the window = 9 "
        "(a row went missing in validation: report this with the file)"
    )
    assert lake.tables() == []


# files without rows


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("header.csv", (HEADER + "\n").encode()),
        ("empty.csv", b""),
        ("blank.jsonl", b"\n  \n\n"),
        ("empty.jsonl.gz", gzip.compress(b"", mtime=0)),
    ],
    ids=["header-only.csv", "empty.csv", "blank.jsonl", "empty.jsonl.gz"],
)
def test_a_file_without_rows_says_so_and_publishes_nothing(lake, payments, tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)

    with pytest.raises(FileFormatError) as err:
        ingest_files(lake, payments, [path], now=NOW)

    assert (err.value.path, err.value.what) == (str(path.resolve()), "holds no rows")
    assert "quarantine" not in str(err.value)
    assert lake.tables() == []


def test_a_parquet_file_of_no_rows_says_so(lake, payments, tmp_path):
    path = tmp_path / "none.parquet"
    pq.write_table(payments.arrow_schema().empty_table(), path)

    with pytest.raises(FileFormatError, match="holds no rows"):
        ingest_files(lake, payments, [path], now=NOW)


# files that cannot be read


def latin1_lines(n_before: int) -> list[str]:
    lines = [csv_line(r) for r in good_rows(n_before)]
    return [*lines, csv_line({**good_rows(1, "m")[0], "user_id": "müller"})]


@pytest.mark.parametrize("n_before", [2, 400], ids=["in-the-first-8kb", "after-the-first-8kb"])
def test_a_latin1_byte_is_refused_with_its_offset_and_the_fix(lake, payments, tmp_path, n_before):
    lines = latin1_lines(n_before)
    path = write_lines(tmp_path / "latin.csv", lines, encoding="latin-1")
    offset = path.read_bytes().index(b"\xfc")

    with pytest.raises(FileFormatError) as err:
        ingest_files(lake, payments, [path], now=NOW)

    assert err.value.what == "is not valid UTF-8 (byte 0xFC)"
    assert err.value.where == f"byte {offset} (line {n_before + 2})"
    assert "--encoding latin-1" in err.value.fix
    assert lake.tables() == []


def test_the_named_encoding_reads_a_latin1_file(lake, payments, tmp_path):
    path = write_lines(tmp_path / "latin.csv", latin1_lines(10), encoding="latin-1")

    report = ingest_files(lake, payments, [path], now=NOW, encoding="latin-1")

    assert report.published, report.summary()
    assert "müller" in lake.read(TABLE)["user_id"].to_pylist()


def test_a_utf16_csv_with_its_byte_order_mark_is_read(lake, payments, tmp_path):
    path = write_lines(tmp_path / "u16.csv", [csv_line(r) for r in good_rows(6)], encoding="utf-16")

    report = ingest_files(lake, payments, [path], now=NOW)

    assert report.published, report.summary()
    assert main_ids(lake) == sorted(r["event_id"] for r in good_rows(6))


@pytest.mark.parametrize("name", ["garbage.csv", "garbage.jsonl"])
def test_binary_garbage_is_refused_as_not_text(lake, payments, tmp_path, name):
    path = tmp_path / name
    path.write_bytes(bytes(range(256)) * 8)

    with pytest.raises(FileFormatError) as err:
        ingest_files(lake, payments, [path], now=NOW)

    assert err.value.what == "is binary, not text (byte 0x00)"
    assert err.value.where == "byte 0 (line 1)"
    assert lake.tables() == []


def test_another_format_under_a_csv_name_is_named(lake, payments, tmp_path):
    path = tmp_path / "really-parquet.csv"
    pq.write_table(pa.Table.from_pylist(good_rows(3)), path)

    with pytest.raises(FileFormatError) as err:
        ingest_files(lake, payments, [path], now=NOW)

    assert (err.value.what, err.value.fix) == ("is a Parquet file, not CSV", "name it .parquet")


def parquet_with_checksums(path: Path, rows: list[dict], schema: pa.Schema) -> Path:
    pq.write_table(
        pa.Table.from_pylist(rows, schema=schema),
        path,
        compression="none",
        row_group_size=100,
        write_page_checksum=True,
        use_dictionary=False,
    )
    return path


def test_a_parquet_file_with_a_corrupted_data_page_is_refused_naming_the_row_group(lake, payments, tmp_path):
    rows = [r for d in range(3) for r in payment_rows(DAY + dt.timedelta(days=d), 100)]
    path = parquet_with_checksums(tmp_path / "c.parquet", rows, nullable(payments.arrow_schema()))
    data = bytearray(path.read_bytes())
    meta = pq.ParquetFile(path).metadata.row_group(1).column(3)  # row group 1's amount
    start = meta.data_page_offset + 40
    data[start : start + 16] = bytes(16)
    path.write_bytes(bytes(data))

    with pytest.raises(FileFormatError) as err:
        ingest_files(lake, payments, [path], now=NOW)

    assert err.value.what.startswith("is a damaged Parquet file (")
    assert err.value.where == "row group 1 of 3 (file rows 101-200), column 'amount'"
    assert lake.tables() == []


def test_a_truncated_parquet_file_is_refused_as_cut_short(lake, payments, tmp_path):
    path = parquet_with_checksums(tmp_path / "t.parquet", good_rows(50), nullable(payments.arrow_schema()))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(FileFormatError) as err:
        ingest_files(lake, payments, [path], now=NOW)

    assert err.value.what == "is cut short: its Parquet footer is missing"
    assert err.value.where == f"byte {len(data) // 2} (its end)"


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_truncated_gzip_file_is_refused_after_the_rows_it_held(lake, payments, tmp_path, fmt):
    rows = [r for d in range(3) for r in payment_rows(DAY + dt.timedelta(days=d), 2000)]
    if fmt == "csv":
        plain = "".join(line + "\n" for line in [HEADER, *map(csv_line, rows)]).encode()
    else:
        plain = write_jsonl(tmp_path / "plain.jsonl", rows).read_bytes()
    packed = gzip.compress(plain)
    path = tmp_path / f"t.{fmt}.gz"
    path.write_bytes(packed[: len(packed) * 2 // 3])

    with pytest.raises(FileFormatError) as err:
        ingest_files(lake, payments, [path], now=NOW)

    assert err.value.what == "is cut short: its gzip stream ends early"
    assert err.value.where.startswith(f"byte {len(packed) * 2 // 3} (its end)")
    assert err.value.fix == "send the whole file again"
    assert lake.tables() == []


def test_a_file_named_gz_that_is_not_gzip_is_refused(lake, payments, tmp_path):
    path = write_lines(tmp_path / "plain.csv.gz", [csv_line(r) for r in good_rows(3)])

    with pytest.raises(FileFormatError) as err:
        ingest_files(lake, payments, [path], now=NOW)

    assert err.value.what == "is not gzip-compressed, though its name ends in .gz"


# files of another shape


def test_a_jsonl_file_of_another_source_is_refused_up_front(lake, payments, tmp_path):
    clicks = [
        {"event_id": f"c{i}", "user_id": "u1", "event_ts": "2026-01-05T01:00:00Z", "page": "home", "dwell_s": 3.5}
        for i in range(50)
    ]
    path = write_jsonl(tmp_path / "clicks.jsonl", clicks)

    with pytest.raises(FileFormatError) as err:
        ingest_files(lake, payments, [path], now=NOW)

    assert err.value.what == "lacks key(s) amount, currency, is_refund that its source declares"
    assert (
        err.value.where == "every one of its first 50 lines, whose keys are event_id, user_id, event_ts, page, dwell_s"
    )
    assert not lake.exists(QUARANTINE_TABLE)


def test_a_jsonl_file_with_no_json_object_is_refused(lake, payments, tmp_path):
    path = write_lines(tmp_path / "csv-really.jsonl", [csv_line(r) for r in good_rows(5)])

    with pytest.raises(FileFormatError) as err:
        ingest_files(lake, payments, [path], now=NOW)

    assert err.value.what == "holds no JSON object"
    assert err.value.where == "any of its first 6 lines"


def test_a_csv_header_naming_a_column_twice_is_refused(lake, payments, tmp_path):
    path = tmp_path / "dup.csv"
    path.write_text(
        "event_id,user_id,event_ts,amount,currency,items,is_refund,amount\ne1,u1,2026-01-05,1,EUR,1,false,2\n"
    )

    with pytest.raises(FileFormatError) as err:
        ingest_files(lake, payments, [path], now=NOW)

    assert err.value.what == "names column 'amount' twice"
    assert err.value.where == "its header (columns 4 and 8)"
    assert lake.tables() == []


def test_a_parquet_file_naming_a_column_twice_is_refused(lake, payments, tmp_path):
    path = tmp_path / "dup.parquet"
    table = pa.Table.from_pylist(good_rows(3)).append_column("amount", pa.array([1.0, 2.0, 3.0]))
    pq.write_table(table, path)

    with pytest.raises(FileFormatError) as err:
        ingest_files(lake, payments, [path], now=NOW)

    assert err.value.what == "names column 'amount' twice"


# the staging folder


def test_the_staging_folder_lives_under_the_given_root_and_is_gone_after_success_or_failure(lake, payments, tmp_path):
    root = tmp_path / "staging"
    good = write_lines(tmp_path / "p.csv", [csv_line(r) for r in good_rows(5)])
    broken = tmp_path / "broken.csv"
    broken.write_bytes(bytes(range(256)))
    seen: list[Path] = []
    real_close = validation.Prepared.close

    def spy(prepared):
        seen.append(prepared.workdir)
        assert json.loads((prepared.workdir / OWNER_FILE).read_text())["pid"] == os.getpid()
        real_close(prepared)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(validation.Prepared, "close", spy)
        assert ingest_files(lake, payments, [good], now=NOW, staging_root=root).published
        with pytest.raises(FileFormatError):
            ingest_files(lake, payments, [good, broken], now=NOW, staging_root=root)

    assert len(seen) == 2 and all(p.parent == root for p in seen)
    assert list(root.iterdir()) == []
