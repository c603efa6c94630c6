"""StreamFeatures against keel.features.point_in_time: every row of updates() is the offline value at (entity, feature_ts)."""

import datetime as dt
import math

import duckdb
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel.dsl import Column, Derived, Entity, EventSource, Feature, FeatureGroup
from keel.features.point_in_time import point_in_time
from keel.stream import source_state
from keel.stream.source_state import StreamStateError
from keel.stream.state import StreamFeatures
from pipelines.features import user_clicks, user_engagement, user_profile, user_transactions
from tests.factories.orders import (
    USERS,
    at,
    micros,
    order,
    order_row,
    orders,
    orders_no_id,
    shopper,
    sources_of,
)
from tests.factories.orders import small_group as small

LATENESS = dt.timedelta(seconds=3)
visits = EventSource(name="visits", entity=shopper, columns=(Column("page", "string"), Column("dwell", "float64")))


def every_aggregation() -> tuple:
    """Each aggregation, windowed and lifetime, with and without where; derived features over them."""
    return (
        Feature("n", "count"),
        Feature("n_5s", "count", window="5s"),
        Feature("n_amount_10s", "count", "amount", window="10s"),
        Feature("n_flag_10s", "count", window="10s", where="flag"),
        Feature("n_paid", "count", "paid_at", where="qty > 0"),
        Feature("sum_amount_5s", "sum", "amount", window="5s"),
        Feature("sum_amount", "sum", "amount", where="amount > 0"),
        Feature("sum_qty_10s", "sum", "qty", window="10s", where="NOT flag"),
        Feature("sum_qty", "sum", "qty"),
        Feature("avg_amount_10s", "avg", "amount", window="10s"),
        Feature("avg_amount", "avg", "amount"),
        Feature("avg_qty_5s", "avg", "qty", window="5s"),
        Feature("min_amount_10s", "min", "amount", window="10s"),
        Feature("max_amount", "max", "amount"),
        Feature("min_qty", "min", "qty"),
        Feature("min_cat_5s", "min", "cat", window="5s"),
        Feature("max_cat_10s", "max", "cat", window="10s", where="amount > 0"),
        Feature("min_cat", "min", "cat", where="flag"),
        Feature("max_paid_10s", "max", "paid_at", window="10s"),
        Feature("min_day", "min", "day"),
        Feature("sd_amount_10s", "stddev", "amount", window="10s"),
        Feature("sd_amount", "stddev", "amount"),
        Feature("sd_qty", "stddev", "qty"),
        Feature("cats_5s", "count_distinct", "cat", window="5s"),
        Feature("cats", "count_distinct", "cat"),
        Feature("amounts_10s", "count_distinct", "amount", window="10s", where="flag"),
        Feature("amounts", "count_distinct", "amount"),
        Feature("first_amount_10s", "first", "amount", window="10s"),
        Feature("last_amount_5s", "last", "amount", window="5s"),
        Feature("first_cat", "first", "cat"),
        Feature("last_cat", "last", "cat"),
        Feature("first_amount", "first", "amount", where="flag"),
        Feature("last_qty", "last", "qty"),
        Feature("last_flag_10s", "last", "flag", window="10s"),
        Feature("first_paid_5s", "first", "paid_at", window="5s", where="qty > 0"),
        Feature("last_day", "last", "day"),
        Feature("last_seen", "last", "event_ts"),
        Derived("amount_per_event_5s", "sum_amount_5s / nullif(n_5s, 0)"),
        Derived("busy", "n_5s >= 2", type="bool"),
        Derived("busy_and_flagged", "busy AND n_flag_10s > 0", type="bool"),
    )


basket = FeatureGroup(name="basket", entity=shopper, source=orders, features=every_aggregation())
basket_ttl = FeatureGroup(name="basket_ttl", entity=shopper, source=orders, ttl="7s", features=every_aggregation())
basket_no_id = FeatureGroup(
    name="basket_no_id", entity=shopper, source=orders_no_id, ttl="12s", features=every_aggregation()
)
browsing = FeatureGroup(
    name="browsing",
    entity=shopper,
    source=visits,
    ttl="6s",
    features=(
        Feature("views_5s", "count", window="5s"),
        Feature("pages", "count_distinct", "page"),
        Feature("last_page_10s", "last", "page", window="10s"),
        Feature("dwell_10s", "sum", "dwell", window="10s", where="page <> 'home'"),
        Derived("dwell_per_view", "dwell_10s / nullif(views_5s, 0)"),
    ),
)
journey = FeatureGroup(
    name="journey",
    entity=shopper,
    upstream=(basket_ttl, browsing),
    features=(
        Derived("events_5s", "coalesce(basket_ttl.n_5s, 0) + browsing.views_5s", type="int64"),
        Derived("cat_and_page", "basket_ttl.last_cat || '/' || browsing.last_page_10s", type="string"),
        Derived("spend_per_view", "basket_ttl.sum_amount / nullif(browsing.views_5s, 0)"),
    ),
)
ALL_GROUPS = (basket, basket_ttl, basket_no_id, browsing, journey)


# The offline engine, the contract ----------------------------------------------------------------


def event_table(source: EventSource, rows: list[dict]) -> pa.Table:
    schema = source.arrow_schema()
    return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)


def offline(group: FeatureGroup, events: dict[str, list[dict]], rows: pa.Table) -> list[dict]:
    """``keel.features.point_in_time.point_in_time`` at each row's (user, feature_ts), as dicts of feature values."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    try:
        for name, source in sources_of(group).items():
            con.register(f"ev_{name}", event_table(source, events.get(name, [])))
        con.register(
            "probes",
            pa.table(
                {
                    "user_id": rows.column("user_id"),
                    "_t": rows.column("feature_ts"),
                    "_probe": pa.array(range(rows.num_rows), pa.int64()),
                }
            ),
        )
        rel = point_in_time(con, group, {name: f"ev_{name}" for name in sources_of(group)}, "probes")
        return [{k: v for k, v in r.items() if k != "_probe"} for r in rel.to_arrow_table().to_pylist()]
    finally:
        con.close()


def assert_rows_equal(group: FeatureGroup, got: pa.Table, want: list[dict]) -> None:
    assert got.schema == group.arrow_schema()
    for i, (g, w) in enumerate(zip(got.to_pylist(), want, strict=True)):
        for name, expected in w.items():
            actual = g[name]
            where = (
                f"{group.name} row {i} ({g['user_id']} at {g['feature_ts']}), {name}: got {actual!r}, want {expected!r}"
            )
            if isinstance(expected, float) and isinstance(actual, float):
                assert (
                    actual == expected
                    or math.isclose(actual, expected, rel_tol=1e-9, abs_tol=1e-9)
                    or (math.isnan(actual) and math.isnan(expected))
                ), where
            else:
                assert actual == expected and type(actual) is type(expected), where


# Random streams ----------------------------------------------------------------------------------

times = st.builds(at, st.integers(0, 30), micros)
OFFSETS = [dt.timedelta(seconds=s, microseconds=u) for s in (0, 5, -5, 6, 7, 10, -10, 12) for u in (0, 0, 1, -1)]
# Arrival delays (at most LATENESS) that put the eviction horizon on an event or a microsecond off.
DELAYS = [0, 1, 999_999, 1_000_000, 2_000_000, 2_999_999, 3_000_000]
order_rows = order_row(USERS, times)
visit_rows = st.fixed_dictionaries(
    {
        "user_id": st.sampled_from(USERS),
        "event_ts": times,
        "page": st.one_of(st.none(), st.sampled_from(["home", "cart", "help"])),
        "dwell": st.one_of(st.none(), st.floats(0, 100, allow_nan=False)),
    }
)


@st.composite
def streams(draw):
    """Events of both sources as they arrive: out of time order, each at most LATENESS late.

    Returns (arrivals, steps): arrivals is a list of (source, event, arrival time); steps split
    it into the history warmed first and the batches added after, each followed by updates().
    """
    events = [("orders", row) for row in draw(st.lists(order_rows, min_size=1, max_size=25))]
    events += [("visits", row) for row in draw(st.lists(visit_rows, max_size=15))]
    # Many events share a few times or lie a window, a TTL or a microsecond from one, so ties meet
    # across batches and windows' edges line up with events and eviction horizons.
    pool = draw(st.lists(times, min_size=1, max_size=4))
    near = st.builds(lambda t, offset: t + offset, st.sampled_from(pool), st.sampled_from(OFFSETS))
    events = [(source, {**row, "event_ts": draw(st.one_of(near, times))}) for source, row in events]
    ids = draw(st.permutations(range(len(events))))  # event ids follow neither time nor arrival
    delays = draw(
        st.lists(
            st.one_of(st.sampled_from(DELAYS), st.integers(0, 3_000_000)), min_size=len(events), max_size=len(events)
        )
    )
    arrivals = sorted(
        (
            (source, {**row, "event_id": f"e{i:03d}"}, row["event_ts"] + dt.timedelta(microseconds=d))
            for (source, row), i, d in zip(events, ids, delays, strict=True)
        ),
        key=lambda a: a[2],
    )
    cuts = sorted(draw(st.lists(st.integers(0, len(arrivals)), max_size=10)))
    bounds = [0, *cuts, len(arrivals)]
    return arrivals, [(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


def feed(sf: StreamFeatures, batch: list[tuple], warm: bool) -> None:
    by_source: dict[str, list[dict]] = {}
    for source, row, _ in batch:
        by_source.setdefault(source, []).append(row)
        if source == "orders" and "orders_no_id" in sf.sources:
            by_source.setdefault("orders_no_id", []).append(row)
    for name, rows in by_source.items():
        if name in sf.sources:
            table = event_table(sf.sources[name], rows)
            (sf.warm if warm else sf.add)(name, table)


PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize(
    "listed", [ALL_GROUPS, (journey, basket_no_id)], ids=["every group", "upstream groups not listed"]
)
@PROPERTY
@given(case=streams(), compact=st.booleans())
def test_every_update_equals_the_offline_value_at_its_feature_ts(listed, case, compact):
    arrivals, steps = case
    sf = StreamFeatures(listed, lateness=LATENESS)
    delivered: dict[str, list[dict]] = {}
    with pytest.MonkeyPatch.context() as mp:
        if compact:  # rewrite the log at every eviction, to exercise that path too
            mp.setattr(source_state, "COMPACT_MIN", 0)
        for step, (a, b) in enumerate(steps):
            batch = arrivals[a:b]
            feed(sf, batch, warm=step == 0)
            for source, row, _ in batch:
                delivered.setdefault(source, []).append(row)
                if source == "orders":
                    delivered.setdefault("orders_no_id", []).append(row)
            got = sf.updates()
            for group in listed:
                names = {"orders" if name == "orders_no_id" else name for name in sources_of(group)}
                # Added events touch their entities; warmed ones (step 0) do not.
                expect = {row["user_id"] for source, row, _ in batch if source in names} if step else set()
                rows = got.get(group.name)
                assert (set(rows.column("user_id").to_pylist()) if rows is not None else set()) == expect
                if rows is None:
                    continue
                for user, ts in zip(
                    rows.column("user_id").to_pylist(), rows.column("feature_ts").to_pylist(), strict=True
                ):
                    assert ts == max(r["event_ts"] for s, r in _events(delivered, names) if r["user_id"] == user)
                assert_rows_equal(group, rows, offline(group, delivered, rows))
            if b:  # the stream's clock: no later event is more than LATENESS behind the latest arrival
                sf.evict(arrivals[b - 1][2])
    assert set(got) <= {g.name for g in listed}


def _events(delivered: dict[str, list[dict]], names: set[str]):
    return [(s, r) for s in names for r in delivered.get(s, [])]


# Named cases ----------------------------------------------------------------------------------------


def one_update(sf: StreamFeatures, source: EventSource, rows: list[dict]) -> list[dict]:
    sf.add(source.name, event_table(source, rows))
    return sf.updates()["small"].to_pylist()


def test_windows_are_half_open_and_ties_follow_event_ids():
    sf = StreamFeatures(
        [
            small(
                Feature("n_10s", "count", window="10s"),
                Feature("sum_10s", "sum", "amount", window="10s"),
                Feature("first_10s", "first", "amount", window="10s"),
                Feature("last_10s", "last", "amount", window="10s"),
            )
        ]
    )
    sf.warm("orders", event_table(orders, [order("e1", "a", 0, amount=1.0), order("e2", "a", 5, amount=2.0)]))
    # At t = 10 the event at exactly t - 10s is outside; both events at t are inside, ordered by id.
    got = one_update(sf, orders, [order("e4", "a", 10, amount=4.0), order("e3", "a", 10, amount=8.0)])
    assert got == [
        {"user_id": "a", "feature_ts": at(10), "n_10s": 3, "sum_10s": 14.0, "first_10s": 2.0, "last_10s": 4.0}
    ]


def test_a_late_event_changes_the_values_at_the_entitys_latest_event():
    sf = StreamFeatures(
        [small(Feature("n_10s", "count", window="10s"), Feature("n", "count"), Feature("first", "first", "amount"))]
    )
    one_update(sf, orders, [order("e1", "a", 20, amount=1.0)])
    got = one_update(sf, orders, [order("e2", "a", 15, amount=2.0)])  # late, inside (10, 20]
    assert got == [{"user_id": "a", "feature_ts": at(20), "n_10s": 2, "n": 2, "first": 2.0}]
    got = one_update(sf, orders, [order("e3", "a", 10, amount=3.0)])  # late, on the window's open edge
    assert got == [{"user_id": "a", "feature_ts": at(20), "n_10s": 2, "n": 3, "first": 3.0}]


def test_ties_without_event_ids_break_by_value():
    sf = StreamFeatures(
        [
            small(
                Feature("first", "first", "amount"),
                Feature("last", "last", "amount"),
                Feature("last_5s", "last", "cat", window="5s"),
                source=orders_no_id,
            )
        ]
    )
    rows = [order(None, "a", 3, amount=v, cat=c) for v, c in ((5.0, "b"), (-1.0, "c"), (None, None), (7.0, "a"))]
    sf.warm("orders_no_id", event_table(orders_no_id, rows[:2]))
    got = one_update(sf, orders_no_id, rows[2:])
    assert got == [{"user_id": "a", "feature_ts": at(3), "first": -1.0, "last": 7.0, "last_5s": "c"}]


def test_nulls_where_and_counts_follow_the_sql_rules():
    sf = StreamFeatures(
        [
            small(
                Feature("events", "count"),
                Feature("amounts", "count", "amount"),
                Feature("flagged", "count", where="flag"),
                Feature("unflagged_sum", "sum", "amount", where="NOT flag"),
                Feature("sd", "stddev", "amount"),
                Feature("cats", "count_distinct", "cat"),
            )
        ]
    )
    got = one_update(sf, orders, [order("e1", "a", 0, flag=None, amount=None), order("e2", "a", 1, amount=2.0)])
    # NULL flag is not TRUE and NOT NULL is not TRUE either; one value has no sample stddev.
    assert got == [
        {
            "user_id": "a",
            "feature_ts": at(1),
            "events": 2,
            "amounts": 1,
            "flagged": 0,
            "unflagged_sum": None,
            "sd": None,
            "cats": 0,
        }
    ]


def test_stddev_of_one_repeated_value_is_exactly_zero_and_large_values_elsewhere_cost_no_precision():
    group = small(Feature("sd_5s", "stddev", "amount", window="5s"), Feature("sd", "stddev", "amount"))
    sf = StreamFeatures([group])
    huge = [order(f"h{i}", "b", 100, amount=1e15 + i) for i in range(50)]
    constant = [order(f"c{i}", "c", s, amount=1e8 + 0.1) for i, s in enumerate([1, 2, 3])]
    recent = [order(f"r{i}", "a", 100, amount=a) for i, a in enumerate([0.1, 0.2, 0.3])]
    sf.add("orders", event_table(orders, huge + constant + recent))
    rows = sf.updates()["small"]
    got = {r["user_id"]: r for r in rows.to_pylist()}
    assert got["c"]["sd_5s"] == 0.0 and got["c"]["sd"] == 0.0
    assert got["a"]["sd_5s"] == pytest.approx(0.1, rel=1e-14)  # b's values, laid next to a's, cost a nothing
    # Around 1e15 with a spread of 15, double-double moments keep ~5 digits, offline's as well as these.
    assert_rows_equal(group, rows, offline(group, {"orders": huge + constant + recent}, rows))


def test_ttl_masks_an_upstream_group_whose_source_went_quiet():
    sf = StreamFeatures([journey], lateness=LATENESS)
    sf.add("orders", event_table(orders, [order("e1", "a", 0, amount=5.0, cat="x")]))
    sf.add("visits", event_table(visits, [{"event_id": "v1", "user_id": "a", "event_ts": at(7), "page": "cart"}]))
    fresh = sf.updates()["journey"].to_pylist()
    assert fresh == [
        {"user_id": "a", "feature_ts": at(7), "events_5s": 1, "cat_and_page": "x/cart", "spend_per_view": 5.0}
    ]
    # basket_ttl's ttl is 7s: at 7.000001 its last order is too old, so its values are NULL (counts 0).
    sf.add("visits", event_table(visits, [{"event_id": "v2", "user_id": "a", "event_ts": at(7, 1), "page": "help"}]))
    stale = sf.updates()["journey"].to_pylist()
    assert stale == [
        {"user_id": "a", "feature_ts": at(7, 1), "events_5s": 2, "cat_and_page": None, "spend_per_view": None}
    ]


def test_warming_touches_nothing_and_updates_forget_what_they_reported():
    sf = StreamFeatures([small(Feature("n", "count"))])
    sf.warm("orders", event_table(orders, [order("e1", "a", 0), order("e2", "b", 1)]))
    assert sf.updates() == {}
    sf.add("orders", event_table(orders, [order("e3", "b", 2)]))
    sf.add("orders", event_table(orders, [order("e4", "c", 1)]))
    got = sf.updates()["small"].to_pylist()
    assert [(r["user_id"], r["feature_ts"], r["n"]) for r in got] == [("b", at(2), 2), ("c", at(1), 1)]
    assert sf.updates() == {}


def test_only_listed_groups_are_returned():
    sf = StreamFeatures([journey])
    assert set(sf.sources) == {"orders", "visits"}
    sf.add("orders", event_table(orders, [order("e1", "a", 0)]))
    assert set(sf.updates()) == {"journey"}


def test_evict_bounds_the_buffers_and_lifetime_features_keep_their_state():
    group = small(
        Feature("n_10s", "count", window="10s"),
        Feature("n", "count"),
        Feature("cats", "count_distinct", "cat"),
        Feature("first_cat", "first", "cat"),
        Feature("max_amount", "max", "amount"),
        Feature("sum_amount", "sum", "amount"),
    )
    sf = StreamFeatures([group], lateness=dt.timedelta(seconds=5))
    everything = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(source_state, "COMPACT_MIN", 0)
        for s in range(0, 1000, 4):
            rows = [order(f"e{s}", "a", s, amount=float(s % 7), cat=f"c{s % 5}")]
            everything += rows
            sf.add("orders", event_table(orders, rows))
            got = sf.updates()
            sf.evict(at(s))
            assert sf.buffered["orders"] == min(s // 4 + 1, 3)  # (s - 10s, s], one event every 4s
    assert_rows_equal(group, got["small"], offline(group, {"orders": everything}, got["small"]))
    row = got["small"].to_pylist()[0]
    assert (row["n"], row["n_10s"], row["cats"], row["first_cat"], row["max_amount"]) == (250, 3, 5, "c0", 6.0)


def test_an_event_later_than_the_window_still_counts_for_lifetime_features():
    sf = StreamFeatures([small(Feature("n_10s", "count", window="10s"), Feature("n", "count"))], lateness=LATENESS)
    one_update(sf, orders, [order("e1", "a", 100)])
    sf.evict(at(100))
    assert one_update(sf, orders, [order("e0", "a", 50)]) == [
        {"user_id": "a", "feature_ts": at(100), "n_10s": 1, "n": 2}
    ]


def test_eviction_keeps_the_event_just_inside_the_longest_window():
    sf = StreamFeatures([small(Feature("n_10s", "count", window="10s"))], lateness=dt.timedelta(0))
    one_update(sf, orders, [order("e1", "a", 0, micros=1), order("e2", "a", 10)])
    sf.evict(at(10))  # (0s, 10s] still holds e1, at 0.000001s
    assert sf.buffered["orders"] == 2
    assert one_update(sf, orders, [order("e3", "a", 9)]) == [{"user_id": "a", "feature_ts": at(10), "n_10s": 3}]
    sf.evict(at(10, 1))  # no probe comes before 10.000001s now: e1 goes, e2 and e3 stay
    assert sf.buffered["orders"] == 2


def test_an_event_within_the_lateness_allowance_finds_its_window_after_eviction():
    sf = StreamFeatures([small(Feature("n_10s", "count", window="10s"))], lateness=LATENESS)
    one_update(sf, orders, [order("e1", "a", 0), order("e2", "b", 12)])
    sf.evict(at(12))  # a may still get an event as early as 9s, whose window (-1s, 9s] holds e1
    assert one_update(sf, orders, [order("e3", "a", 9)]) == [{"user_id": "a", "feature_ts": at(9), "n_10s": 2}]


def test_ties_arriving_in_separate_batches_still_follow_event_ids():
    sf = StreamFeatures(
        [
            small(
                Feature("first", "first", "cat"),
                Feature("last", "last", "cat"),
                Feature("first_5s", "first", "cat", window="5s"),
                Feature("last_5s", "last", "cat", window="5s"),
            )
        ]
    )
    one_update(sf, orders, [order("e2", "a", 1, cat="two"), order("e3", "a", 1, cat="three")])
    got = one_update(sf, orders, [order("e1", "a", 1, cat="one"), order("e4", "a", 1, cat="four")])
    assert got == [
        {"user_id": "a", "feature_ts": at(1), "first": "one", "last": "four", "first_5s": "one", "last_5s": "four"}
    ]


def test_composite_keys():
    store = Entity(name="store_item", join_keys={"store_id": "int64", "sku": "string"})
    sales = EventSource(name="sales", entity=store, columns=(Column("units", "int64"),))
    group = FeatureGroup(
        name="sales_7d", entity=store, source=sales, features=(Feature("units_7d", "sum", "units", window="7d"),)
    )
    sf = StreamFeatures([group])
    rows = [
        {"event_id": "1", "store_id": 1, "sku": "x", "event_ts": at(0), "units": 2},
        {"event_id": "2", "store_id": 1, "sku": "y", "event_ts": at(1), "units": 3},
        {"event_id": "3", "store_id": 2, "sku": "x", "event_ts": at(2), "units": 5},
        {"event_id": "4", "store_id": 1, "sku": "x", "event_ts": at(3), "units": 7},
    ]
    sf.add("sales", event_table(sales, rows))
    got = sf.updates()["sales_7d"]
    assert got.schema == group.arrow_schema()
    assert sorted((r["store_id"], r["sku"], r["units_7d"]) for r in got.to_pylist()) == [
        (1, "x", 9),
        (1, "y", 3),
        (2, "x", 5),
    ]


def test_lookback_and_sources_of_the_demo_groups():
    sf = StreamFeatures([user_transactions, user_clicks, user_engagement])
    assert set(sf.sources) == {"transactions", "clicks"}
    assert sf.lookback("transactions") == dt.timedelta(days=30)
    assert sf.lookback("clicks") == dt.timedelta(days=30)
    assert StreamFeatures([user_profile]).lookback("signups") is None  # lifetime: all history


def test_the_demo_groups_match_offline_while_streaming():
    from pipelines.generate import generate

    tables = generate(days=6, users=60, seed=3)
    sf = StreamFeatures([user_transactions, user_clicks, user_engagement])
    split = dt.datetime(2026, 1, 5, tzinfo=dt.UTC)
    history, fresh = {}, {}
    for name in sf.sources:
        rows = tables[name].sort_by("event_ts").to_pylist()
        history[name] = [r for r in rows if r["event_ts"] < split]
        fresh[name] = [r for r in rows if r["event_ts"] >= split]
        sf.warm(name, event_table(sf.sources[name], history[name]))
    seen = {name: list(rows) for name, rows in history.items()}
    groups = {g.name: g for g in (user_transactions, user_clicks, user_engagement)}
    arriving = sorted(((r["event_ts"], name, r) for name, rows in fresh.items() for r in rows), key=lambda a: a[0])
    checked = 0
    for i in range(0, len(arriving), 250):
        batch = arriving[i : i + 250]
        for name in sf.sources:
            rows = [r for _, n, r in batch if n == name]
            seen[name] += rows
            if rows:
                sf.add(name, event_table(sf.sources[name], rows))
        for name, rows in sf.updates().items():
            assert_rows_equal(groups[name], rows, offline(groups[name], seen, rows))
            checked += rows.num_rows
        sf.evict(batch[-1][0])
    assert checked > 100


# Bad input ---------------------------------------------------------------------------------------------


def test_bad_input_is_named_with_the_fix():
    sf = StreamFeatures([small(Feature("n", "count"))])
    good = event_table(orders, [order("e1", "a", 0)])
    with pytest.raises(
        StreamStateError, match=r"source 'clicks' is not read by the groups small .*sources read: orders"
    ):
        sf.add("clicks", good)
    with pytest.raises(StreamStateError, match=r"lack column\(s\) amount .*source.arrow_schema\(\)"):
        sf.add("orders", good.drop_columns(["amount"]))
    with pytest.raises(StreamStateError, match=r"column 'qty' is string, which does not cast to the declared int64"):
        sf.add("orders", good.set_column(good.schema.get_field_index("qty"), "qty", pa.array(["many"])))
    with pytest.raises(StreamStateError, match=r"1 row\(s\) have a NULL 'user_id'; validate events first"):
        sf.warm("orders", good.set_column(1, "user_id", pa.array([None], pa.string())))
    with pytest.raises(StreamStateError, match=r"are a list, not a pyarrow Table"):
        sf.add("orders", [order("e1", "a", 0)])
    with pytest.raises(StreamStateError, match=r"timezone-aware datetime"):
        sf.evict(dt.datetime(2024, 1, 1))
    named = FeatureGroup(name="named", entity=shopper, upstream=("basket",), features=(Derived("x", "1"),))
    with pytest.raises(StreamStateError, match=r"upstream 'basket' is a name, not a group"):
        StreamFeatures([named])
    with pytest.raises(StreamStateError, match=r"source 'nope' is not read"):
        sf.lookback("nope")
    assert sf.updates() == {}  # nothing bad was queued
