"""Valid transactions of the demo's transactions source, for the write-audit-publish audit tests."""

from datetime import UTC, datetime, timedelta

DAY = datetime(2026, 1, 5, tzinfo=UTC)


def txn_rows(n: int, day: datetime = DAY, prefix: str = "e") -> list[dict]:
    """`n` valid transactions spread over one UTC day."""
    return [
        {
            "event_id": f"{prefix}{i}",
            "user_id": f"u{i % 7}",
            "event_ts": day + timedelta(seconds=i * 86_399 // max(n, 1)),
            "amount": 12.5 * (i + 1),
            "currency": ("USD", "EUR", "GBP")[i % 3],
            "country": ("US", "DE", "GB", "FR")[i % 4],
            "merchant_category": ("grocery", "books")[i % 2],
            "is_refund": i % 5 == 0,
        }
        for i in range(n)
    ]
