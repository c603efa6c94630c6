"""Event files for the ingest tests (CSV, JSON lines, Parquet) and what an ingest left in main
and in the quarantine table."""

from __future__ import annotations

import csv
import datetime as dt
import json
from pathlib import Path

import pyarrow as pa

from keel.ingest.batch import QUARANTINE_TABLE

TABLE = "raw.payments"
DAY = dt.date(2026, 1, 5)
NOW = dt.datetime(2026, 1, 10, tzinfo=dt.UTC)
COLUMNS = ["event_id", "user_id", "event_ts", "amount", "currency", "items", "is_refund"]


# files


def text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return str(value)


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: text(row.get(k)) for k in COLUMNS} for row in rows)
    return path


def write_jsonl(path: Path, lines: list[dict | str]) -> Path:
    def encode(line):
        if isinstance(line, str):
            return line
        return json.dumps({k: v.isoformat() if isinstance(v, dt.datetime) else v for k, v in line.items()})

    path.write_text("".join(encode(line) + "\n" for line in lines))
    return path


# reading back


def main_ids(lake) -> list[str]:
    return sorted(lake.read(TABLE, columns=["event_id"])["event_id"].to_pylist())


def quarantined(lake, path: Path | None = None) -> list[tuple[int, str]]:
    rows = lake.read(QUARANTINE_TABLE).to_pylist()
    return sorted((r["row_number"], r["reason_code"]) for r in rows if path is None or r["file"] == str(path.resolve()))


def quarantine_by_row(lake, path: Path) -> dict[int, dict]:
    return {r["row_number"]: r for r in lake.read(QUARANTINE_TABLE).to_pylist() if r["file"] == str(path.resolve())}


def nullable(schema: pa.Schema) -> pa.Schema:
    return pa.schema([f.with_nullable(True) for f in schema])
