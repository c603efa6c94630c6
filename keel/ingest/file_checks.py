"""What every event-file reader checks, and how it refuses a file it cannot read.

``FileFormatError`` says what is wrong with a file, where and the fix. A file's first bytes tell
other kinds of file apart (``magic``), a header or schema must name each declared column once,
and every batch a reader yields numbers its rows (``_row``, 1-based in the file).
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

# The start of a text file looked at before reading: its kind, byte order mark and header.
SNIFF_BYTES = 64 << 10

FORMAT_NAMES = {"csv": "CSV", "jsonl": "JSONL", "parquet": "Parquet"}
CONTROL_BYTES = np.zeros(256, dtype=bool)
CONTROL_BYTES[[*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F]] = True
READ_ERRORS = (pa.ArrowException, OSError, ValueError, EOFError, zlib.error)


class FileFormatError(ValueError):
    """A file cannot be read as events of its source: what is wrong, where, and the fix.

    ``FileFormatError(message)`` alone is a message already written out whole, with no parts.
    """

    def __init__(
        self, path: str | Path, what: str | None = None, where: str | None = None, fix: str | None = None
    ) -> None:
        super().__init__(str(path), what, where, fix)
        self.path = str(path) if what is not None else None
        self.what, self.where, self.fix = (what, where, fix) if what is not None else (str(path), None, None)

    def __str__(self) -> str:
        if self.path is None:
            return self.what
        at = f" at {self.where}" if self.where else ""
        fix = f" ({self.fix})" if self.fix else ""
        return f"file {self.path!r} {self.what}{at}{fix}"


def refuse_missing_columns(path: Path, found: Sequence[str], columns: Sequence[str], where: str) -> None:
    missing = [c for c in columns if c not in found]
    if missing:
        raise FileFormatError(
            path,
            f"lacks column(s) {', '.join(missing)} that its source declares",
            f"{where}, which names {', '.join(found) or 'nothing'}",
            "add them, or give --source the source the file holds",
        )


def refuse_duplicate_columns(path: Path, names: Sequence[str], where: str) -> None:
    counts = Counter(n for n in names if n)
    for name, count in counts.items():
        if count > 1:
            places = [str(i + 1) for i, n in enumerate(names) if n == name]
            raise FileFormatError(
                path,
                f"names column {name!r} {'twice' if count == 2 else f'{count} times'}",
                f"{where} (columns {', '.join(places[:-1])} and {places[-1]})",
                "rename or drop all but one of them",
            )


def with_rows(table: pa.Table, first_row: int) -> pa.Table:
    rows = pa.array(np.arange(first_row, first_row + table.num_rows, dtype=np.int64))
    return table.append_column("_row", rows)


def magic(head: bytes) -> tuple[str, str] | None:
    """What a file starting with ``head`` is, when it is a known binary kind: (kind, fix)."""
    if head.startswith(b"PAR1"):
        return "a Parquet file", "name it .parquet"
    if head.startswith(b"PK\x03\x04"):
        return "a ZIP archive (a spreadsheet workbook?)", "export the sheet as CSV, or unzip it"
    if head.startswith(b"\xd0\xcf\x11\xe0"):
        return "an old Excel workbook", "export the sheet as CSV"
    if head.startswith(b"\x1f\x8b"):
        return "gzip-compressed data", "add .gz to its name"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd-compressed data", "decompress it, or compress it with gzip and name it .gz"
    return None
