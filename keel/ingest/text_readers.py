"""CSV and JSONL files read in batches of about ``BATCH_BYTES``, every value as text.

CSV is read by pyarrow, each column a string (only an empty field is missing); a parse error is
placed on its data row. JSONL lines are parsed one by one by DuckDB's JSON functions, so a line
that is no JSON object is kept (``_malformed``, with its text in ``_raw``) rather than failing the block.
"""

from __future__ import annotations

import codecs
import csv
import io
from collections.abc import Iterator, Sequence
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from keel.ingest.file_checks import (
    READ_ERRORS,
    SNIFF_BYTES,
    FileFormatError,
    refuse_duplicate_columns,
    refuse_missing_columns,
    with_rows,
)
from keel.ingest.text_files import TextFile

BATCH_BYTES = 32 << 20


# CSV -----------------------------------------------------------------------------------------


def _csv_header(text: TextFile) -> list[str] | None:
    """The first non-empty record of the file (None when it holds only blank lines)."""
    data = text.sample
    decoder = codecs.getincrementaldecoder(text.encoding)("strict")
    failed = False
    try:
        decoded = decoder.decode(data, final=text.whole)
    except UnicodeDecodeError:
        # Bytes beyond the header are judged where they are read: a column keel skips may hold anything.
        failed = True
        bad = text.first_bad_byte()
        good = data[: bad[0]] if bad else b""
        decoded = codecs.getincrementaldecoder(text.encoding)("strict").decode(good, final=False)
    buffer = io.StringIO(decoded, newline="")
    header = None
    for record in csv.reader(buffer):
        if record:
            header = record
            break
    consumed = decoded[: buffer.tell()]
    complete = consumed.endswith(("\n", "\r")) or (text.whole and not failed and buffer.tell() == len(decoded))
    if header is not None and complete:
        return header
    if failed:
        raise text.encoding_error() or FileFormatError(text.path, "is not readable text")
    if header is None and text.whole:
        return None
    raise FileFormatError(
        text.path,
        f"has no header line: no line break in its first {SNIFF_BYTES} bytes",
        fix="check that it is a CSV file",
    )


def csv_batches(text: TextFile, columns: Sequence[str]) -> Iterator[pa.Table]:
    path = text.path
    header = _csv_header(text)
    if header is None:
        return
    refuse_duplicate_columns(path, header, "its header")
    refuse_missing_columns(path, header, columns, "its header")
    # pyarrow reads UTF-8 natively (and checks it); other encodings it decodes through Python's codecs.
    encoding = "utf8" if text.encoding == "utf-8-sig" else text.encoding
    row = 1
    try:
        reader = pacsv.open_csv(
            text.open(),
            read_options=pacsv.ReadOptions(block_size=BATCH_BYTES, encoding=encoding),
            convert_options=_csv_convert(header, columns),
        )
        for batch in reader:
            table = pa.Table.from_batches([batch])
            yield with_rows(table, row)
            row += table.num_rows
    except FileFormatError:
        raise
    except UnicodeDecodeError:
        raise text.encoding_error() or FileFormatError(path, "is not readable text") from None
    except pa.ArrowInvalid as exc:
        if "UTF8" in str(exc):
            found = text.encoding_error()
            if found:
                raise found from None
        raise _csv_parse_error(text, header, columns, encoding, exc) from None
    except READ_ERRORS as exc:
        raise text.stream_error(exc, rows=row - 1) from None


def _csv_convert(header: Sequence[str], columns: Sequence[str]) -> pacsv.ConvertOptions:
    return pacsv.ConvertOptions(
        column_types={name: pa.string() for name in header},
        include_columns=list(columns),
        # Only an empty field is missing: "NA" is Namibia and "null" may be a value.
        null_values=[""],
        strings_can_be_null=True,
    )


def _csv_parse_error(
    text: TextFile, header: Sequence[str], columns: Sequence[str], encoding: str, exc: Exception
) -> FileFormatError:
    """A CSV parse error with the data row it is on: the file is read again on one thread, where
    pyarrow knows row numbers (an error's path only)."""
    found: list[int] = []

    def first_bad(row) -> str:
        if row.number is not None:
            found.append(row.number)
        return "error"

    try:
        reader = pacsv.open_csv(
            text.open(),
            read_options=pacsv.ReadOptions(block_size=BATCH_BYTES, encoding=encoding, use_threads=False),
            parse_options=pacsv.ParseOptions(invalid_row_handler=first_bad),
            convert_options=_csv_convert(header, columns),
        )
        for _ in reader:
            pass
    except Exception:  # noqa: BLE001 - the first read's error is the one reported
        pass
    detail = str(exc).removeprefix("CSV parse error: ")
    expected = detail.split(" columns", 1)[0].removeprefix("Expected ") if detail.startswith("Expected ") else None
    return FileFormatError(
        text.path,
        f"is not a readable CSV file: {detail}",
        # pyarrow counts the header as row 1; the quarantine counts data rows.
        f"row {found[0] - 1}" if found else None,
        f"give every row the header's {expected} fields, quoting values that hold commas"
        if expected
        else "fix the file and ingest it again",
    )


# JSONL ---------------------------------------------------------------------------------------


def jsonl_batches(text: TextFile, columns: Sequence[str], required: Sequence[str]) -> Iterator[pa.Table]:
    # pyarrow's JSON reader rejects a whole block when one line has a value of another type,
    # so lines are parsed by DuckDB's JSON functions, which treat each line on its own.
    con = duckdb.connect()
    extract = ", ".join(f'CASE WHEN _valid THEN json_extract_string(line, \'$."{c}"\') END AS "{c}"' for c in columns)
    line_no = 1
    first = True
    try:
        with io.TextIOWrapper(text.open(), encoding=text.encoding, errors="strict") as lines_in:
            while True:
                lines = lines_in.readlines(BATCH_BYTES)
                if not lines:
                    break
                # Line ends and surrounding blanks go, so blank lines are skipped and _raw shows the line itself.
                text_lines = pc.utf8_trim_whitespace(pa.array(lines, pa.string()))
                batch = with_rows(pa.table({"line": text_lines}), line_no)
                line_no += len(lines)
                con.register("batch", batch)
                parsed = (
                    "(SELECT line, _row, CASE WHEN json_valid(line) THEN json_type(line) = 'OBJECT' ELSE false END "
                    "AS _valid FROM batch WHERE line <> '')"
                )
                if first:
                    first = not _check_first_lines(text.path, con, parsed, required)
                out = con.sql(
                    f"SELECT {extract}, _row, NOT _valid AS _malformed, CASE WHEN NOT _valid THEN line END AS _raw "
                    f"FROM {parsed}"
                ).to_arrow_table()
                con.unregister("batch")
                yield out
    except FileFormatError:
        raise
    except UnicodeDecodeError:
        raise text.encoding_error() or FileFormatError(text.path, "is not readable text") from None
    except READ_ERRORS as exc:
        raise text.stream_error(exc, rows=line_no - 1) from None
    finally:
        con.close()


def _check_first_lines(path: Path, con: duckdb.DuckDBPyConnection, parsed: str, required: Sequence[str]) -> bool:
    """Refuse a file whose first lines hold no JSON object, or no line naming a required column
    (another source's file); True once lines were judged (False for a batch of blank lines)."""
    # CASE, not AND: DuckDB may evaluate both sides of AND, and json_exists fails on a line that is no JSON.
    seen = "".join(f", bool_or(CASE WHEN _valid THEN json_exists(line, '$.\"{c}\"') END)" for c in required)
    row = con.execute(f"SELECT count(*), count(*) FILTER (WHERE _valid){seen} FROM {parsed}").fetchall()
    lines, objects, *named = row[0]
    if lines == 0:
        return False
    if objects == 0:
        raise FileFormatError(
            path,
            "holds no JSON object",
            f"any of its first {lines} lines",
            "JSONL holds one JSON object per line: check the file's format and name",
        )
    missing = [c for c, ok in zip(required, named, strict=True) if not ok]
    if missing:
        keys = con.execute(
            "SELECT k FROM (SELECT _row, unnest(keys) AS k, generate_subscripts(keys, 1) AS i FROM "
            f"(SELECT _row, CASE WHEN _valid THEN json_keys(line) END AS keys FROM {parsed})) "
            "GROUP BY k ORDER BY min(_row), min(i) LIMIT 30"
        ).fetchall()
        span = (
            f"every one of its first {lines} lines"
            if objects == lines
            else f"every JSON object in its first {lines} lines"
        )
        raise FileFormatError(
            path,
            f"lacks key(s) {', '.join(missing)} that its source declares",
            f"{span}, whose keys are {', '.join(k for (k,) in keys) or 'none'}",
            "give --source the source the file holds",
        )
    return True
