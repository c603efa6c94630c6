"""Write-audit-publish audit speed: ``keel.lakehouse.audit.audit_events`` on a day batch of transactions.

Floor, measured in the same run on the same table: the same checks straight on Arrow (null
counts, min/max, set membership, distinct event ids, rows per day), what the audit cannot get
below. Ours: ``audit_events`` (Great Expectations' suite over the batch), on a clean table and
on a failing one (every user_id NULL, every other amount out of range, each failure listing its
first rows).

Measured 4-6x the floor for the clean audit; 50x+ would mean a slow pandas path again (e.g.
ArrowDtype frames in GX's fingerprint). The failing audit measured ~1.5x the clean one; GX
reading the rows by named index columns (a Python loop per bad row) measured 40x.

    .venv/bin/python bench/audit.py [--rows 300000]
"""

import argparse
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from keel.lakehouse.audit import audit_events
from pipelines.sources import COUNTRIES, CURRENCIES, MERCHANT_CATEGORIES, transactions

DAYS = 3


def transactions_table(n: int) -> pa.Table:
    """``n`` valid transactions over ``DAYS`` days."""
    rng = np.random.default_rng(0)
    start = np.datetime64("2026-01-05T00:00:00", "us").astype(np.int64)

    def choose(values: tuple[str, ...]) -> pa.Array:
        return pa.array(np.asarray(values)[rng.integers(0, len(values), n)])

    return pa.table(
        {
            "event_id": pa.array(np.char.add("e", np.arange(n).astype(str))),
            "user_id": pa.array(np.char.add("u", rng.integers(0, 50_000, n).astype(str))),
            "event_ts": pa.array(np.sort(start + rng.integers(0, DAYS * 86_400_000_000, n)), pa.timestamp("us", "UTC")),
            "amount": rng.uniform(0, 1_000, n),
            "currency": choose(CURRENCIES),
            "country": choose(COUNTRIES),
            "merchant_category": choose(MERCHANT_CATEGORIES),
            "is_refund": rng.random(n) < 0.02,
        },
        schema=transactions.arrow_schema(),
    )


def floor(table: pa.Table) -> None:
    """The same checks straight on Arrow: what the audit cannot get below."""
    [table.column(c).null_count for c in table.column_names]
    pc.min_max(table["amount"])
    for name in ("currency", "country", "merchant_category"):
        pc.all(pc.is_in(table[name], pa.array(transactions.column(name).allowed)))
    pc.count_distinct(table["event_id"])
    pc.cast(pc.cast(table["event_ts"], pa.timestamp("us")), pa.date32()).value_counts()


def best_of(fn, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000)
    args = parser.parse_args()
    n = args.rows
    table = transactions_table(n)
    recent = [n // DAYS] * 7  # a week of days like these

    audit_events(table[:10], transactions)  # GX import and suite build are one-off costs
    audit_s = best_of(lambda: audit_events(table, transactions, recent_partition_rows=recent))
    floor_s = best_of(lambda: floor(table))
    assert audit_events(table, transactions, recent_partition_rows=recent).success

    amounts = table["amount"].to_numpy().copy()
    amounts[::2] = -1.0
    broken = table.set_column(1, "user_id", pa.nulls(n, pa.string())).set_column(3, "amount", pa.array(amounts))
    failing_s = best_of(lambda: audit_events(broken, transactions, recent_partition_rows=recent))
    report = audit_events(broken, transactions, recent_partition_rows=recent)
    assert [len(o.examples) for o in report.failures] == [20, 20]

    print(f"audit of {n:,} rows x {table.num_columns} columns")
    print(f"{'step':<40}{'seconds':>9}{'rows/s':>14}{'x floor':>10}")
    for name, seconds in (
        ("floor: the same checks on Arrow", floor_s),
        ("keel audit, clean", audit_s),
        (f"keel audit, failing ({n + n // 2:,} bad values)", failing_s),
    ):
        print(f"{name:<40}{seconds:>9.3f}{n / seconds:>14,.0f}{seconds / floor_s:>10.1f}")
    print(f"failing / clean: {failing_s / audit_s:.1f}x")


if __name__ == "__main__":
    main()
