"""The spend feature groups over payments, landed payment history and the training spine of the
feature store tests: events whose point-in-time values the tests work out by hand."""

import dataclasses
import datetime as dt

import pyarrow as pa

from keel.dsl import Derived, Feature, FeatureGroup
from keel.lakehouse import wap
from tests.factories.payments import as_table

START = dt.date(2026, 3, 1)
UTC = dt.UTC


def at(day: int, hour: int = 0, minute: int = 0) -> dt.datetime:
    return dt.datetime.combine(START + dt.timedelta(days=day), dt.time(hour, minute), UTC)


def event(eid: str, user: str, ts: dt.datetime, amount: float, refund: bool = False) -> dict:
    return {
        "event_id": eid,
        "user_id": user,
        "event_ts": ts,
        "amount": amount,
        "currency": "EUR",
        "items": 1,
        "is_refund": refund,
    }


def groups_for(payments, version: int = 1, window: str = "7d") -> tuple[FeatureGroup, FeatureGroup]:
    spend = FeatureGroup(
        name="spend",
        entity=payments.entity,
        source=payments,
        ttl="30d",
        version=version,
        features=(
            Feature("n_7d", "count", window=window),
            Feature("amount_7d", "sum", "amount", window=window, where="NOT is_refund"),
            Feature("last_amount", "last", "amount", window="30d"),
            Derived("avg_7d", "amount_7d / nullif(n_7d, 0)"),
        ),
    )
    ratio = FeatureGroup(
        name="spend_ratio",
        entity=payments.entity,
        upstream=(spend,),
        features=(Derived("big_spender", "spend.amount_7d > 100", type="bool"),),
    )
    return spend, ratio


def online_groups(payments, ttl: str = "30d") -> tuple[FeatureGroup, FeatureGroup]:
    spend, ratio = groups_for(payments)
    spend = dataclasses.replace(spend, online=True, ttl=ttl)
    return spend, dataclasses.replace(ratio, upstream=(spend,), online=True)


def land(lake, payments, rows: list[dict], run_id: str) -> int:
    lake.ensure_table(payments.table_name, payments.arrow_schema(), day_column="event_ts")
    staged = wap.stage(
        lake,
        payments.table_name,
        [as_table(payments, rows)],
        run_id=run_id,
        source="payments",
        day_column="event_ts",
        mode="merge",
        key="event_id",
    )
    return wap.publish(lake, staged)


HISTORY = [
    event("a1", "alice", at(0, 9), 50.0),
    event("a2", "alice", at(2, 12), 70.0),
    event("a3", "alice", at(2, 12), 5.0, refund=True),  # same instant as a2
    event("a4", "alice", at(9, 8), 20.0),
    event("b1", "bob", at(1, 10), 300.0),
    event("b2", "bob", at(8, 10), 10.0),  # exactly 7 days after b1
]


def spine(rows: list[tuple[str, dt.datetime, int]]) -> pa.Table:
    return pa.table(
        {
            "user_id": [r[0] for r in rows],
            "event_ts": pa.array([r[1] for r in rows], pa.timestamp("us", tz="UTC")),
            "label": [r[2] for r in rows],
        }
    )


SPINE = spine(
    [
        ("alice", at(2, 12), 1),  # sees a1, a2 and the refund a3 at the same instant
        ("bob", at(8, 10), 0),  # b1 is exactly 7 days earlier: outside (t - 7d, t]
        ("alice", at(1), 0),
        ("carol", at(3), 1),  # no history
        ("alice", at(45), 0),  # latest event 36 days earlier: past the 30d TTL
        ("bob", at(1, 9, 59), 1),  # one minute before bob's first event
    ]
)
