"""Validating event files against their source, into an on-disk DuckDB staging database.

Files are read in bounded batches (``keel.ingest.readers``) and each batch is checked in one
vectorised DuckDB statement: rows with missing keys, values of the wrong type, unparsable,
infinite, far-future or too early timestamps, NaN or infinite numbers, control characters in
ids and keys, malformed records, or an event id seen earlier in the same ingest get a reason
code and a message and wait as quarantine rows; the rest wait, typed, as good rows. Every row
read is good, quarantined or outside the run's days, or the ingest stops before staging. The
staging database lives on disk, so a file larger than memory spills instead of failing; its
folder holds an owner record, so ``keel maintain`` can remove what a killed ingest left.
``keel.ingest.batch`` lands the good rows through write-audit-publish.
"""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa

from keel.dsl import DUCKDB_TYPES, Column, EventSource
from keel.ingest.file_checks import FileFormatError
from keel.ingest.readers import read_batches
from keel.ingest.staging import make_workdir
from keel.ingest.text_files import check_encoding

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("file", pa.string(), nullable=False),
        pa.field("row_number", pa.int64(), nullable=False),
        pa.field("reason_code", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("record", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("quarantined_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)
CHUNK_ROWS = 1_000_000
# Control characters (C0, DEL, C1) have no place in an id; they break joins, logs and keys online.
_CONTROL_CHARACTERS = "[\\x00-\\x1f\\x7f-\\x9f]"


class IngestError(RuntimeError):
    """Nothing was published; the message says why."""


_TYPE_WORDS = {
    "int64": "an integer",
    "float64": "a number",
    "bool": "true/false",
    "timestamp": "a timestamp (ISO 8601, e.g. 2026-01-31T12:00:00Z)",
    "date": "a date (YYYY-MM-DD)",
}


@dataclass
class Prepared:
    """Validated rows of one ingest, waiting in a DuckDB staging database."""

    source: EventSource
    files: list[str]
    con: duckdb.DuckDBPyConnection
    workdir: Path
    window: tuple[dt.date, dt.date] | None = None
    rows_read: int = 0
    rows_outside_window: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)

    @property
    def rows_valid(self) -> int:
        return self.con.execute("SELECT count(*) FROM good").fetchone()[0]

    def days(self) -> dict[dt.date, int]:
        rows = self.con.execute(
            f'SELECT CAST("{self.source.timestamp}" AS DATE) AS d, count(*) FROM good GROUP BY d ORDER BY d'
        ).fetchall()
        return dict(rows)

    def chunks(self, max_rows: int | None = None) -> Iterator[pa.Table]:
        """The good rows, whole days at a time, about ``max_rows`` (default CHUNK_ROWS) per chunk, typed as the source."""
        schema = self.source.arrow_schema()
        cols = ", ".join(f'"{c}"' for c in schema.names)
        for group in group_days(self.days(), max_rows or CHUNK_ROWS):
            days = ", ".join(f"DATE '{d.isoformat()}'" for d in group)
            table = self.con.sql(
                f'SELECT {cols} FROM good WHERE CAST("{self.source.timestamp}" AS DATE) IN ({days}) '
                f'ORDER BY "{self.source.timestamp}", _file, _row'
            ).to_arrow_table()
            yield table.cast(schema)

    def quarantine_rows(self, run_id: str, now: dt.datetime) -> pa.Table:
        table = self.con.sql(
            "SELECT f.name AS file, b._row AS row_number, b.reason_code, b.reason, b.record "
            "FROM bad b JOIN files f ON f.idx = b._file ORDER BY b._file, b._row"
        ).to_arrow_table()
        n = table.num_rows
        return pa.table(
            {
                "source": pa.array([self.source.name] * n, pa.string()),
                "file": table.column("file"),
                "row_number": table.column("row_number"),
                "reason_code": table.column("reason_code"),
                "reason": table.column("reason"),
                "record": table.column("record"),
                "run_id": pa.array([run_id] * n, pa.string()),
                "quarantined_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
            },
            schema=QUARANTINE_SCHEMA,
        )

    def landable_rows(self) -> int:
        """Good rows on the days ``chunks`` lands, counted the way it selects them."""
        days = self.days()
        if not days:
            return 0
        listed = ", ".join(f"DATE '{d.isoformat()}'" for d in days)
        return self.con.execute(
            f'SELECT count(*) FROM good WHERE CAST("{self.source.timestamp}" AS DATE) IN ({listed})'
        ).fetchall()[0][0]

    def check_accounted(self) -> None:
        """Every row read is valid, quarantined or outside the window, and every valid row is on a
        day that lands; otherwise an IngestError with the numbers (a row going missing is a bug)."""
        valid, bad = self.rows_valid, sum(self.quarantined.values())
        total = valid + bad + self.rows_outside_window
        if self.rows_read != total:
            raise IngestError(
                f"source {self.source.name!r}: {self.rows_read} rows read but {valid} valid + {bad} quarantined "
                f"+ {self.rows_outside_window} outside the window = {total} (a row went missing in validation: "
                "report this with the file)"
            )
        landable = self.landable_rows()
        if landable != valid:
            raise IngestError(
                f"source {self.source.name!r}: {valid} valid rows but {landable} on days that land "
                "(a row's day went missing in validation: report this with the file)"
            )

    def close(self) -> None:
        try:
            self.con.close()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Prepared:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def group_days(counts: dict[dt.date, int], max_rows: int) -> list[list[dt.date]]:
    """Consecutive days grouped so each group holds about ``max_rows`` rows (a bigger day stands alone)."""
    groups: list[list[dt.date]] = []
    size = 0
    for day, rows in sorted(counts.items()):
        if groups and size + rows <= max_rows:
            groups[-1].append(day)
            size += rows
        else:
            groups.append([day])
            size = rows
    return groups


def prepare(
    source: EventSource,
    paths: Sequence[str | Path],
    *,
    now: dt.datetime | None = None,
    window: tuple[dt.date, dt.date] | None = None,
    staging_root: Path | None = None,
    encoding: str | None = None,
) -> Prepared:
    """Read and validate ``paths``; good rows and quarantined rows wait in a staging database.

    ``window`` (first day, last day), when given, keeps only events of those days: the rest
    are counted as outside the window, neither landed nor quarantined. The staging database
    lives in a folder under ``staging_root`` (the system's temporary folder when None), removed
    by ``close``. ``encoding``: of CSV and JSONL files (None: UTF-8, or as their byte order
    mark says). Files holding no row at all are refused (FileFormatError "holds no rows").
    """
    if not paths:
        raise IngestError(f"source {source.name!r}: no files given to ingest")
    if encoding is not None:
        try:
            check_encoding(encoding)
        except ValueError as exc:
            raise IngestError(f"source {source.name!r}: {exc}") from None
    now = now or dt.datetime.now(dt.UTC)
    workdir = make_workdir(source, staging_root)
    try:
        con = duckdb.connect(str(workdir / "staging.duckdb"))
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    prepared = Prepared(source, [str(Path(p).resolve()) for p in paths], con, workdir, window)
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.execute(f"SET temp_directory = '{workdir / 'spill'}'")
        _create_staging(con, source, prepared.files)
        names = [c.name for c in source.all_columns()]
        required = [c.name for c in source.all_columns() if not c.nullable]
        for idx, path in enumerate(prepared.files):
            for batch in read_batches(Path(path), names, required=required, encoding=encoding):
                prepared.rows_read += batch.num_rows
                _validate_into(con, source, batch, idx, now)
        if prepared.rows_read == 0:
            others = len(prepared.files) - 1
            raise FileFormatError(
                prepared.files[0],
                "holds no rows" + (f", nor do the {others} other file(s) given" if others else ""),
                fix="there is nothing to ingest: check the export that wrote it",
            )
        if source.event_id:
            _quarantine_duplicates(con, source)
        if window is not None:
            prepared.rows_outside_window = _drop_outside(con, source, window)
        prepared.quarantined = dict(
            con.execute("SELECT reason_code, count(*) FROM bad GROUP BY 1 ORDER BY 1").fetchall()
        )
        prepared.check_accounted()
    except BaseException:
        prepared.close()
        raise
    return prepared


def _create_staging(con: duckdb.DuckDBPyConnection, source: EventSource, files: list[str]) -> None:
    cols = ", ".join(f'"{c.name}" {DUCKDB_TYPES[c.type]}' for c in source.all_columns())
    con.execute(f"CREATE TABLE good (_file INTEGER, _row BIGINT, {cols})")
    con.execute("CREATE TABLE bad (_file INTEGER, _row BIGINT, reason_code VARCHAR, reason VARCHAR, record VARCHAR)")
    con.execute("CREATE TABLE files (idx INTEGER, name VARCHAR)")
    con.executemany("INSERT INTO files VALUES (?, ?)", list(enumerate(files)))


def _convert(col: Column, raw: str, batch_type: pa.DataType) -> str:
    """SQL turning a raw value into the declared type, NULL where it does not parse."""
    if batch_type == col.arrow_type:
        return raw
    text = f"trim(CAST({raw} AS VARCHAR))"
    if col.type == "int64":
        # TRY_CAST('1.5' AS BIGINT) rounds to 2; an integer column must hold integers.
        return f"CASE WHEN regexp_full_match({text}, '[+-]?[0-9]+') THEN TRY_CAST({text} AS BIGINT) END"
    if col.type == "string":
        return f"CAST({raw} AS VARCHAR)"
    return f"TRY_CAST({text} AS {DUCKDB_TYPES[col.type]})"


def check_query(source: EventSource, batch_schema: pa.Schema, relation: str, now: dt.datetime | None) -> str:
    """A query over ``relation`` typing a batch's columns and giving each row ``_code``, ``_reason`` and ``_record``.

    ``_code`` is NULL for a good row; otherwise the first reason code that applies, with every
    problem in ``_reason`` and the row as JSON text in ``_record`` (NULL on good rows). ``_row``
    passes through. Each column is trimmed and converted once, in an inner select the checks
    read: the statement stays small to plan, as a stream worker plans it on every poll.

    With ``now`` None the latest event time accepted (``future_limit``) is the statement's
    parameter ``$1`` (TIMESTAMPTZ) and its ISO text ``$2``, so one prepared statement serves
    every batch.
    """
    keys = set(source.key_columns) | {source.timestamp} | ({source.event_id} if source.event_id else set())
    inner, converted, codes, messages, raw_json = ["*"], [], [], [], []
    if "_malformed" in batch_schema.names:
        codes.append("CASE WHEN _malformed THEN 'malformed_record' END")
    for i, col in enumerate(source.all_columns()):
        raw, conv = f"_in{i}", f"_as{i}"
        given = f'"{col.name}"'
        value = f"NULLIF(trim({given}), '')" if col.name in keys and col.type == "string" else given
        inner.append(f"{value} AS {raw}")
        inner.append(f"{_convert(col, value, batch_schema.field(col.name).type)} AS {conv}")
        converted.append(f'{conv} AS "{col.name}"')
        raw_json.append(f"{given} := CAST({given} AS VARCHAR)")
        if not col.nullable:
            code = "missing_key" if col.name in keys else "missing_value"
            codes.append(f"CASE WHEN {raw} IS NULL THEN '{code}' END")
            messages.append(f"CASE WHEN {raw} IS NULL THEN 'missing {col.name}' END")
        bad_code = "bad_timestamp" if col.type == "timestamp" else "wrong_type"
        bad = f"({raw} IS NOT NULL AND {conv} IS NULL)"
        shown = f"'{col.name}: ' || to_json(CAST({raw} AS VARCHAR))"
        codes.append(f"CASE WHEN {bad} THEN '{bad_code}' END")
        messages.append(f"CASE WHEN {bad} THEN {shown} || ' is not {_TYPE_WORDS.get(col.type, col.type)}' END")
        for code, when, message in _value_checks(source, col, conv, shown):
            codes.append(f"CASE WHEN {when} THEN '{code}' END")
            messages.append(f"CASE WHEN {when} THEN {message} END")
    if now is None:
        limit, limit_text = "$1", "$2"
    else:
        at = future_limit(source, now).isoformat()
        limit, limit_text = f"TIMESTAMPTZ '{at}'", f"'{at}'"
    ts = f"_as{source.all_columns().index(source.column(source.timestamp))}"
    future = f"(isfinite({ts}) AND {ts} > {limit})"
    codes.append(f"CASE WHEN {future} THEN 'future_timestamp' END")
    messages.append(
        f"CASE WHEN {future} THEN '{source.timestamp}: ' || CAST({ts} AS VARCHAR) || "
        f"' is after the ingest time plus {source.max_future_skew_s}s (' || {limit_text} || ')' END"
    )
    # VARCHAR, not JSON: coalesced with a malformed line's text, JSON would make DuckDB parse that text.
    record = "CAST(to_json(struct_pack(" + ", ".join(raw_json) + ")) AS VARCHAR)"
    if "_raw" in batch_schema.names:
        record = f"coalesce(_raw, {record})"
    reason = f"concat_ws('; ', {', '.join(messages)})"
    if "_malformed" in batch_schema.names:
        # A line that is no object has no fields: every column's "missing" would only repeat that.
        reason = f"CASE WHEN _malformed THEN 'line is not a JSON object' ELSE {reason} END"
    return (
        f"SELECT _row, {', '.join(converted)}, _code, CASE WHEN _code IS NOT NULL THEN {reason} END AS _reason, "
        f"CASE WHEN _code IS NOT NULL THEN {record} END AS _record "
        f"FROM (SELECT *, coalesce({', '.join(codes)}) AS _code FROM (SELECT {', '.join(inner)} FROM {relation}))"
    )


def future_limit(source: EventSource, now: dt.datetime) -> dt.datetime:
    """The latest event time an ingest at ``now`` accepts (``EventSource.max_future_skew_s`` ahead)."""
    return now + dt.timedelta(seconds=source.max_future_skew_s)


def _value_checks(source: EventSource, col: Column, conv: str, shown: str) -> list[tuple[str, str, str]]:
    """(reason code, SQL condition, SQL message) of the checks on a value that has its declared type."""
    checks = []
    if col.type in ("timestamp", "date"):
        # DuckDB reads 'infinity' and '-infinity' as values; no day partition holds them.
        word = "timestamp" if col.type == "timestamp" else "date"
        code = "bad_timestamp" if col.type == "timestamp" else "wrong_type"
        checks.append((code, f"(NOT isfinite({conv}))", f"{shown} || ' is not a finite {word}'"))
    if col.name == source.timestamp:
        earliest = source.earliest.isoformat()
        checks.append(
            (
                "bad_timestamp",
                f"(isfinite({conv}) AND {conv} < TIMESTAMPTZ '{earliest} 00:00:00+00')",
                f"'{col.name}: ' || CAST({conv} AS VARCHAR) || ' is before the source''s earliest date {earliest} "
                "(declare EventSource(earliest=...) if such old events are real)'",
            )
        )
    if col.type == "float64" and not col.allow_non_finite:
        checks.append(
            (
                "non_finite",
                f"(NOT isfinite({conv}))",
                f"{shown} || ' is not a finite number (declare Column(..., allow_non_finite=True) if it may be)'",
            )
        )
    if col.type == "string" and (col.name in source.key_columns or col.name == source.event_id):
        control = f"regexp_extract({conv}, '{_CONTROL_CHARACTERS}')"
        checks.append(
            (
                "control_character",
                f"({control} <> '')",
                f"'{col.name}: ' || to_json({conv}) || ' holds control character ' || printf('U+%04X', unicode({control})) "
                "|| ' (ids and keys must not)'",
            )
        )
    return checks


def _validate_into(
    con: duckdb.DuckDBPyConnection, source: EventSource, batch: pa.Table, file_idx: int, now: dt.datetime
) -> None:
    con.register("batch", batch)
    try:
        con.execute(f"CREATE OR REPLACE TEMP TABLE checked AS {check_query(source, batch.schema, 'batch', now)}")
    finally:
        con.unregister("batch")
    names = ", ".join(f'"{c.name}"' for c in source.all_columns())
    con.execute(f"INSERT INTO good SELECT {file_idx}, _row, {names} FROM checked WHERE _code IS NULL")
    con.execute(
        f"INSERT INTO bad SELECT {file_idx}, _row, _code, _reason, _record FROM checked WHERE _code IS NOT NULL"
    )


def _quarantine_duplicates(con: duckdb.DuckDBPyConnection, source: EventSource) -> None:
    eid = f'"{source.event_id}"'
    names = ", ".join(f'"{c.name}"' for c in source.all_columns())
    raw_json = ", ".join(f'"{c.name}" := CAST("{c.name}" AS VARCHAR)' for c in source.all_columns())
    con.execute(
        "CREATE OR REPLACE TEMP TABLE ranked AS SELECT *, "
        f"row_number() OVER (PARTITION BY {eid} ORDER BY _file, _row) AS _n, "
        f"first_value(_file) OVER (PARTITION BY {eid} ORDER BY _file, _row) AS _f0, "
        f"first_value(_row) OVER (PARTITION BY {eid} ORDER BY _file, _row) AS _r0 FROM good"
    )
    con.execute(
        "INSERT INTO bad SELECT r._file, r._row, 'duplicate_event_id', "
        f"'duplicate {source.event_id} ' || to_json(r.{eid}) || ' (first at ' || f.name || ' row ' || r._r0 || ')', "
        f"to_json(struct_pack({raw_json})) FROM ranked r JOIN files f ON f.idx = r._f0 WHERE r._n > 1"
    )
    con.execute(f"CREATE OR REPLACE TABLE good AS SELECT _file, _row, {names} FROM ranked WHERE _n = 1")


def _drop_outside(con: duckdb.DuckDBPyConnection, source: EventSource, window: tuple[dt.date, dt.date]) -> int:
    day = f'CAST("{source.timestamp}" AS DATE)'
    bounds = f"DATE '{window[0].isoformat()}' AND DATE '{window[1].isoformat()}'"
    outside = con.execute(f"SELECT count(*) FROM good WHERE {day} NOT BETWEEN {bounds}").fetchone()[0]
    if outside:
        con.execute(f"DELETE FROM good WHERE {day} NOT BETWEEN {bounds}")
    return outside
