"""The point-in-time engine against a brute-force reference of its contract (keel.features.point_in_time's docstring)."""

import datetime as dt
import math
import statistics

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel.dsl import DUCKDB_TYPES, Column, Derived, Entity, EventSource, Feature, FeatureGroup, window_seconds
from keel.features import encoding
from keel.features.encoding import PointInTimeError
from keel.features.kernels import stable_argsort
from keel.features.point_in_time import point_in_time
from tests.factories.orders import (
    T0,
    USERS,
    at,
    micros,
    order,
    order_row,
    orders,
    orders_no_id,
    shopper,
    small_group,
    sources_of,
)

# Every SQL text the groups use, with its meaning in Python (SQL's NULL is None here).
WHERE = {
    "flag": lambda e: e["flag"] is True,
    "NOT flag": lambda e: e["flag"] is False,
    "amount > 0": lambda e: e["amount"] is not None and e["amount"] > 0,
    "qty > 0": lambda e: e["qty"] is not None and e["qty"] > 0,
}
DERIVED = {
    "sum_amount_5s / nullif(n_5s, 0)": lambda v: (
        None if v["sum_amount_5s"] is None or v["n_5s"] == 0 else v["sum_amount_5s"] / v["n_5s"]
    ),
    "n_5s >= 2": lambda v: v["n_5s"] >= 2,
    "busy AND n_flag_10s > 0": lambda v: v["busy"] and v["n_flag_10s"] > 0,
    "basket.n_5s + coalesce(basket_ttl.n_5s, 0)": lambda v: v["basket"]["n_5s"] + v["basket_ttl"]["n_5s"],
    "basket.last_cat || '/' || basket_ttl.last_cat": lambda v: (
        None
        if v["basket"]["last_cat"] is None or v["basket_ttl"]["last_cat"] is None
        else v["basket"]["last_cat"] + "/" + v["basket_ttl"]["last_cat"]
    ),
}


def every_aggregation(source: EventSource) -> tuple:
    return (
        Feature("n", "count"),
        Feature("n_5s", "count", window="5s"),
        Feature("n_amount_10s", "count", "amount", window="10s"),
        Feature("n_flag_10s", "count", window="10s", where="flag"),
        Feature("sum_amount_5s", "sum", "amount", window="5s"),
        Feature("sum_qty_10s", "sum", "qty", window="10s", where="NOT flag"),
        Feature("sum_qty", "sum", "qty"),
        Feature("avg_amount_10s", "avg", "amount", window="10s"),
        Feature("avg_qty_5s", "avg", "qty", window="5s"),
        Feature("min_amount_10s", "min", "amount", window="10s"),
        Feature("max_amount", "max", "amount"),
        Feature("min_qty", "min", "qty"),
        Feature("min_cat_5s", "min", "cat", window="5s"),
        Feature("max_cat_10s", "max", "cat", window="10s", where="amount > 0"),
        Feature("max_paid_10s", "max", "paid_at", window="10s"),
        Feature("min_day", "min", "day"),
        Feature("sd_amount_10s", "stddev", "amount", window="10s"),
        Feature("sd_qty", "stddev", "qty"),
        Feature("cats_5s", "count_distinct", "cat", window="5s"),
        Feature("cats", "count_distinct", "cat"),
        Feature("amounts_10s", "count_distinct", "amount", window="10s", where="flag"),
        Feature("first_amount_10s", "first", "amount", window="10s"),
        Feature("last_amount_5s", "last", "amount", window="5s"),
        Feature("first_cat", "first", "cat"),
        Feature("last_cat", "last", "cat"),
        Feature("last_flag_10s", "last", "flag", window="10s"),
        Feature("first_paid_5s", "first", "paid_at", window="5s", where="qty > 0"),
        Feature("last_day", "last", "day"),
        Feature("last_seen", "last", "event_ts"),
        Derived("amount_per_event_5s", "sum_amount_5s / nullif(n_5s, 0)"),
        Derived("busy", "n_5s >= 2", type="bool"),
        Derived("busy_and_flagged", "busy AND n_flag_10s > 0", type="bool"),
    )


basket = FeatureGroup(name="basket", entity=shopper, source=orders, features=every_aggregation(orders))
basket_ttl = FeatureGroup(
    name="basket_ttl", entity=shopper, source=orders, ttl="7s", features=every_aggregation(orders)
)
basket_no_id = FeatureGroup(
    name="basket_no_id", entity=shopper, source=orders_no_id, ttl="12s", features=every_aggregation(orders_no_id)
)
combined = FeatureGroup(
    name="combined",
    entity=shopper,
    upstream=(basket, basket_ttl),
    features=(
        Derived("n_both_5s", "basket.n_5s + coalesce(basket_ttl.n_5s, 0)", type="int64"),
        Derived("cats_pair", "basket.last_cat || '/' || basket_ttl.last_cat", type="string"),
    ),
)


# The reference: the contract, read literally, one probe and one event at a time --------------


def reference(group: FeatureGroup, events: dict[str, list[dict]], probes: list[tuple]) -> list[dict]:
    """Every feature of ``group`` at each probe (user, t), in probe order."""
    if group.source is None:
        ups = {up.name: reference(up, events, probes) for up in group.upstream}
        return [
            {f.name: DERIVED[f.expr]({name: rows[i] for name, rows in ups.items()}) for f in group.features}
            for i in range(len(probes))
        ]
    source = group.source
    out = []
    for user, t in probes:
        seen = [e for e in events[source.name] if user is not None and e["user_id"] == user and e["event_ts"] <= t]
        stale = False
        if group.ttl:
            latest = max((e["event_ts"] for e in seen), default=None)
            stale = latest is None or latest < t - dt.timedelta(seconds=window_seconds(group.ttl))
        values = {}
        for feat in group.features:
            if isinstance(feat, Derived):
                values[feat.name] = DERIVED[feat.expr](values)
            elif stale:
                values[feat.name] = 0 if feat.agg in ("count", "count_distinct") else None
            else:
                values[feat.name] = aggregate(feat, source, seen, t)
        out.append(values)
    return out


def aggregate(feat: Feature, source: EventSource, seen: list[dict], t: dt.datetime):
    rows = [e for e in seen if feat.window_s is None or e["event_ts"] > t - dt.timedelta(seconds=feat.window_s)]
    rows = [e for e in rows if feat.where is None or WHERE[feat.where](e)]
    if feat.agg == "count" and feat.column is None:
        return len(rows)
    rows = [e for e in rows if e[feat.column] is not None]
    vals = [e[feat.column] for e in rows]
    if feat.agg == "count":
        return len(vals)
    if feat.agg == "count_distinct":
        return len(set(vals))
    if not vals:
        return None
    is_float = isinstance(vals[0], float)
    if feat.agg == "sum":
        return math.fsum(vals) if is_float else sum(vals)
    if feat.agg == "avg":
        return math.fsum(vals) / len(vals) if is_float else sum(vals) / len(vals)
    if feat.agg == "stddev":
        return statistics.stdev(vals) if len(vals) >= 2 else None
    if feat.agg == "min":
        return min(vals)
    if feat.agg == "max":
        return max(vals)
    # Without event ids, ties at one timestamp are broken by the value itself.
    tie = (lambda e: e[source.event_id]) if source.event_id else (lambda e: e[feat.column])
    ordered = sorted(rows, key=lambda e: (e["event_ts"], tie(e)))
    return ordered[0 if feat.agg == "first" else -1][feat.column]


# Running the engine ---------------------------------------------------------------------------


def compute(group: FeatureGroup, events: dict[str, list[dict]], probes: list[tuple]) -> list[dict]:
    con = duckdb.connect()
    try:
        for name, source in sources_of(group).items():
            schema = source.arrow_schema()
            rows = [{k: e[k] for k in schema.names} for e in events[name]]
            con.register(f"ev_{name}", pa.Table.from_pylist(rows, schema=schema))
        con.register(
            "probes",
            pa.table(
                {
                    "user_id": pa.array([u for u, _ in probes], pa.string()),
                    "_t": pa.array([t for _, t in probes], pa.timestamp("us", tz="UTC")),
                    "_probe": pa.array(range(len(probes)), pa.int64()),
                }
            ),
        )
        rel = point_in_time(con, group, {name: f"ev_{name}" for name in sources_of(group)}, "probes")
        assert rel.columns == ["_probe", *(f.name for f in group.features)]
        assert rel.types == [duckdb.sqltype("BIGINT")] + [
            duckdb.sqltype(DUCKDB_TYPES[group.feature_type(f)]) for f in group.features
        ]
        rows = rel.to_arrow_table().to_pylist()
    finally:
        con.close()
    assert [r["_probe"] for r in rows] == list(range(len(probes))), "one row per probe, in _probe order"
    return [{k: v for k, v in r.items() if k != "_probe"} for r in rows]


def assert_matches(group: FeatureGroup, got: list[dict], want: list[dict], events: list[dict]) -> None:
    magnitude = max((abs(e[c]) for e in events for c in ("amount", "qty") if e.get(c) is not None), default=1.0)
    tolerance = 1e-12 * max(magnitude, 1.0)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        for name, expected in w.items():
            actual = g[name]
            where = f"probe {i}, feature {name}: got {actual!r}, want {expected!r}"
            if isinstance(expected, float) and actual is not None:
                assert math.isclose(actual, expected, rel_tol=1e-12, abs_tol=tolerance), where
            else:
                assert actual == expected and type(actual) is type(expected), where


# Random event streams ------------------------------------------------------------------------

event_rows = st.lists(
    order_row(USERS, st.builds(at, st.integers(0, 10), micros)),
    min_size=2,
    max_size=30,
)
# Probe times are drawn at random, or anchored on an event at the edges the contract names:
# the event itself (t = event_ts), a window or the TTL ago (t - w = event_ts), a microsecond off.
EDGES = [dt.timedelta(seconds=s, microseconds=u) for s in (0, 5, 7, 10, 12) for u in (0, 0, 1, -1)]


@st.composite
def streams(draw):
    """Events in arrival order (not time order), with event ids that do not follow either order."""
    rows = draw(event_rows)
    ids = draw(st.permutations(range(len(rows))))
    return [{**row, "event_id": f"e{i}"} for row, i in zip(rows, ids, strict=True)]


@st.composite
def scenarios(draw):
    """(events, probes): probes of every user and of one with no events, many on a window's edge."""
    events = draw(streams())
    probes = []
    for _ in range(draw(st.integers(1, 12))):
        if events and draw(st.booleans()):
            anchor = draw(st.sampled_from(events))
            user = draw(st.sampled_from([anchor["user_id"], anchor["user_id"], *USERS]))
            probes.append((user, anchor["event_ts"] + draw(st.sampled_from(EDGES))))
        else:
            probes.append((draw(st.sampled_from((*USERS, "nobody"))), at(draw(st.integers(-3, 32)), draw(micros))))
    return events, probes


PROPERTY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("group", [basket, basket_ttl, basket_no_id], ids=lambda g: g.name)
@PROPERTY
@given(case=scenarios())
def test_matches_reference(group, case):
    events, probes = case
    evs = {group.source.name: events}
    assert_matches(group, compute(group, evs, probes), reference(group, evs, probes), events)


@settings(max_examples=25, deadline=None)
@given(case=scenarios())
def test_rank_of_time_matches_reference(case):
    """Keys too wide for (entity, microseconds) fall back to ranks of time; same values."""
    events, probes = case
    evs = {"orders": events}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(encoding, "COMPOSITE_LIMIT", 16)
        got = compute(basket_ttl, evs, probes)
    assert_matches(basket_ttl, got, reference(basket_ttl, evs, probes), events)


@settings(max_examples=25, deadline=None)
@given(case=scenarios(), later=streams())
def test_events_after_every_probe_change_nothing(case, later):
    """No leakage: whatever happens after the last probe time cannot reach any value."""
    events, probes = case
    last = max(t for _, t in probes)
    moved = [
        {
            **e,
            "event_id": f"late-{e['event_id']}",
            "event_ts": last + dt.timedelta(microseconds=1) + (e["event_ts"] - T0),
        }
        for e in later
    ]
    before = compute(basket_ttl, {"orders": events}, probes)
    after = compute(basket_ttl, {"orders": moved + events}, probes)
    # Floats may differ in the last bits (prefix sums run over other events); nothing else may.
    assert_matches(basket_ttl, after, before, events + moved)


@settings(max_examples=15, deadline=None)
@given(case=scenarios())
def test_upstream_group_matches_reference(case):
    events, probes = case
    evs = {"orders": events}
    assert_matches(combined, compute(combined, evs, probes), reference(combined, evs, probes), events)


# Hand-computed cases -----------------------------------------------------------------------------


def values(group, events, probes):
    return compute(group, {group.source.name: events}, probes)


def test_window_is_half_open_and_ties_count_together():
    group = small_group(
        Feature("n_10s", "count", window="10s"),
        Feature("sum_10s", "sum", "amount", window="10s"),
        Feature("last_10s", "last", "amount", window="10s"),
        Feature("first_10s", "first", "amount", window="10s"),
    )
    events = [
        order("e1", "a", 0, amount=1.0),  # exactly t - 10s at t = 10: outside
        order("e2", "a", 5, amount=2.0),
        order("e4", "a", 10, amount=4.0),  # exactly t: inside, with its tie
        order("e3", "a", 10, amount=8.0),
        order("e5", "a", 10, amount=16.0, micros=1),  # after t
    ]
    got = values(group, events, [("a", at(10)), ("a", at(9, 999_999)), ("a", at(25))])
    assert got[0] == {"n_10s": 3, "sum_10s": 14.0, "last_10s": 4.0, "first_10s": 2.0}  # e4 > e3 by event id
    assert got[1] == {"n_10s": 2, "sum_10s": 3.0, "last_10s": 2.0, "first_10s": 1.0}
    assert got[2] == {"n_10s": 0, "sum_10s": None, "last_10s": None, "first_10s": None}


def test_ties_without_event_ids_break_by_value():
    group = small_group(
        Feature("first_amount", "first", "amount"), Feature("last_amount", "last", "amount"), source=orders_no_id
    )
    events = [order(None, "a", 3, amount=v) for v in (5.0, -1.0, None, 7.0)]
    assert values(group, events, [("a", at(3))]) == [{"first_amount": -1.0, "last_amount": 7.0}]


def test_statistics_are_exact_where_prefix_sums_would_cancel():
    """Large values in a long history or in other entities: plain prefix sums would lose the window."""
    group = small_group(
        Feature("sum_5s", "sum", "amount", window="5s"),
        Feature("avg_5s", "avg", "amount", window="5s"),
        Feature("sd_5s", "stddev", "amount", window="5s"),
        Feature("sd_life", "stddev", "amount"),
    )
    huge = [order(f"h{i}", "a", 0, amount=1e15 + i) for i in range(50)]
    large = [order(f"l{i}", "b", 0, amount=-1e6 - i) for i in range(50)]
    recent = [order(f"{u}{i}", u, 100, amount=a) for u in "ab" for i, a in enumerate([0.1, 0.2, 0.3])]
    constant = [order(f"c{i}", "c", s, amount=1e8 + 0.1) for i, s in enumerate([1, 2, 3])]
    got = values(group, huge + large + recent + constant, [("a", at(100)), ("b", at(100)), ("c", at(3))])
    assert got[0]["sum_5s"] == pytest.approx(0.6, rel=1e-15)
    assert got[0]["avg_5s"] == pytest.approx(0.2, rel=1e-15)
    assert got[1]["sd_5s"] == pytest.approx(0.1, rel=1e-12)
    b_amounts = [e["amount"] for e in large + recent if e["user_id"] == "b"]
    assert got[1]["sd_life"] == pytest.approx(statistics.stdev(b_amounts), rel=1e-14)
    assert got[2]["sd_5s"] == 0.0 and got[2]["sd_life"] == 0.0


def test_ttl_masks_every_feature_of_a_stale_entity():
    group = small_group(
        Feature("n_flag", "count", where="flag"),
        Feature("cats", "count_distinct", "cat"),
        Feature("last_cat", "last", "cat"),
        Derived("has_cat", "last_cat IS NOT NULL", type="bool"),
        ttl="1h",
    )
    # The latest event decides freshness even though no feature sees it (flag is false, cat NULL).
    events = [order("e1", "a", 0, cat="x", flag=True), order("e2", "a", 1800, flag=False)]
    got = values(group, events, [("a", at(1800 + 3600)), ("a", at(1800 + 3600, 1)), ("b", at(10))])
    assert got[0] == {"n_flag": 1, "cats": 1, "last_cat": "x", "has_cat": True}  # exactly ttl old: still fresh
    assert got[1] == {"n_flag": 0, "cats": 0, "last_cat": None, "has_cat": False}
    assert got[2] == got[1]


def test_count_distinct_over_a_sliding_window():
    group = small_group(Feature("cats_10s", "count_distinct", "cat", window="10s"))
    events = [
        order(f"e{i}", "a", s, cat=c) for i, (s, c) in enumerate([(0, "x"), (4, "y"), (8, "x"), (12, "z"), (20, "x")])
    ]
    probes = [("a", at(s)) for s in (0, 8, 10, 12, 14, 18, 21, 30, 31)]
    assert [v["cats_10s"] for v in values(group, events, probes)] == [1, 2, 2, 3, 2, 1, 2, 0, 0]


def test_probes_with_null_keys_or_times_see_nothing():
    group = small_group(Feature("n", "count"), Feature("last_cat", "last", "cat"))
    got = values(group, [order("e1", "a", 0, cat="x")], [(None, at(5)), ("a", None), ("a", at(5))])
    assert got == [{"n": 0, "last_cat": None}, {"n": 0, "last_cat": None}, {"n": 1, "last_cat": "x"}]


def test_no_events_and_no_probes():
    group = small_group(
        Feature("n", "count"), Feature("avg", "avg", "amount"), Derived("twice", "small.n * 2", type="int64")
    )
    assert values(group, [], [("a", at(1))]) == [{"n": 0, "avg": None, "twice": 0}]
    assert values(group, [order("e1", "a", 0, amount=1.0)], []) == []


def test_composite_keys():
    store = Entity(name="store_item", join_keys={"store_id": "int64", "sku": "string"})
    sales = EventSource(name="sales", entity=store, columns=(Column("units", "int64"),))
    group = FeatureGroup(
        name="sales_7d", entity=store, source=sales, features=(Feature("units_7d", "sum", "units", window="7d"),)
    )
    con = duckdb.connect()
    con.register(
        "ev",
        pa.Table.from_pylist(
            [
                {"event_id": "1", "store_id": 1, "sku": "x", "event_ts": at(0), "units": 2},
                {"event_id": "2", "store_id": 1, "sku": "y", "event_ts": at(0), "units": 3},
                {"event_id": "3", "store_id": 2, "sku": "x", "event_ts": at(0), "units": 5},
            ],
            schema=sales.arrow_schema(),
        ),
    )
    con.register(
        "pr",
        pa.table(
            {
                "store_id": [1, 2, 2],
                "sku": ["x", "x", "y"],
                "_t": pa.array([at(1)] * 3, pa.timestamp("us", tz="UTC")),
                "_probe": pa.array([0, 1, 2], pa.int64()),
            }
        ),
    )
    assert point_in_time(con, group, {"sales": "ev"}, "pr").fetchall() == [(0, 2), (1, 5), (2, None)]


def test_missing_events_and_unresolved_upstream_are_named():
    con = duckdb.connect()
    with pytest.raises(PointInTimeError, match="source 'orders'.*events={'orders'"):
        point_in_time(con, basket, {}, "probes")
    named = FeatureGroup(name="named", entity=shopper, upstream=("basket",), features=(Derived("x", "1"),))
    with pytest.raises(PointInTimeError, match="upstream 'basket' is a name"):
        point_in_time(con, named, {}, "probes")


def test_threaded_argsort_is_a_stable_sort():
    x = np.random.default_rng(3).integers(0, 1 << 40, 1_200_000)
    x[::7] = 12345  # many equal keys, which must keep their order
    perm = stable_argsort(x, threads=2)  # a path the small stream tests never reach
    assert np.array_equal(perm, np.argsort(x, kind="stable"))
