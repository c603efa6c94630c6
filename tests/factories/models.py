"""The churn model of the training tests: its spec over the spend groups, and synthetic payments
and weekly labels with a planted signal, landed through write-audit-publish."""

import datetime as dt

import numpy as np
import pyarrow as pa

from keel.lakehouse import wap
from keel.models.spec import ModelSpec, Split

START = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
WEEKS = 8
USERS = 150


def spec(buyer, outcomes, **overrides) -> ModelSpec:
    fields = {
        "name": "churn",
        "entity": buyer,
        "features": ("spend", "spend_ratio.big_spender"),
        "labels": outcomes,
        "label": "churned",
        "params": {"n_estimators": 30, "max_depth": 3, "n_jobs": 1},
        "split": Split("14d"),
        "min_improvement": 0.01,
    }
    return ModelSpec(**{**fields, **overrides})


def synthetic(seed: int, *, weeks: int = WEEKS, users: int = USERS, shuffle: bool = False, prefix: str = ""):
    """Payments and weekly labels where users about to churn paid little in the week before the label."""
    rng = np.random.default_rng(seed)
    payments, labels = [], []
    for week in range(1, weeks + 1):
        t = START + dt.timedelta(weeks=week)
        churned = rng.random(users) < 0.4
        counts = rng.poisson(np.where(churned, 0.4, 3.0))
        for u in range(users):
            n = counts[u]
            for i in range(n):
                ts = t - dt.timedelta(minutes=int(rng.integers(1, 7 * 24 * 60 - 1)))
                payments.append(
                    {
                        "event_id": f"{prefix}p-{week}-{u}-{i}",
                        "user_id": f"u{u}",
                        "event_ts": ts,
                        "amount": float(rng.gamma(2.0, 15.0)),
                        "currency": "EUR",
                        "items": 1,
                        "is_refund": False,
                    }
                )
        flags = rng.permutation(churned) if shuffle else churned
        labels += [
            {
                "event_id": f"{prefix}l-{week}-{u}",
                "user_id": f"u{u}",
                "event_ts": t,
                "churned": bool(flags[u]),
                "spend_next": float(20 * counts[u] + rng.normal(0, 5)),
            }
            for u in range(users)
        ]
    return payments, labels


def land_labels(lake, outcomes, rows, run_id):
    lake.ensure_table(outcomes.table_name, outcomes.arrow_schema(), day_column="event_ts")
    data = pa.Table.from_pylist(rows, schema=outcomes.arrow_schema())
    staged = wap.stage(
        lake,
        outcomes.table_name,
        [data],
        run_id=run_id,
        source="outcomes",
        day_column="event_ts",
        mode="merge",
        key="event_id",
    )
    return wap.publish(lake, staged)
