"""Orders of shoppers: the source the point-in-time and stream-state tests compute features over,
hand-written orders, Hypothesis strategies for their values, and a one-group builder."""

import datetime as dt

from hypothesis import strategies as st

from keel.dsl import Column, Entity, EventSource, FeatureGroup

T0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
USERS = ("a", "b", "c")


def at(seconds: float, micros: int = 0) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds, microseconds=micros)


shopper = Entity(name="shopper", join_keys={"user_id": "string"})
COLUMNS = (
    Column("amount", "float64"),
    Column("qty", "int64"),
    Column("cat", "string"),
    Column("flag", "bool"),
    Column("paid_at", "timestamp"),
    Column("day", "date"),
)
orders = EventSource(name="orders", entity=shopper, columns=COLUMNS)
orders_no_id = EventSource(name="orders_no_id", entity=shopper, columns=COLUMNS, event_id=None)

amounts = st.one_of(
    st.none(),
    st.sampled_from([0.0, -0.0, 0.1, 2.5, -3.25, 1e9, 1e9 + 0.5]),
    st.floats(-1000, 1000, allow_nan=False, allow_subnormal=False),
)
quantities = st.one_of(st.none(), st.integers(-5, 5), st.sampled_from([2**40, -(2**40) + 3]))
micros = st.sampled_from([0, 0, 0, 1, 999_999])


def order_row(users, times) -> st.SearchStrategy:
    """One order event of a user drawn from ``users`` at a time drawn from ``times``, every column random."""
    return st.fixed_dictionaries(
        {
            "user_id": st.sampled_from(users),
            "event_ts": times,
            "amount": amounts,
            "qty": quantities,
            "cat": st.one_of(st.none(), st.sampled_from(["x", "y", "zz", ""])),
            "flag": st.one_of(st.none(), st.booleans()),
            "paid_at": st.one_of(st.none(), st.builds(at, st.integers(0, 30))),
            "day": st.one_of(st.none(), st.dates(dt.date(2023, 12, 25), dt.date(2024, 1, 5))),
        }
    )


def order(eid, user, s, amount=None, qty=None, cat=None, flag=None, micros=0):
    return {
        "event_id": eid,
        "user_id": user,
        "event_ts": at(s, micros),
        "amount": amount,
        "qty": qty,
        "cat": cat,
        "flag": flag,
        "paid_at": None,
        "day": None,
    }


def small_group(*features, ttl=None, source=orders) -> FeatureGroup:
    return FeatureGroup(name="small", entity=shopper, source=source, ttl=ttl, features=features)


def sources_of(group: FeatureGroup) -> dict[str, EventSource]:
    if group.source is not None:
        return {group.source.name: group.source}
    return {k: v for up in group.upstream for k, v in sources_of(up).items()}
