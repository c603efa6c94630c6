"""The payments source of the unit tests: its declaration, valid rows and their Arrow table."""

import datetime as dt

import pyarrow as pa

from keel.dsl import Column, Entity, EventSource


def payments_source(buyer: Entity) -> EventSource:
    """A small source with every column type and constraint the validator knows."""
    return EventSource(
        name="payments",
        entity=buyer,
        columns=(
            Column("amount", "float64", nullable=False, min=0, max=10_000),
            Column("currency", "string", nullable=False, allowed=("EUR", "USD")),
            Column("items", "int64", min=1, max=100),
            Column("is_refund", "bool", nullable=False),
        ),
    )


def payment_rows(day: dt.date, n: int, *, prefix: str = "p", amount: float = 10.0) -> list[dict]:
    """``n`` valid payment rows spread over ``day``, event ids ``{prefix}-{day}-{i}``."""
    base = dt.datetime.combine(day, dt.time(), dt.UTC)
    return [
        {
            "event_id": f"{prefix}-{day.isoformat()}-{i}",
            "user_id": f"u{i % 7}",
            "event_ts": base + dt.timedelta(minutes=7 * i % 1440),
            "amount": amount + i,
            "currency": "EUR" if i % 2 else "USD",
            "items": 1 + i % 5,
            "is_refund": i % 11 == 0,
        }
        for i in range(n)
    ]


def as_table(payments: EventSource, rows: list[dict]) -> pa.Table:
    """Rows as an Arrow table with the source's schema."""
    return pa.Table.from_pylist(rows, schema=payments.arrow_schema())
