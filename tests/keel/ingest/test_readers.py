"""Reading event files: bounded batches, 1-based file rows, untyped text, clear errors."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import pickle

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.ingest import parquet_reader, text_files, text_readers
from keel.ingest.file_checks import FileFormatError
from keel.ingest.readers import file_format, read_batches, timestamp_range
from keel.ingest.text_files import TextFile, check_encoding

COLUMNS = ["event_id", "user_id", "event_ts", "amount"]


def csv_text(n: int, *, header: str = "event_id,user_id,event_ts,amount,note") -> str:
    lines = [header] + [f"e{i},u{i % 3},2026-01-05T{i % 24:02d}:00:00Z,{i}.5,n{i}" for i in range(n)]
    return "\n".join(lines) + "\n"


def jsonl_text(n: int) -> str:
    return "".join(
        json.dumps({"event_id": f"e{i}", "user_id": f"u{i % 3}", "event_ts": f"2026-01-05T{i % 24:02d}:00:00Z"}) + "\n"
        for i in range(n)
    )


def read_all(path, columns=COLUMNS, **options) -> tuple[list[pa.Table], pa.Table]:
    batches = list(read_batches(path, columns, **options))
    return batches, pa.concat_tables(batches)


@pytest.fixture
def small_batches(monkeypatch):
    """Batches of a few rows, so that a file of tens of rows is read in several."""
    monkeypatch.setattr(text_readers, "BATCH_BYTES", 256)
    monkeypatch.setattr(parquet_reader, "BATCH_ROWS", 7)


# formats


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("a.csv", "csv"),
        ("a.CSV", "csv"),
        ("a.csv.gz", "csv"),
        ("a.parquet", "parquet"),
        ("a.pq", "parquet"),
        ("a.jsonl", "jsonl"),
        ("a.ndjson.gz", "jsonl"),
        ("a.json", "jsonl"),
        ("events.2026-01-05.csv", "csv"),
    ],
)
def test_format_follows_the_extension(tmp_path, name, fmt):
    assert file_format(tmp_path / name) == fmt


@pytest.mark.parametrize(("name", "shown"), [("a.txt", "'.txt'"), ("a.gz", "'.gz'"), ("events", "'(no extension)'")])
def test_unknown_extension_names_the_file_and_the_supported_formats(tmp_path, name, shown):
    path = tmp_path / name
    path.write_text("event_id\ne1\n")

    with pytest.raises(FileFormatError) as err:
        list(read_batches(path, ["event_id"]))

    assert str(err.value) == (
        f"file {str(path)!r} has format {shown}, which is not supported (use .csv, .parquet or .jsonl, optionally .gz)"
    )
    assert (err.value.path, err.value.where, err.value.fix) == (
        str(path),
        None,
        "use .csv, .parquet or .jsonl, optionally .gz",
    )


def test_gzipped_parquet_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "e.parquet.gz"
    path.write_bytes(gzip.compress(b"PAR1"))

    with pytest.raises(FileFormatError) as err:
        list(read_batches(path, COLUMNS))

    assert err.value.what == "is gzip-compressed Parquet, which is not supported"


def test_missing_file_is_a_format_error(tmp_path):
    path = tmp_path / "nope.csv"
    with pytest.raises(FileFormatError, match=r"nope\.csv' does not exist or is not a file"):
        list(read_batches(path, COLUMNS))
    with pytest.raises(FileFormatError, match="does not exist or is not a file"):
        list(read_batches(tmp_path, COLUMNS))


# CSV


def test_csv_values_all_come_back_as_strings_with_1_based_rows(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text(
        "amount,event_ts,user_id,event_id,note\n"
        "12.50,2026-01-05T10:00:00Z,007,e1,x\n"
        "twelve,not a time,u2,e2,y\n"
        ",2026-01-05,,e3,z\n"
    )

    batches, table = read_all(path)

    assert len(batches) == 1
    # Declared columns only, in the declared order, then _row; nothing is typed yet.
    assert table.schema == pa.schema(
        [("event_id", pa.string()), ("user_id", pa.string()), ("event_ts", pa.string()), ("amount", pa.string())]
        + [("_row", pa.int64())]
    )
    assert table.to_pylist() == [
        {"event_id": "e1", "user_id": "007", "event_ts": "2026-01-05T10:00:00Z", "amount": "12.50", "_row": 1},
        {"event_id": "e2", "user_id": "u2", "event_ts": "not a time", "amount": "twelve", "_row": 2},
        {"event_id": "e3", "user_id": None, "event_ts": "2026-01-05", "amount": None, "_row": 3},
    ]


def test_csv_only_an_empty_field_is_missing(tmp_path):
    # Namibia's code and the word null are values; pyarrow's default would read them as NULL.
    path = tmp_path / "c.csv"
    path.write_text('event_id,country,note\ne1,NA,null\ne2,,N/A\ne3,"",NaN\n')

    _, table = read_all(path, columns=["event_id", "country", "note"])

    assert table.column("country").to_pylist() == ["NA", None, None]
    assert table.column("note").to_pylist() == ["null", "N/A", "NaN"]


def test_csv_is_read_in_bounded_batches_with_contiguous_rows(tmp_path, small_batches):
    path = tmp_path / "e.csv"
    path.write_text(csv_text(60))

    batches, table = read_all(path)

    assert len(batches) >= 5
    assert all(b.num_rows <= 10 for b in batches)
    assert table["_row"].to_pylist() == list(range(1, 61))
    assert table["event_id"].to_pylist() == [f"e{i}" for i in range(60)]
    # Each batch starts where the previous one ended.
    firsts = [b["_row"][0].as_py() for b in batches]
    assert firsts == [1] + [1 + sum(b.num_rows for b in batches[:i]) for i in range(1, len(batches))]


def test_gzipped_csv_reads_like_the_plain_file(tmp_path, small_batches):
    plain, packed = tmp_path / "e.csv", tmp_path / "e.csv.gz"
    plain.write_text(csv_text(40))
    packed.write_bytes(gzip.compress(csv_text(40).encode()))

    assert read_all(packed)[1].equals(read_all(plain)[1])


def test_csv_with_a_byte_order_mark_reads_its_first_column(tmp_path):
    # Spreadsheet programs save "CSV UTF-8" with a BOM before the first header name.
    path = tmp_path / "excel.csv"
    path.write_bytes(("\ufeff" + csv_text(3)).encode())

    _, table = read_all(path)

    assert table["event_id"].to_pylist() == ["e0", "e1", "e2"]


def test_csv_missing_a_declared_column_names_the_file_and_the_column(tmp_path):
    path = tmp_path / "short.csv"
    path.write_text("event_id,event_ts,note\ne1,2026-01-05,x\n")

    with pytest.raises(FileFormatError) as err:
        list(read_batches(path, COLUMNS))

    assert str(err.value) == (
        f"file {str(path)!r} lacks column(s) user_id, amount that its source declares at its header, which names "
        "event_id, event_ts, note (add them, or give --source the source the file holds)"
    )


@pytest.mark.parametrize("data", [b"", b"\n\n", gzip.compress(b"")], ids=["empty", "blank-lines", "empty-gzip"])
def test_a_csv_without_a_header_yields_no_rows(tmp_path, data):
    path = tmp_path / ("e.csv.gz" if data.startswith(b"\x1f\x8b") else "e.csv")
    path.write_bytes(data)

    assert list(read_batches(path, COLUMNS)) == []


def test_csv_header_after_blank_lines_is_the_header(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("\n\n" + csv_text(2))

    assert read_all(path)[1]["event_id"].to_pylist() == ["e0", "e1"]


def test_csv_with_only_a_header_yields_no_rows(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("event_id,user_id,event_ts,amount\n")

    assert sum(b.num_rows for b in read_batches(path, COLUMNS)) == 0


def test_csv_row_with_too_many_fields_is_a_format_error_naming_the_file(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("event_id,user_id,event_ts,amount\ne1,u1,2026-01-05,1\ne2,u2,2026-01-05,2,surplus\n")

    with pytest.raises(FileFormatError) as err:
        list(read_batches(path, COLUMNS))

    assert err.value.what == "is not a readable CSV file: Expected 4 columns, got 5: e2,u2,2026-01-05,2,surplus"
    assert err.value.where == "row 2"
    assert err.value.fix == "give every row the header's 4 fields, quoting values that hold commas"


def test_csv_row_error_deep_in_a_file_of_many_batches_names_its_row(tmp_path, small_batches):
    path = tmp_path / "ragged.csv"
    path.write_text(csv_text(60) + "x,y\n" + csv_text(3, header="").lstrip("\n"))

    with pytest.raises(FileFormatError) as err:
        list(read_batches(path, COLUMNS))

    assert err.value.where == "row 61"


# Parquet


def parquet_file(path, n: int, *, row_group_size: int | None = None) -> pa.Table:
    table = pa.table(
        {
            "note": [f"n{i}" for i in range(n)],
            "event_id": [f"e{i}" for i in range(n)],
            "user_id": [f"u{i % 3}" for i in range(n)],
            "event_ts": pa.array(
                [dt.datetime(2026, 1, 5, tzinfo=dt.UTC) + dt.timedelta(minutes=i) for i in range(n)],
                pa.timestamp("us", tz="UTC"),
            ),
            "amount": [i + 0.5 for i in range(n)],
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)
    return table


def test_parquet_keeps_its_types_and_selects_the_declared_columns(tmp_path):
    path = tmp_path / "e.parquet"
    written = parquet_file(path, 5)

    batches, table = read_all(path)

    assert len(batches) == 1
    assert table.column_names == [*COLUMNS, "_row"]
    assert table.schema.field("event_ts").type == pa.timestamp("us", tz="UTC")
    assert table.schema.field("amount").type == pa.float64()
    assert table.drop_columns(["_row"]).equals(written.select(COLUMNS))
    assert table["_row"].to_pylist() == [1, 2, 3, 4, 5]


def test_parquet_is_read_in_bounded_batches_across_row_groups(tmp_path, small_batches):
    path = tmp_path / "e.parquet"
    written = parquet_file(path, 50, row_group_size=12)

    batches, table = read_all(path)

    assert len(batches) >= 8
    assert all(b.num_rows <= 7 for b in batches)
    assert table["_row"].to_pylist() == list(range(1, 51))
    assert table["event_id"].to_pylist() == written["event_id"].to_pylist()


def test_parquet_missing_a_declared_column_names_the_file_and_the_column(tmp_path):
    path = tmp_path / "e.parquet"
    pq.write_table(pa.table({"event_id": ["e1"], "event_ts": ["2026-01-05"], "amount": [1.0]}), path)

    with pytest.raises(FileFormatError) as err:
        list(read_batches(path, COLUMNS))

    assert str(err.value) == (
        f"file {str(path)!r} lacks column(s) user_id that its source declares at its schema, which names "
        "event_id, event_ts, amount (add them, or give --source the source the file holds)"
    )


def test_file_that_is_not_parquet_is_a_format_error(tmp_path):
    path = tmp_path / "e.parquet"
    path.write_text("event_id,user_id\ne1,u1\n")

    with pytest.raises(FileFormatError) as err:
        list(read_batches(path, COLUMNS))

    assert str(err.value) == (
        f"file {str(path)!r} is not a Parquet file: it holds text "
        "(name it after its format (.csv, .jsonl), or send the Parquet file)"
    )


# JSONL


def test_jsonl_values_come_back_as_text_and_rows_are_line_numbers(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text(
        '{"event_id": "e1", "user_id": 7, "event_ts": "2026-01-05T10:00:00Z", "amount": 12.5, "extra": 1}\n'
        '{"amount": "twelve", "event_id": "e2", "user_id": null, "event_ts": "2026-01-05", "tags": {"a": 1}}\n'
        '{"event_id": "e3", "user_id": "u3", "event_ts": "2026-01-05", "amount": true}\n'
    )

    batches, table = read_all(path)

    assert len(batches) == 1
    assert table.schema == pa.schema(
        [(c, pa.string()) for c in COLUMNS] + [("_row", pa.int64()), ("_malformed", pa.bool_()), ("_raw", pa.string())]
    )
    assert table.to_pylist() == [
        {
            "event_id": "e1",
            "user_id": "7",
            "event_ts": "2026-01-05T10:00:00Z",
            "amount": "12.5",
            "_row": 1,
            "_malformed": False,
            "_raw": None,
        },
        {
            "event_id": "e2",
            "user_id": None,
            "event_ts": "2026-01-05",
            "amount": "twelve",
            "_row": 2,
            "_malformed": False,
            "_raw": None,
        },
        {
            "event_id": "e3",
            "user_id": "u3",
            "event_ts": "2026-01-05",
            "amount": "true",
            "_row": 3,
            "_malformed": False,
            "_raw": None,
        },
    ]


def test_jsonl_malformed_lines_are_flagged_and_blank_lines_skipped(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text(
        '{"event_id": "e1", "user_id": "u1", "event_ts": "2026-01-05", "amount": 1}\n'
        "\n"
        "not json at all\n"
        "[1, 2, 3]\n"
        "   \t \n"
        '"just a string"\n'
        '{"event_id": "e7", "user_id": "u7", "event_ts": "2026-01-05", "amount": 7\n'
        '{"event_id": "e8", "user_id": "u8", "event_ts": "2026-01-05", "amount": 8}\r\n'
        '  {"event_id": "e9", "user_id": "u9", "event_ts": "2026-01-05", "amount": 9}  '
    )

    _, table = read_all(path)

    rows = table.select(["_row", "_malformed", "_raw", "event_id", "user_id"]).to_pylist()
    assert rows == [
        {"_row": 1, "_malformed": False, "_raw": None, "event_id": "e1", "user_id": "u1"},
        {"_row": 3, "_malformed": True, "_raw": "not json at all", "event_id": None, "user_id": None},
        {"_row": 4, "_malformed": True, "_raw": "[1, 2, 3]", "event_id": None, "user_id": None},
        {"_row": 6, "_malformed": True, "_raw": '"just a string"', "event_id": None, "user_id": None},
        {
            "_row": 7,
            "_malformed": True,
            "_raw": '{"event_id": "e7", "user_id": "u7", "event_ts": "2026-01-05", "amount": 7',
            "event_id": None,
            "user_id": None,
        },
        {"_row": 8, "_malformed": False, "_raw": None, "event_id": "e8", "user_id": "u8"},
        {"_row": 9, "_malformed": False, "_raw": None, "event_id": "e9", "user_id": "u9"},
    ]


def test_jsonl_is_read_in_bounded_batches_with_contiguous_rows(tmp_path, small_batches):
    path = tmp_path / "e.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl_text(60).encode()))

    batches, table = read_all(path, ["event_id", "user_id", "event_ts"])

    assert len(batches) >= 10
    assert table["_row"].to_pylist() == list(range(1, 61))
    assert table["event_id"].to_pylist() == [f"e{i}" for i in range(60)]
    assert pc.sum(table["_malformed"]).as_py() == 0


def test_jsonl_lines_lacking_a_column_give_null_for_it(tmp_path):
    # JSON has no header: a key absent from a line is NULL there, and validation decides.
    path = tmp_path / "e.jsonl"
    path.write_text('{"event_id": "e1"}\n')

    _, table = read_all(path)

    assert table.select(COLUMNS).to_pylist() == [{"event_id": "e1", "user_id": None, "event_ts": None, "amount": None}]


# timestamp_range


def test_timestamp_range_spans_the_parsable_values_of_every_batch(tmp_path, small_batches):
    path = tmp_path / "e.csv"
    lines = ["event_ts,event_id"]
    lines += [f"2026-01-{5 + i % 4:02d}T{i % 24:02d}:30:00Z,e{i}" for i in range(40)]
    lines += ["not a time,x1", ",x2", "2026-02-01T12:00:00+02:00,late", "2025-12-31 23:59:59,early"]
    path.write_text("\n".join(lines) + "\n")

    lo, hi = timestamp_range(path, "event_ts")

    assert lo == dt.datetime(2025, 12, 31, 23, 59, 59, tzinfo=dt.UTC)
    assert hi == dt.datetime(2026, 2, 1, 10, 0, tzinfo=dt.UTC)


def test_timestamp_range_of_parquet_timestamps(tmp_path):
    path = tmp_path / "e.parquet"
    parquet_file(path, 30)

    assert timestamp_range(path, "event_ts") == (
        dt.datetime(2026, 1, 5, tzinfo=dt.UTC),
        dt.datetime(2026, 1, 5, 0, 29, tzinfo=dt.UTC),
    )


def test_timestamp_range_is_none_without_a_parsable_value(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text('{"event_ts": "soon"}\n{"event_ts": null}\nnot json\n')

    assert timestamp_range(path, "event_ts") is None


def test_timestamp_range_of_a_file_without_the_column_fails(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("ts\n2026-01-05\n")

    with pytest.raises(FileFormatError, match="lacks column"):
        timestamp_range(path, "event_ts")


# encodings and binary files


def test_a_byte_that_is_not_utf8_is_named_with_its_offset_and_line(tmp_path):
    path = tmp_path / "e.csv"
    data = ("\ufeff" + csv_text(3)).encode() + "e9,müller,2026-01-05,1,x\n".encode("latin-1")
    path.write_bytes(data)

    with pytest.raises(FileFormatError) as err:
        list(read_batches(path, COLUMNS))

    # Offsets count the byte order mark: they are offsets in the file.
    assert (err.value.what, err.value.where) == ("is not valid UTF-8 (byte 0xFC)", f"byte {data.index(0xFC)} (line 5)")
    assert err.value.fix == (
        "if it was saved as Latin-1 or Windows-1252, ingest it with --encoding latin-1 or --encoding cp1252; "
        "otherwise save it as UTF-8"
    )


def test_a_bad_byte_in_a_gzipped_file_is_placed_in_the_uncompressed_data(tmp_path):
    path = tmp_path / "e.jsonl.gz"
    data = jsonl_text(40).encode() + b'{"event_id": "\xff"}\n'
    path.write_bytes(gzip.compress(data))

    with pytest.raises(FileFormatError) as err:
        list(read_batches(path, COLUMNS[:3]))

    assert err.value.where == f"byte {data.index(0xFF)} of the uncompressed data (line 41)"


def test_the_given_encoding_reads_the_file_and_a_byte_outside_it_is_named(tmp_path):
    path = tmp_path / "e.csv"
    path.write_bytes("event_id,user_id\ne1,müller\ne2,\x81\n".encode("latin-1"))

    assert read_all(path, ["event_id", "user_id"], encoding="latin-1")[1]["user_id"].to_pylist() == ["müller", "\x81"]
    with pytest.raises(FileFormatError) as err:
        list(read_batches(path, ["event_id", "user_id"], encoding="cp1252"))
    assert (err.value.what, err.value.where) == ("is not valid cp1252 (byte 0x81)", "byte 30 (line 3)")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
def test_utf16_and_utf32_files_with_a_byte_order_mark_are_read(tmp_path, encoding):
    path = tmp_path / "e.csv"
    bom = {"utf-16": b"", "utf-16-be": b"\xfe\xff", "utf-32": b""}[encoding]
    path.write_bytes(bom + csv_text(5).encode(encoding))

    assert read_all(path)[1]["event_id"].to_pylist() == [f"e{i}" for i in range(5)]


def test_utf16_without_a_byte_order_mark_is_named_with_the_fix(tmp_path):
    path = tmp_path / "e.csv"
    path.write_bytes(csv_text(5).encode("utf-16-le"))

    with pytest.raises(FileFormatError) as err:
        list(read_batches(path, COLUMNS))

    assert (err.value.what, err.value.fix) == (
        "is UTF-16 text without a byte order mark",
        "ingest it with --encoding utf-16-le, or save it as UTF-8",
    )


def test_an_unknown_encoding_is_named():
    with pytest.raises(ValueError, match=r"encoding 'latin-9x' is not known \(use e.g. utf-8, latin-1"):
        check_encoding("latin-9x")


@given(
    prefix=st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=60),
    bad=st.sampled_from([b"\xff", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\x80"]),
    suffix=st.binary(max_size=20),
    chunk=st.integers(1, 9),
)
@settings(max_examples=200, deadline=None, derandomize=True)
def test_first_bad_byte_agrees_with_decoding_the_whole_file(tmp_path_factory, prefix, bad, suffix, chunk):
    """The scan reads in chunks that split characters; its offset is the whole-file decoder's."""
    data = prefix.encode() + bad + suffix
    path = tmp_path_factory.mktemp("scan") / "e.jsonl"
    path.write_bytes(data)
    try:
        data.decode("utf-8")
        expected = None
    except UnicodeDecodeError as exc:
        expected = (exc.start, data[: exc.start].count(b"\n") + 1, data[exc.start])
    text = TextFile.__new__(TextFile)
    text.path, text.packed, text.encoding, text.sample = path, False, "utf-8-sig", data[:10]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(text_files, "SCAN_BYTES", chunk)
        assert text.first_bad_byte() == expected


# JSONL of another source


def test_jsonl_whose_first_lines_never_name_a_required_column_is_refused(tmp_path, small_batches):
    path = tmp_path / "e.jsonl"
    lines = [json.dumps({"event_id": f"e{i}", "page": "home"}) for i in range(30)]
    path.write_text("\n".join(["", "not json", *lines]) + "\n")

    with pytest.raises(FileFormatError) as err:
        list(read_batches(path, COLUMNS, required=["event_id", "user_id"]))

    assert (err.value.what, err.value.fix) == (
        "lacks key(s) user_id that its source declares",
        "give --source the source the file holds",
    )
    assert err.value.where.startswith("every JSON object in its first ")
    assert err.value.where.endswith(" lines, whose keys are event_id, page")


def test_jsonl_naming_a_required_column_once_in_its_first_lines_is_read(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text('{"event_id": "e1"}\n{"event_id": "e2", "user_id": null}\n')

    _, table = read_all(path, ["event_id", "user_id"])

    assert table["user_id"].to_pylist() == [None, None]


def test_a_format_error_keeps_its_parts_and_a_whole_message_reads_as_given(tmp_path):
    err = FileFormatError(tmp_path / "a.csv", "is cut short", "byte 9 (its end)", "send it again")
    assert str(err) == f"file {str(tmp_path / 'a.csv')!r} is cut short at byte 9 (its end) (send it again)"
    assert (err.path, err.what, err.where, err.fix) == (
        str(tmp_path / "a.csv"),
        "is cut short",
        "byte 9 (its end)",
        "send it again",
    )
    whole = FileFormatError("a.csv: not a Parquet file")
    assert (str(whole), whole.path, whole.what) == ("a.csv: not a Parquet file", None, "a.csv: not a Parquet file")
    assert str(pickle.loads(pickle.dumps(err))) == str(err)
