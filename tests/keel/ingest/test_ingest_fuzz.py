"""`keel ingest` fed random bytes and cut-off files: it lands exactly the good rows or refuses the
file in one line, exit code 0 or 1, and no exception escapes."""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import io
import json
import zlib
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel.cli.main import main
from keel.ingest.batch import QUARANTINE_TABLE
from keel.lakehouse.tables import Lakehouse
from tests.factories.ingest import COLUMNS, text
from tests.factories.payments import payment_rows

TABLE = "raw.payments"
DAY = dt.date(2026, 1, 5)
ROWS = 8


@dataclass(frozen=True)
class Abused:
    """A file to ingest: its name and bytes, and the valid file it was made from (None: random bytes)."""

    name: str
    data: bytes
    fmt: str
    packed: bool
    rows: tuple[dict, ...] | None


def valid_file(fmt: str, rows: list[dict]) -> bytes:
    if fmt == "csv":
        out = io.StringIO(newline="")
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows([text(r[c]) for c in COLUMNS] for r in rows)
        return out.getvalue().encode()
    if fmt == "jsonl":
        return "".join(json.dumps({c: text(r[c]) for c in COLUMNS}) + "\n" for r in rows).encode()
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue()


@st.composite
def abused_files(draw) -> Abused:
    fmt = draw(st.sampled_from(["csv", "jsonl", "parquet"]))
    # Gzip'd Parquet is refused by its name alone, before a byte is read.
    packed = fmt != "parquet" and draw(st.booleans())
    name = f"events.{fmt}" + (".gz" if packed else "")
    if draw(st.integers(0, 3)) == 0:
        return Abused(name, draw(st.binary(max_size=400)), fmt, packed, None)
    rows = payment_rows(DAY, ROWS)
    whole = valid_file(fmt, rows)
    if packed:
        whole = gzip.compress(whole, mtime=0)
    cut = draw(st.one_of(st.just(len(whole)), st.integers(0, len(whole))))
    return Abused(name, whole[:cut], fmt, packed, tuple(rows))


def plain_prefix(abused: Abused) -> bytes:
    """The uncompressed bytes a reader could get out of the file."""
    if not abused.packed:
        return abused.data
    try:
        return zlib.decompressobj(wbits=31).decompress(abused.data)
    except zlib.error:
        return b""


def complete_rows(abused: Abused) -> tuple[set[str], bool]:
    """Event ids of the rows wholly in the file, and whether a cut-off row follows them."""
    rows = abused.rows
    full = valid_file(abused.fmt, list(rows))
    got = plain_prefix(abused)
    if abused.fmt == "parquet" or got == full:
        return ({r["event_id"] for r in rows} if got == full else set()), False
    lines = got.split(b"\n")
    first = 1 if abused.fmt == "csv" else 0
    whole_lines = max(len(lines) - 1 - first, 0)
    return {r["event_id"] for r in rows[:whole_lines]}, bool(lines[-1])


@pytest.fixture
def home(keel_home, monkeypatch):
    monkeypatch.setenv("KEEL_PROJECT", "tests.keel.cli.feature_project")
    return keel_home


@given(abused=abused_files())
@settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_keel_ingest_lands_exactly_the_good_rows_or_refuses_the_file(home, capsys, tmp_path, abused):
    path = tmp_path / abused.name
    path.write_bytes(abused.data)
    lake = Lakehouse.from_env()
    # Each example starts from empty tables in the same catalog (a new catalog per example costs more).
    for table in (TABLE, QUARANTINE_TABLE):
        if lake.exists(table):
            lake.catalog.drop_table(table)

    code = main(["ingest", str(path), "--source", "payments"])

    out, err = capsys.readouterr()
    assert code in (0, 1)
    assert "Traceback" not in out + err
    landed = {r["event_id"]: r for r in lake.read(TABLE).to_pylist()} if lake.exists(TABLE) else {}
    if not out:
        # Refused before any row was judged: one line naming the file.
        assert code == 1 and not landed
        assert err.startswith(f"keel ingest: {path}: ") and err.count("\n") == 1, err
        assert "; nothing was published" in err
        return
    # "source payments: 1 file(s), R rows read, V valid, Q quarantined"
    read, valid, bad = (int(part.split()[0]) for part in out.splitlines()[0].split(", ")[1:4])
    assert read == valid + bad
    if code == 1:
        assert "NOT published" in out.splitlines()[-1] and not landed
        return
    assert "published: main" in out.splitlines()[-1] and len(landed) == valid
    assert abused.rows is not None, "random bytes landed"
    if abused.packed:
        # A gzip stream cut short is refused, never landed in part.
        assert plain_prefix(abused) == valid_file(abused.fmt, list(abused.rows))
    whole, cut_row = complete_rows(abused)
    original = {r["event_id"]: r for r in abused.rows}
    # Every whole row landed as it was written; the only other row can be the one cut short.
    assert whole <= set(landed) and len(set(landed) - whole) <= int(cut_row)
    for event_id in whole:
        assert {c: landed[event_id][c] for c in COLUMNS} == original[event_id]
