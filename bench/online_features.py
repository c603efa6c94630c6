"""The online features the serving benchmarks read (bench/serving.py, bench/online_read.py):
two groups of ten features of one user entity, their project, plausible values for ``n``
users, and writing those values to an online store.

Run as scripts, the benchmarks import this module from their own folder.
"""

import datetime as dt

import numpy as np
import pyarrow as pa

from keel.dsl import Column, Derived, Entity, EventSource, Feature, FeatureGroup
from keel.project import Project

user = Entity(name="user", join_keys={"user_id": "string"})
events = EventSource(
    name="events",
    entity=user,
    columns=(Column("amount", "float64"), Column("page", "string"), Column("items", "int64")),
)
PREFIXES = {"activity": "a_", "purchases": "p_"}
PAGES = ["home", "search", "product", "cart", "checkout"]


def group(name: str, *, typed: bool = False) -> FeatureGroup:
    """Ten features of ``user`` over ``events``, named with the group's prefix: counts, sums, an
    average and extremes of the amount, and a derived rate. All numeric (what a model scores),
    or ``typed``: the last page (a string) and the last event time (a timestamp) in place of
    the amount's minimum and deviation."""
    p = PREFIXES[name]
    if typed:
        two = (
            Feature(p + "last_page", "last", "page", window="7d"),
            Feature(p + "last_seen", "last", "event_ts", window="7d"),
        )
    else:
        two = (
            Feature(p + "amount_min_7d", "min", "amount", window="7d"),
            Feature(p + "amount_std_7d", "stddev", "amount", window="7d"),
        )
    return FeatureGroup(
        name=name,
        entity=user,
        source=events,
        ttl="30d",
        online=True,
        features=(
            Feature(p + "n_1h", "count", window="1h"),
            Feature(p + "n_24h", "count", window="24h"),
            Feature(p + "n_7d", "count", window="7d"),
            Feature(p + "amount_sum_24h", "sum", "amount", window="24h"),
            Feature(p + "amount_avg_7d", "avg", "amount", window="7d"),
            Feature(p + "amount_max_7d", "max", "amount", window="7d"),
            *two,
            Feature(p + "items_sum_7d", "sum", "items", window="7d"),
            Derived(p + "rate_24h", f"{p}n_24h / 24.0"),
        ),
    )


def online_project(*, typed: bool = False) -> Project:
    """The two groups, ``activity`` and ``purchases``, in a project of their own."""
    groups = tuple(group(name, typed=typed) for name in PREFIXES)
    return Project(name="bench", sources=(events,), start_date=dt.date(2026, 1, 1), feature_groups=groups)


def entity_ids(n: int) -> list[str]:
    return [f"u{i:06d}" for i in range(n)]


def feature_columns(rng: np.random.Generator, n: int, groups) -> dict[str, np.ndarray | list]:
    """The values of the groups' features for ``n`` entities, plausible for their names."""
    now = dt.datetime.now(dt.UTC)
    out = {}
    for p in (PREFIXES[g.name] for g in groups):
        n_24h = rng.integers(0, 50, n)
        out |= {
            p + "n_1h": rng.integers(0, 5, n),
            p + "n_24h": n_24h,
            p + "n_7d": n_24h + rng.integers(0, 250, n),
            p + "amount_sum_24h": rng.gamma(2.0, 40.0, n),
            p + "amount_avg_7d": rng.gamma(2.0, 20.0, n),
            p + "amount_max_7d": rng.gamma(3.0, 40.0, n),
            p + "amount_min_7d": rng.gamma(1.0, 5.0, n),
            p + "amount_std_7d": rng.gamma(2.0, 10.0, n),
            p + "items_sum_7d": rng.integers(0, 40, n),
            p + "rate_24h": n_24h / 24.0,
            p + "last_page": rng.choice(PAGES, n).tolist(),
            p + "last_seen": [now - dt.timedelta(seconds=int(s)) for s in rng.integers(0, 86_400, n)],
        }
    names = {f.name for g in groups for f in g.features}
    return {name: values for name, values in out.items() if name in names}


def fill(store, groups, ids: list[str], columns: dict[str, np.ndarray | list]) -> None:
    """Write the ``columns`` of ``ids`` through ``store.write``, each row's values from within the last day."""
    rng = np.random.default_rng(11)
    now = dt.datetime.now(dt.UTC)
    for g in groups:
        rows = {
            "user_id": ids,
            "feature_ts": [now - dt.timedelta(seconds=int(s)) for s in rng.integers(0, 86_400, len(ids))],
        }
        rows |= {f.name: columns[f.name] for f in g.features}
        store.write(g, pa.Table.from_pydict(rows, schema=g.arrow_schema()))
