"""Validating event files against their source, into an on-disk DuckDB staging database.

Files are read in bounded batches (``keel.readers``) and each batch is checked in one
vectorised DuckDB statement: rows with missing keys, values of the wrong type, unparsable
or far-future timestamps, malformed records, or an event id seen earlier in the same ingest
get a reason code and a message and wait as quarantine rows; the rest wait, typed, as good
rows. The staging database lives on disk, so a file larger than memory spills instead of
failing. ``keel.ingest`` lands the good rows through write-audit-publish.
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa

from keel.dsl import DUCKDB_TYPES, Column, EventSource
from keel.readers import read_batches

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

    def close(self) -> None:
        self.con.close()
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
) -> Prepared:
    """Read and validate ``paths``; good rows and quarantined rows wait in a staging database.

    ``window`` (first day, last day), when given, keeps only events of those days: the rest
    are counted as outside the window, neither landed nor quarantined. The staging database
    lives in a folder under ``staging_root`` (the system's temporary folder when None).
    """
    if not paths:
        raise IngestError(f"source {source.name!r}: no files given to ingest")
    now = now or dt.datetime.now(dt.UTC)
    if staging_root is not None:
        Path(staging_root).mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"keel-ingest-{source.name}-", dir=staging_root))
    con = duckdb.connect(str(workdir / "staging.duckdb"))
    con.execute("SET TimeZone = 'UTC'")
    con.execute(f"SET temp_directory = '{workdir / 'spill'}'")
    prepared = Prepared(source, [str(Path(p).resolve()) for p in paths], con, workdir, window)
    try:
        _create_staging(con, source, prepared.files)
        names = [c.name for c in source.all_columns()]
        for idx, path in enumerate(prepared.files):
            for batch in read_batches(Path(path), names):
                prepared.rows_read += batch.num_rows
                _validate_into(con, source, batch, idx, now)
        if source.event_id:
            _quarantine_duplicates(con, source)
        if window is not None:
            prepared.rows_outside_window = _drop_outside(con, source, window)
        prepared.quarantined = dict(
            con.execute("SELECT reason_code, count(*) FROM bad GROUP BY 1 ORDER BY 1").fetchall()
        )
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


def check_select(source: EventSource, batch_schema: pa.Schema, now: dt.datetime) -> str:
    """The select list that types a batch's columns and gives each row ``_code``, ``_reason`` and ``_record``.

    ``_code`` is NULL for a good row; otherwise the first reason code that applies, with every
    problem in ``_reason`` and the row as JSON text in ``_record``. ``_row`` passes through.
    """
    keys = set(source.key_columns) | {source.timestamp} | ({source.event_id} if source.event_id else set())
    converted, codes, messages, raw_json = [], [], [], []
    if "_malformed" in batch_schema.names:
        codes.append("CASE WHEN _malformed THEN 'malformed_record' END")
    for col in source.all_columns():
        raw = f'"{col.name}"'
        if col.name in keys and col.type == "string":
            raw = f"NULLIF(trim({raw}), '')"
        conv = _convert(col, raw, batch_schema.field(col.name).type)
        converted.append(f'{conv} AS "{col.name}"')
        raw_json.append(f'"{col.name}" := CAST("{col.name}" AS VARCHAR)')
        if not col.nullable:
            code = "missing_key" if col.name in keys else "missing_value"
            codes.append(f"CASE WHEN {raw} IS NULL THEN '{code}' END")
            messages.append(f"CASE WHEN {raw} IS NULL THEN 'missing {col.name}' END")
        bad_code = "bad_timestamp" if col.type == "timestamp" else "wrong_type"
        bad = f"({raw} IS NOT NULL AND {conv} IS NULL)"
        codes.append(f"CASE WHEN {bad} THEN '{bad_code}' END")
        messages.append(
            f"CASE WHEN {bad} THEN '{col.name}: ' || to_json(CAST({raw} AS VARCHAR)) || ' is not {_TYPE_WORDS.get(col.type, col.type)}' END"
        )
    limit = now + dt.timedelta(seconds=source.max_future_skew_s)
    ts = _convert(source.column(source.timestamp), f'"{source.timestamp}"', batch_schema.field(source.timestamp).type)
    future = f"({ts} > TIMESTAMPTZ '{limit.isoformat()}')"
    codes.append(f"CASE WHEN {future} THEN 'future_timestamp' END")
    messages.append(
        f"CASE WHEN {future} THEN '{source.timestamp}: ' || CAST({ts} AS VARCHAR) || "
        f"' is after the ingest time plus {source.max_future_skew_s}s ({limit.isoformat()})' END"
    )
    # VARCHAR, not JSON: coalesced with a malformed line's text, JSON would make DuckDB parse that text.
    record = "CAST(to_json(struct_pack(" + ", ".join(raw_json) + ")) AS VARCHAR)"
    reason = f"concat_ws('; ', {', '.join(messages)})"
    if "_malformed" in batch_schema.names:
        # A line that is no object has no fields: every column's "missing" would only repeat that.
        reason = f"CASE WHEN _malformed THEN 'line is not a JSON object' ELSE {reason} END"
    return (
        "_row, "
        + ", ".join(converted)
        + f", coalesce({', '.join(codes)}) AS _code, {reason} AS _reason, "
        + (f"coalesce(_raw, {record})" if "_raw" in batch_schema.names else record)
        + " AS _record"
    )


def _validate_into(
    con: duckdb.DuckDBPyConnection, source: EventSource, batch: pa.Table, file_idx: int, now: dt.datetime
) -> None:
    select = check_select(source, batch.schema, now)
    con.register("batch", batch)
    try:
        con.execute(f"CREATE OR REPLACE TEMP TABLE checked AS SELECT {select} FROM batch")
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
