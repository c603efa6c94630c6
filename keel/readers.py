"""Read uploaded event files (CSV, Parquet, JSONL; optionally gzip'd) in bounded batches.

Each batch is an Arrow table of the declared columns, untyped where the file is untyped
(CSV, JSONL give strings) plus ``_row``, the 1-based data row in the file (CSV: header
excluded; JSONL: the line number). Typing and validation happen later, in one place.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Iterator, Sequence
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

FORMATS = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}
BATCH_BYTES = 32 << 20
BATCH_ROWS = 200_000


class FileFormatError(ValueError):
    """A file cannot be read as events of its source."""


def file_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    fmt = FORMATS.get(suffixes[-1]) if suffixes else None
    if fmt is None:
        raise FileFormatError(
            f"file {str(path)!r}: format {''.join(path.suffixes) or '(no extension)'!r} is not supported "
            "(use .csv, .parquet or .jsonl, optionally .gz)"
        )
    return fmt


def read_batches(path: Path, columns: Sequence[str]) -> Iterator[pa.Table]:
    """Yield batches holding ``columns`` (missing ones fail the file) and ``_row``."""
    if not path.is_file():
        raise FileFormatError(f"file {str(path)!r} does not exist or is not a file")
    fmt = file_format(path)
    if fmt == "csv":
        yield from _csv_batches(path, columns)
    elif fmt == "parquet":
        yield from _parquet_batches(path, columns)
    else:
        yield from _jsonl_batches(path, columns)


def _missing(path: Path, found: Sequence[str], columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in found]
    if missing:
        raise FileFormatError(
            f"file {str(path)!r} lacks column(s) {', '.join(missing)} that its source declares "
            f"(found: {', '.join(found) or 'none'}); add them, or fix the --source"
        )


def _with_rows(table: pa.Table, first_row: int) -> pa.Table:
    rows = pa.array(np.arange(first_row, first_row + table.num_rows, dtype=np.int64))
    return table.append_column("_row", rows)


def _csv_batches(path: Path, columns: Sequence[str]) -> Iterator[pa.Table]:
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    # utf-8-sig: spreadsheet programs save "CSV UTF-8" with a byte order mark before the first name.
    with opener(path, "rt", newline="", encoding="utf-8-sig") as fh:
        header = next(csv.reader(fh), [])
    _missing(path, header, columns)
    try:
        reader = pacsv.open_csv(
            pa.input_stream(str(path), compression="detect"),
            read_options=pacsv.ReadOptions(block_size=BATCH_BYTES),
            convert_options=pacsv.ConvertOptions(
                column_types={name: pa.string() for name in header},
                include_columns=list(columns),
                # Only an empty field is missing: "NA" is Namibia and "null" may be a value.
                null_values=[""],
                strings_can_be_null=True,
            ),
        )
        row = 1
        for batch in reader:
            table = pa.Table.from_batches([batch])
            yield _with_rows(table, row)
            row += table.num_rows
    except pa.ArrowInvalid as exc:
        raise FileFormatError(
            f"file {str(path)!r} is not a readable CSV file: {exc} (fix the file and ingest it again)"
        ) from None


def _parquet_batches(path: Path, columns: Sequence[str]) -> Iterator[pa.Table]:
    try:
        pfile = pq.ParquetFile(path)
    except pa.ArrowInvalid as exc:
        raise FileFormatError(f"file {str(path)!r} is not a readable Parquet file: {exc}") from None
    _missing(path, pfile.schema_arrow.names, columns)
    row = 1
    for batch in pfile.iter_batches(batch_size=BATCH_ROWS, columns=list(columns)):
        table = pa.Table.from_batches([batch])
        yield _with_rows(table, row)
        row += table.num_rows


def _jsonl_batches(path: Path, columns: Sequence[str]) -> Iterator[pa.Table]:
    # pyarrow's JSON reader rejects a whole block when one line has a value of another type,
    # so lines are parsed by DuckDB's JSON functions, which treat each line on its own.
    con = duckdb.connect()
    extract = ", ".join(f'CASE WHEN _valid THEN json_extract_string(line, \'$."{c}"\') END AS "{c}"' for c in columns)
    stream = pa.input_stream(str(path), compression="detect")
    text = io.TextIOWrapper(stream, encoding="utf-8", errors="replace")
    line_no = 1
    while True:
        lines = text.readlines(BATCH_BYTES)
        if not lines:
            break
        # Line ends and surrounding blanks go, so blank lines are skipped and _raw shows the line itself.
        text_lines = pc.utf8_trim_whitespace(pa.array(lines, pa.string()))
        batch = _with_rows(pa.table({"line": text_lines}), line_no)
        line_no += len(lines)
        con.register("batch", batch)
        out = con.sql(
            f"SELECT {extract}, _row, NOT _valid AS _malformed, CASE WHEN NOT _valid THEN line END AS _raw FROM "
            "(SELECT line, _row, CASE WHEN json_valid(line) THEN json_type(line) = 'OBJECT' ELSE false END AS _valid FROM batch "
            " WHERE line <> '')"
        ).to_arrow_table()
        con.unregister("batch")
        yield out


def timestamp_range(path: Path, column: str) -> tuple[object, object] | None:
    """The earliest and latest parsable value of ``column`` in a file (None if there is none)."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    lo = hi = None
    for batch in read_batches(path, [column]):
        con.register("batch", batch)
        row = con.execute(
            f'SELECT min(t), max(t) FROM (SELECT TRY_CAST(CAST("{column}" AS VARCHAR) AS TIMESTAMPTZ) AS t FROM batch)'
        ).fetchall()[0]  # fetchone would leave the result open and block unregister
        con.unregister("batch")
        if row[0] is not None:
            lo = row[0] if lo is None else min(lo, row[0])
            hi = row[1] if hi is None else max(hi, row[1])
    return None if lo is None else (lo, hi)
