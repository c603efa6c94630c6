"""Point-in-time join speed: ``keel.features.point_in_time.point_in_time`` against a bare DuckDB ASOF join.

Data, all in memory as Arrow: ``--entities`` users whose activity follows a power law (the
busiest few hold percents of all events), ``--events`` card transactions over ``--days``
days at millisecond resolution, arriving out of time order, and a spine of ``--spine``
(user, time) rows drawn half by activity and half uniformly over users, at random times.

Floor, measured in the same run on the same tables: ``spine ASOF LEFT JOIN events`` on the
user and ``t >= event_ts``, taking one value column. Ours: the feature groups below. Both
are materialised to Arrow; each figure is the best of ``--repeat`` runs.

- ``asof_friendly``: counts over 7 and 30 days, a filtered count, a filtered sum over 7
  days, an average over 30 days, the last amount and a derived ratio: every aggregation a
  difference of prefix sums or a lookup, like the ASOF join itself.
- ``user_transactions``: the demo's real group (``pipelines.features``), which adds a
  30-day max, stddev and count_distinct over the same source, and a 30-day TTL.

    .venv/bin/python bench/pit_join.py [--events 10000000] [--entities 100000] [--spine 1000000]
"""

import argparse
import datetime as dt
import resource
import time

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from keel.dsl import Derived, Feature, FeatureGroup
from keel.features.point_in_time import point_in_time
from pipelines.entities import user
from pipelines.features import user_transactions
from pipelines.sources import COUNTRIES, CURRENCIES, MERCHANT_CATEGORIES, transactions

START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
MS_PER_DAY = 86_400_000

asof_friendly = FeatureGroup(
    name="asof_friendly",
    entity=user,
    source=transactions,
    features=(
        Feature("txn_count_7d", "count", window="7d"),
        Feature("txn_count_30d", "count", window="30d"),
        Feature("refund_count_30d", "count", window="30d", where="is_refund"),
        Feature("amount_sum_7d", "sum", "amount", window="7d", where="NOT is_refund"),
        Feature("amount_avg_30d", "avg", "amount", window="30d"),
        Feature("last_amount", "last", "amount", window="30d"),
        Derived("txn_trend", "txn_count_7d / nullif(txn_count_30d / 4.0, 0)"),
    ),
)


def make_data(n_events: int, n_entities: int, n_spine: int, days: int, seed: int = 7) -> tuple[pa.Table, pa.Table]:
    rng = np.random.default_rng(seed)
    weight = rng.permutation(1.0 / np.arange(1, n_entities + 1) ** 0.9)
    weight /= weight.sum()
    users = pc.binary_join_element_wise("u", pa.array(np.arange(n_entities)).cast(pa.string()), "")
    who = rng.choice(n_entities, size=n_events, p=weight)
    when = START.timestamp() * 1000 + rng.integers(0, days * MS_PER_DAY, n_events)
    events = pa.table(
        {
            "event_id": pc.binary_join_element_wise("t-", pa.array(np.arange(n_events)).cast(pa.string()), ""),
            "user_id": users.take(pa.array(who)),
            "event_ts": pa.array(when.astype(np.int64) * 1000, pa.timestamp("us", tz="UTC")),
            "amount": np.round(np.exp(rng.normal(3.8, 1.0, n_events)), 2),
            "currency": pa.array(CURRENCIES).take(pa.array(rng.integers(0, len(CURRENCIES), n_events))),
            "country": pa.array(COUNTRIES).take(pa.array(rng.integers(0, len(COUNTRIES), n_events))),
            "merchant_category": pa.array(MERCHANT_CATEGORIES).take(
                pa.array(rng.integers(0, len(MERCHANT_CATEGORIES), n_events))
            ),
            "is_refund": rng.random(n_events) < 0.02,
        },
        schema=transactions.arrow_schema(),
    )
    by_activity = rng.random(n_spine) < 0.5
    spine_who = np.where(
        by_activity, rng.choice(n_entities, size=n_spine, p=weight), rng.integers(0, n_entities, n_spine)
    )
    spine_when = int(START.timestamp() * 1_000_000) + rng.integers(0, (days + 7) * MS_PER_DAY * 1000, n_spine)
    spine = pa.table(
        {
            "user_id": users.take(pa.array(spine_who)),
            "_t": pa.array(spine_when, pa.timestamp("us", tz="UTC")),
            "_probe": pa.array(np.arange(n_spine), pa.int64()),
        }
    )
    return events, spine


def best_of(repeat: int, runs: dict, rows: int) -> dict[str, float]:
    """Each run's best time over ``repeat`` rounds, the runs interleaved so a slow spell hits them all."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeat):
        for name, run in runs.items():
            t0 = time.perf_counter()
            table = run()
            best[name] = min(best[name], time.perf_counter() - t0)
            assert table.num_rows == rows, f"{name}: {table.num_rows} rows for {rows} spine rows"
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--entities", type=int, default=100_000)
    parser.add_argument("--spine", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=180)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    t0 = time.perf_counter()
    events, spine = make_data(args.events, args.entities, args.spine, args.days)
    print(
        f"data: {events.num_rows:,} events, {args.entities:,} users, {spine.num_rows:,} spine rows "
        f"({time.perf_counter() - t0:.1f}s to generate)"
    )
    con = duckdb.connect()
    con.register("events", events)
    con.register("spine", spine)

    groups = (asof_friendly, user_transactions)
    runs = {
        "floor": lambda: con.sql(
            "SELECT s._probe, e.amount FROM spine s ASOF LEFT JOIN events e "
            "ON s.user_id = e.user_id AND s._t >= e.event_ts"
        ).to_arrow_table()
    }
    for group in groups:
        runs[group.name] = lambda g=group: point_in_time(con, g, {"transactions": "events"}, "spine").to_arrow_table()
    best = best_of(args.repeat, runs, spine.num_rows)
    floor = best["floor"]
    print(f"floor  bare ASOF LEFT JOIN, one value column: {floor:7.2f}s")
    for group in groups:
        ours = best[group.name]
        print(
            f"ours   {group.name:<18} ({len(group.features):2d} features):     {ours:7.2f}s   ratio {ours / floor:4.2f}x"
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"peak memory: {peak:.1f} GB")


if __name__ == "__main__":
    main()
