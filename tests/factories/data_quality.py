"""One table's days of clean events, history before a day and defects planted in it, for the
data-quality checks."""

import datetime as dt

import numpy as np
import pyarrow as pa

from keel.monitoring.data_quality import QualityTarget

TABLE = "raw.events"
DAY = dt.date(2026, 5, 13)  # a Wednesday
SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("event_ts", pa.timestamp("us", tz="UTC")),
        ("session_id", pa.string()),
        ("amount", pa.float64()),
        ("items", pa.int64()),
        ("currency", pa.string()),
        ("channel", pa.string()),
    ]
)
TARGET = QualityTarget(TABLE, "event_ts", keys=("user_id",))
CURRENCIES = np.array(["EUR", "USD", "GBP"])
CHANNELS = np.array(["web", "app"])


def events(day: dt.date, n: int, seed: int = 0) -> pa.Table:
    """``n`` clean events at random times of ``day``: amounts in [10, 100], 1-5 items, three currencies."""
    rng = np.random.default_rng([seed, day.toordinal()])
    start = np.datetime64(day.isoformat(), "us")
    seconds = np.sort(rng.integers(0, 86_400, n))
    return pa.table(
        {
            "user_id": np.char.add("u", rng.integers(0, 50, n).astype(str)),
            "event_ts": pa.array(start + seconds * 1_000_000, pa.timestamp("us", tz="UTC")),
            "session_id": np.char.add(f"{day.isoformat()}-", np.arange(n).astype(str)),
            "amount": rng.uniform(10, 100, n).round(2),
            "items": rng.integers(1, 6, n),
            "currency": CURRENCIES[rng.integers(0, 3, n)],
            "channel": CHANNELS[rng.integers(0, 2, n)],
        },
        schema=SCHEMA,
    )


def history(before: dt.date, days: int, n: int) -> list[pa.Table]:
    """``n`` clean events a day on each of the ``days`` days before ``before``."""
    return [events(before - dt.timedelta(days=i), n) for i in range(days, 0, -1)]


def planted(part: pa.Table, column: str, rows, value) -> pa.Table:
    """``part`` with ``column`` set to ``value`` (None for NULL) at the positions ``rows``."""
    values = part.column(column).to_pylist()
    for i in rows:
        values[i] = value
    index = part.schema.get_field_index(column)
    return part.set_column(index, part.schema.field(column), pa.array(values, part.schema.field(column).type))


def write(lake, *parts: pa.Table) -> None:
    lake.ensure_table(TABLE, SCHEMA, day_column="event_ts").append(pa.concat_tables(parts))
