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

import codecs
import csv
import io
import zlib
from collections import Counter
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
# The start of a text file looked at before reading: its kind, byte order mark and header.
SNIFF_BYTES = 64 << 10
# Text has a few stray control bytes at most; random or binary data has about one in nine.
BINARY_SHARE = 0.05
# Read size when a file is decoded again to find its first bad byte (an error's path only).
SCAN_BYTES = 1 << 20

_FORMAT_NAMES = {"csv": "CSV", "jsonl": "JSONL", "parquet": "Parquet"}
_CONTROL = np.zeros(256, dtype=bool)
_CONTROL[[*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F]] = True
_READ_ERRORS = (pa.ArrowException, OSError, ValueError, EOFError, zlib.error)


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


def check_encoding(name: str) -> str:
    """``name`` as Python's codec knows it; ValueError naming it when there is no such encoding."""
    try:
        return codecs.lookup(name).name
    except LookupError:
        raise ValueError(f"encoding {name!r} is not known (use e.g. utf-8, latin-1, cp1252 or utf-16)") from None


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
        yield from _parquet_batches(path, columns)
        return
    text = _TextFile(path, fmt, encoding)
    if fmt == "csv":
        yield from _csv_batches(text, columns)
    else:
        yield from _jsonl_batches(text, columns, required)


def _missing(path: Path, found: Sequence[str], columns: Sequence[str], where: str) -> None:
    missing = [c for c in columns if c not in found]
    if missing:
        raise FileFormatError(
            path,
            f"lacks column(s) {', '.join(missing)} that its source declares",
            f"{where}, which names {', '.join(found) or 'nothing'}",
            "add them, or give --source the source the file holds",
        )


def _duplicates(path: Path, names: Sequence[str], where: str) -> None:
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


def _with_rows(table: pa.Table, first_row: int) -> pa.Table:
    rows = pa.array(np.arange(first_row, first_row + table.num_rows, dtype=np.int64))
    return table.append_column("_row", rows)


# Text files: the first bytes say what they are ----------------------------------------------


def _magic(head: bytes) -> tuple[str, str] | None:
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


class _TextFile:
    """A CSV or JSONL file checked from its first bytes: not another kind of file, not binary,
    and in an encoding (from its byte order mark, or the one given)."""

    def __init__(self, path: Path, fmt: str, encoding: str | None) -> None:
        self.path, self.fmt = path, fmt
        self.packed = path.suffix.lower() == ".gz"
        if self.packed:
            with path.open("rb") as fh:
                if fh.read(2) != b"\x1f\x8b":
                    raise FileFormatError(
                        path,
                        "is not gzip-compressed, though its name ends in .gz",
                        fix="drop .gz from its name, or compress it with gzip",
                    )
        try:
            with self.open() as stream:
                sample = stream.read(SNIFF_BYTES + 1)
        except _READ_ERRORS as exc:
            raise self.stream_error(exc, rows=0) from None
        self.whole = len(sample) <= SNIFF_BYTES
        self.sample = sample[:SNIFF_BYTES]
        found = _magic(self.sample)
        if found:
            raise FileFormatError(path, f"is {found[0]}, not {_FORMAT_NAMES[fmt]}", fix=found[1])
        self.encoding = self._encoding(encoding)
        if not self.encoding.startswith(("utf-16", "utf-32")):
            self._refuse_binary()

    def open(self) -> pa.NativeFile:
        return pa.input_stream(str(self.path), compression="gzip" if self.packed else None)

    def _encoding(self, given: str | None) -> str:
        if given is not None:
            name = check_encoding(given)
            # A UTF-8 file may start with a byte order mark (spreadsheet programs' "CSV UTF-8"): skipped.
            return "utf-8-sig" if name == "utf-8" else name
        for bom, name in (
            (codecs.BOM_UTF32_LE, "utf-32"),
            (codecs.BOM_UTF32_BE, "utf-32"),
            (codecs.BOM_UTF16_LE, "utf-16"),
            (codecs.BOM_UTF16_BE, "utf-16"),
        ):
            if self.sample.startswith(bom):
                return name
        return "utf-8-sig"

    def _refuse_binary(self) -> None:
        if not self.sample:
            return
        data = np.frombuffer(self.sample, dtype=np.uint8)
        control = _CONTROL[data]
        if control.mean() < BINARY_SHARE:
            return
        zeros_odd, zeros_even = (data[1::2] == 0).mean(), (data[0::2] == 0).mean()
        if max(zeros_odd, zeros_even) > 0.9 and min(zeros_odd, zeros_even) < 0.1:
            raise FileFormatError(
                self.path,
                "is UTF-16 text without a byte order mark",
                fix=f"ingest it with --encoding utf-16-{'le' if zeros_odd > zeros_even else 'be'}, or save it as UTF-8",
            )
        first = int(np.argmax(control))
        raise FileFormatError(
            self.path,
            f"is binary, not text (byte 0x{data[first]:02X})",
            self._place(first, self.sample[:first].count(b"\n") + 1),
            f"check that this is the {_FORMAT_NAMES[self.fmt]} export itself, not another kind of file renamed",
        )

    def _place(self, offset: int, line: int) -> str:
        return f"byte {offset}{' of the uncompressed data' if self.packed else ''} (line {line})"

    def encoding_error(self) -> FileFormatError | None:
        """The refusal naming the first byte that is not of the file's encoding (None if every byte is)."""
        found = self.first_bad_byte()
        return None if found is None else self._bad_byte(*found)

    def first_bad_byte(self) -> tuple[int, int, int] | None:
        """(offset, line, byte) of the first byte that is not of the file's encoding, read from the start."""
        codec, skip = self.encoding, 0
        if codec == "utf-8-sig":
            # Plain UTF-8 after the mark: utf-8-sig reports positions past the mark, not in the file.
            codec, skip = "utf-8", len(codecs.BOM_UTF8) if self.sample.startswith(codecs.BOM_UTF8) else 0
        decoder = codecs.getincrementaldecoder(codec)("strict")
        offset, lines = skip, 0
        try:
            with self.open() as stream:
                stream.read(skip)
                while True:
                    chunk = stream.read(SCAN_BYTES)
                    # The decoder holds back the bytes of a character split between reads.
                    pending = len(decoder.getstate()[0])
                    try:
                        decoder.decode(chunk, final=not chunk)
                    except UnicodeDecodeError as exc:
                        at = offset - pending + exc.start
                        byte = exc.object[exc.start] if exc.start < len(exc.object) else 0
                        return at, lines + chunk[: max(at - offset, 0)].count(b"\n") + 1, byte
                    if not chunk:
                        return None
                    offset += len(chunk)
                    lines += chunk.count(b"\n")
        except _READ_ERRORS:
            return None

    def _bad_byte(self, at: int, line: int, byte: int) -> FileFormatError:
        utf8 = self.encoding.startswith("utf-8")
        name = "UTF-8" if utf8 else self.encoding.upper() if self.encoding.startswith("utf") else self.encoding
        fix = (
            "if it was saved as Latin-1 or Windows-1252, ingest it with --encoding latin-1 or --encoding cp1252; "
            "otherwise save it as UTF-8"
            if utf8
            else f"it is not {name}: give the encoding it was saved in with --encoding, or save it as UTF-8"
        )
        return FileFormatError(self.path, f"is not valid {name} (byte 0x{byte:02X})", self._place(at, line), fix)

    def stream_error(self, exc: BaseException, rows: int) -> FileFormatError:
        """A decompression or read failure as a refusal: cut short, or damaged."""
        size = self.path.stat().st_size
        after = f", after row {rows}" if rows else ""
        message = str(exc)
        if self.packed and (isinstance(exc, EOFError) or "truncated" in message.lower() or "end of" in message):
            return FileFormatError(
                self.path,
                "is cut short: its gzip stream ends early",
                f"byte {size} (its end){after}",
                "send the whole file again",
            )
        return FileFormatError(
            self.path,
            f"cannot be read{' as gzip' if self.packed else ''} ({message})",
            f"the data after row {rows}" if rows else None,
            "send the file again",
        )


# CSV -----------------------------------------------------------------------------------------


def _csv_header(text: _TextFile) -> list[str] | None:
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


def _csv_batches(text: _TextFile, columns: Sequence[str]) -> Iterator[pa.Table]:
    path = text.path
    header = _csv_header(text)
    if header is None:
        return
    _duplicates(path, header, "its header")
    _missing(path, header, columns, "its header")
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
            yield _with_rows(table, row)
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
    except _READ_ERRORS as exc:
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
    text: _TextFile, header: Sequence[str], columns: Sequence[str], encoding: str, exc: Exception
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


# Parquet -------------------------------------------------------------------------------------


def _parquet_batches(path: Path, columns: Sequence[str]) -> Iterator[pa.Table]:
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(SNIFF_BYTES)
        fh.seek(max(size - 4, 0))
        tail = fh.read(4)
    if not head.startswith(b"PAR1"):
        found = _magic(head)
        if found is None:
            binary = _CONTROL[np.frombuffer(head[:4096], np.uint8)].any()
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
    except _READ_ERRORS as exc:
        raise FileFormatError(
            path, f"has a damaged Parquet footer ({exc})", f"byte {size} (its end)", "write the file again"
        ) from None
    _duplicates(path, names, "its schema")
    _missing(path, names, columns, "its schema")
    row = 1
    groups = pfile.num_row_groups
    for group in range(groups):
        first, rows = row, 0
        try:
            rows = pfile.metadata.row_group(group).num_rows
            for batch in pfile.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], columns=list(columns)):
                table = pa.Table.from_batches([batch])
                yield _with_rows(table, row)
                row += table.num_rows
        except _READ_ERRORS as exc:
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
        except _READ_ERRORS:
            return column
    return None


# JSONL ---------------------------------------------------------------------------------------


def _jsonl_batches(text: _TextFile, columns: Sequence[str], required: Sequence[str]) -> Iterator[pa.Table]:
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
                batch = _with_rows(pa.table({"line": text_lines}), line_no)
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
    except _READ_ERRORS as exc:
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
