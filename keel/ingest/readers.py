"""Read uploaded event files (CSV, Parquet, JSONL; optionally gzip'd) in bounded batches.

Each batch is an Arrow table of the declared columns, untyped where the file is untyped
(CSV, JSONL give strings) plus ``_row``, the 1-based data row in the file (CSV: header
excluded; JSONL: the line number). Typing and validation happen later, in one place.

A file that cannot be read as a whole (another format under the name, binary bytes, text not in
its encoding, a gzip or Parquet file cut short or damaged, a header naming a column twice, another
source's columns) is refused with a ``FileFormatError`` saying what is wrong, where and the fix;
no library's error escapes for a file's content.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import duckdb
import pyarrow as pa

from keel.ingest.file_checks import FileFormatError
from keel.ingest.parquet_reader import parquet_batches
from keel.ingest.text_files import TextFile
from keel.ingest.text_readers import csv_batches, jsonl_batches

FORMATS = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}


def file_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    packed = bool(suffixes) and suffixes[-1] == ".gz"
    if packed:
        suffixes = suffixes[:-1]
    fmt = FORMATS.get(suffixes[-1]) if suffixes else None
    if fmt is None:
        raise FileFormatError(
            path,
            f"has format {''.join(path.suffixes) or '(no extension)'!r}, which is not supported",
            fix="use .csv, .parquet or .jsonl, optionally .gz",
        )
    if fmt == "parquet" and packed:
        raise FileFormatError(
            path,
            "is gzip-compressed Parquet, which is not supported",
            fix="send the .parquet itself: Parquet compresses inside",
        )
    return fmt


def read_batches(
    path: Path, columns: Sequence[str], *, required: Sequence[str] = (), encoding: str | None = None
) -> Iterator[pa.Table]:
    """Yield batches holding ``columns`` (missing ones fail the file) and ``_row``.

    ``required``: columns a JSONL file must name somewhere in its first batch (a file naming none
    of one is another source's). ``encoding``: of CSV and JSONL text; None reads UTF-8, or
    UTF-16/32 when the file starts with that byte order mark. An empty file yields nothing.
    """
    if not path.is_file():
        raise FileFormatError(path, "does not exist or is not a file", fix="check the path")
    fmt = file_format(path)
    if path.stat().st_size == 0:
        return
    if fmt == "parquet":
        yield from parquet_batches(path, columns)
        return
    text = TextFile(path, fmt, encoding)
    if fmt == "csv":
        yield from csv_batches(text, columns)
    else:
        yield from jsonl_batches(text, columns, required)


def timestamp_range(path: Path, column: str) -> tuple[object, object] | None:
    """The earliest and latest parsable value of ``column`` in a file (None if there is none)."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    lo = hi = None
    for batch in read_batches(path, [column]):
        con.register("batch", batch)
        row = con.execute(
            f'SELECT min(t), max(t) FROM (SELECT TRY_CAST(CAST("{column}" AS VARCHAR) AS TIMESTAMPTZ) AS t FROM batch) '
            "WHERE isfinite(t)"
        ).fetchall()[0]  # fetchone would leave the result open and block unregister
        con.unregister("batch")
        if row[0] is not None:
            lo = row[0] if lo is None else min(lo, row[0])
            hi = row[1] if hi is None else max(hi, row[1])
    return None if lo is None else (lo, hi)
