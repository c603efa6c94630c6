"""Parquet event files read in batches of ``BATCH_ROWS`` rows, row group by row group.

A file cut short (no footer), a damaged footer or page, or a feature the reader lacks is refused
naming the row group, its file rows and, where one column is at fault, that column.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from keel.ingest.file_checks import (
    CONTROL_BYTES,
    READ_ERRORS,
    SNIFF_BYTES,
    FileFormatError,
    magic,
    refuse_duplicate_columns,
    refuse_missing_columns,
    with_rows,
)

BATCH_ROWS = 200_000


def parquet_batches(path: Path, columns: Sequence[str]) -> Iterator[pa.Table]:
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(SNIFF_BYTES)
        fh.seek(max(size - 4, 0))
        tail = fh.read(4)
    if not head.startswith(b"PAR1"):
        found = magic(head)
        if found is None:
            binary = CONTROL_BYTES[np.frombuffer(head[:4096], np.uint8)].any()
            found = ("data" if binary else "text", "name it after its format (.csv, .jsonl), or send the Parquet file")
        raise FileFormatError(path, f"is not a Parquet file: it holds {found[0]}", fix=found[1])
    if size < 12 or tail != b"PAR1":
        raise FileFormatError(
            path, "is cut short: its Parquet footer is missing", f"byte {size} (its end)", "send the whole file again"
        )
    try:
        # Checksums, where the writer stored them, catch a damaged page that would otherwise read as other values.
        pfile = pq.ParquetFile(path, page_checksum_verification=True)
        names = pfile.schema_arrow.names
    except READ_ERRORS as exc:
        raise FileFormatError(
            path, f"has a damaged Parquet footer ({exc})", f"byte {size} (its end)", "write the file again"
        ) from None
    refuse_duplicate_columns(path, names, "its schema")
    refuse_missing_columns(path, names, columns, "its schema")
    row = 1
    groups = pfile.num_row_groups
    for group in range(groups):
        first, rows = row, 0
        try:
            rows = pfile.metadata.row_group(group).num_rows
            for batch in pfile.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], columns=list(columns)):
                table = pa.Table.from_batches([batch])
                yield with_rows(table, row)
                row += table.num_rows
        except READ_ERRORS as exc:
            column = _damaged_column(pfile, group, columns)
            span = f" (file rows {first}-{first + rows - 1})" if rows else ""
            where = f"row group {group} of {groups}{span}" + (f", column {column!r}" if column else "")
            if isinstance(exc, pa.ArrowNotImplementedError):
                raise FileFormatError(
                    path,
                    f"uses a Parquet feature the reader lacks ({exc})",
                    where,
                    "write it with common settings (e.g. snappy or zstd compression)",
                ) from None
            raise FileFormatError(
                path, f"is a damaged Parquet file ({exc})", where, "write the file again from its source"
            ) from None


def _damaged_column(pfile: pq.ParquetFile, group: int, columns: Sequence[str]) -> str | None:
    for column in columns:
        try:
            pfile.read_row_group(group, columns=[column])
        except READ_ERRORS:
            return column
    return None
