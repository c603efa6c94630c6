"""Entity shards: the bucket hash is Iceberg's, a shard's scan opens its files only, and every
sharded result equals the unsharded one bit for bit (random data, and the demo's)."""

import datetime as dt

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyiceberg.transforms import BucketTransform
from pyiceberg.types import LongType, StringType

from keel.dsl import FeatureGroup
from keel.features import shards as shards_module
from keel.features.materialize import compute_days
from keel.features.point_in_time import point_in_time
from keel.lakehouse.buckets import ENTITY_BUCKETS, bucket_field, entity_hash, shard_of, shard_tasks
from tests.factories.demo_lake import demo_store
from tests.factories.orders import at, micros, order_row, sources_of
from tests.keel.features.test_point_in_time import basket, basket_no_id, basket_ttl, combined

USERS = tuple(f"user-{i}" for i in range(12)) + ("", "ü-ß", "a" * 21)


def bits(table: pa.Table) -> list:
    """Every column as (validity, raw value bits): equal lists mean equal tables, bit for bit."""
    out = []
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        valid = column.is_valid().to_numpy(zero_copy_only=False).tolist()
        if pa.types.is_floating(column.type):
            values = column.fill_null(0.0).to_numpy(zero_copy_only=False).view(np.int64).tolist()
        else:
            values = column.to_pylist()
        out.append((name, str(column.type), valid, values))
    return out


# The hash -----------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(keys=st.lists(st.text(max_size=24), min_size=1, max_size=40), n=st.integers(1, 64))
def test_string_buckets_are_icebergs(keys, n):
    want = [BucketTransform(n).transform(StringType())(k) for k in keys]
    assert (entity_hash(pa.array(keys)) % n).tolist() == want


@settings(max_examples=60, deadline=None)
@given(keys=st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=40), n=st.integers(1, 64))
def test_long_buckets_are_icebergs(keys, n):
    want = [BucketTransform(n).transform(LongType())(k) for k in keys]
    assert (entity_hash(pa.array(keys, pa.int64())) % n).tolist() == want


def test_null_keys_have_no_shard():
    assert shard_of(pa.array(["a", None, "b"]), 4).tolist()[1] == -1


# The engine, sharded, on random data ------------------------------------------------------------


event_rows = st.lists(
    order_row(USERS, st.builds(at, st.integers(0, 10), micros)),
    min_size=1,
    max_size=60,
)


@st.composite
def cases(draw):
    rows = draw(event_rows)
    ids = draw(st.permutations(range(len(rows))))
    events = [{**row, "event_id": f"e{i}"} for row, i in zip(rows, ids, strict=True)]
    probes = [
        (draw(st.sampled_from((*USERS, None))), at(draw(st.integers(-3, 14)), draw(micros)))
        for _ in range(draw(st.integers(1, 30)))
    ]
    return events, probes, draw(st.sampled_from([2, 3, 4, 8, 16]))


def run_engine(group: FeatureGroup, events: list[dict], probes: list[tuple]) -> pa.Table:
    con = duckdb.connect()
    for name, source in sources_of(group).items():
        schema = source.arrow_schema()
        con.register(f"ev_{name}", pa.Table.from_pylist([{k: e[k] for k in schema.names} for e in events], schema))
    con.register(
        "probes",
        pa.table(
            {
                "user_id": pa.array([u for u, _, _ in probes], pa.string()),
                "_t": pa.array([t for _, t, _ in probes], pa.timestamp("us", tz="UTC")),
                "_probe": pa.array([i for _, _, i in probes], pa.int64()),
            }
        ),
    )
    table = point_in_time(con, group, {name: f"ev_{name}" for name in sources_of(group)}, "probes").to_arrow_table()
    con.close()
    return table


def sharded(group: FeatureGroup, events: list[dict], probes: list[tuple], k: int) -> pa.Table:
    """The engine run once per shard on that shard's events and probes, put back in probe order
    (a shard need not be a power of two here: the engine cannot tell)."""
    event_shard = shard_of(pa.array([e["user_id"] for e in events]), k)
    probe_shard = np.maximum(shard_of(pa.array([u for u, _ in probes], pa.string()), k), 0)
    parts = []
    for s in range(k):
        mine = [(u, t, i) for i, (u, t) in enumerate(probes) if probe_shard[i] == s]
        if mine:
            parts.append(run_engine(group, [e for e, h in zip(events, event_shard, strict=True) if h == s], mine))
    table = pa.concat_tables(parts)
    return table.take(pa.array(np.argsort(table.column("_probe").to_numpy())))


@pytest.mark.parametrize("group", [basket, basket_ttl, basket_no_id, combined], ids=lambda g: g.name)
@settings(max_examples=12, deadline=None)
@given(case=cases())
def test_sharded_equals_unsharded_bit_for_bit(group, case):
    events, probes, k = case
    whole = run_engine(group, events, [(u, t, i) for i, (u, t) in enumerate(probes)])
    assert bits(sharded(group, events, probes, k)) == bits(whole)


def test_large_magnitudes_elsewhere_change_no_bit():
    """An entity's sums restart at its first event, so another entity's huge values cannot reach them."""
    mine = [{**_event(f"m{i}", "user-1", at(i)), "amount": a} for i, a in enumerate([0.1, 0.2, 0.3, 1e-300, 7.77])]
    huge = [{**_event(f"h{i}", "user-2", at(i)), "amount": 1e300 / (i + 1)} for i in range(5)]
    probes = [("user-1", at(s), i) for i, s in enumerate(range(6))]
    alone, among = run_engine(basket, mine, probes), run_engine(basket, huge + mine, probes)
    assert bits(alone) == bits(among)


def _event(eid, user, ts):
    empty = dict.fromkeys(("amount", "qty", "cat", "flag", "paid_at", "day"))
    return {"event_id": eid, "user_id": user, "event_ts": ts, **empty}


# Through the lakehouse, on the demo's data -------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return demo_store(tmp_path_factory.mktemp("shards"), days=40, users=250)


def test_demo_training_set_is_the_same_in_any_number_of_shards(demo):
    store, tables = demo
    txn = tables["transactions"]
    spine = pa.table({"user_id": txn.column("user_id"), "event_ts": txn.column("event_ts")}).slice(0, 800)
    features = [f"{g.name}.{f.name}" for g in store.project.feature_groups for f in g.features]
    features = [f for f in features if f.split(".")[0] != "user_engagement"]  # one entity, no name twice
    one = store.get_training_set(spine, features, shards=1)
    for k in (8,):
        many = store.get_training_set(spine, features, shards=k)
        assert bits(many.table) == bits(one.table), k
        assert many.shards.shards == k and len(many.shards.tasks) <= k
    assert one.shards.shards == 1 and one.shards.workers == ["in-process"]


def test_demo_days_are_the_same_in_any_number_of_shards(demo):
    store, _ = demo
    days = [dt.date(2026, 1, 20) + dt.timedelta(days=i) for i in range(7)]
    for group in store.project.feature_groups:
        store.shards = 1
        one, snaps, report = compute_days(store, group, days)
        assert report.shards == 1 and one.num_rows > 0
        for k in (8,):
            store.shards = k
            many, snaps_k, report = compute_days(store, group, days)
            assert bits(many) == bits(one), (group.name, k)
            assert snaps_k == snaps and report.shards == k
    store.shards = None


def test_a_shard_opens_only_its_buckets_files(demo, monkeypatch):
    store, _ = demo
    table = store.lake.table("raw.transactions")
    assert bucket_field(table)[1:] == ("user_id", ENTITY_BUCKETS)
    opened = []
    real = shards_module.read_shard

    def counting(table, scan, row_filter, column, shard, shards):
        opened.append(len(shard_tasks(table, scan.plan_files(), shard, shards)[0]))
        return real(table, scan, row_filter, column, shard, shards)

    monkeypatch.setattr(shards_module, "read_shard", counting)
    spine = pa.table({"user_id": ["u00001", "u00002"], "event_ts": [at(0).replace(year=2026, month=2)] * 2})
    store.get_training_set(spine, ["user_transactions.txn_count_7d"], shards=1)
    store.get_training_set(spine, ["user_transactions.txn_count_7d"], shards=ENTITY_BUCKETS)
    whole, per_shard = opened[0], opened[1:]
    assert whole > ENTITY_BUCKETS and all(n * ENTITY_BUCKETS <= whole + ENTITY_BUCKETS for n in per_shard)
    assert sum(per_shard) <= whole  # no file read twice across the shards with probes


def test_shard_count_follows_the_memory_budget(demo, monkeypatch):
    store, _ = demo
    monkeypatch.setattr(shards_module, "MIN_SHARD_BYTES", 1)
    reads, _ = store.event_reads(
        [store.project.group("user_transactions")],
        pa.chunked_array([pa.array([at(0).replace(year=2026, month=2)], pa.timestamp("us", tz="UTC"))]),
        {},
    )
    group = [store.project.group("user_transactions")]
    rows = sum(r.rows(store.lake) for r in reads)
    need = rows * (shards_module.EVENT_BYTES + shards_module.FEATURE_BYTES * len(group[0].features))
    store.max_memory = need * 10 + shards_module.PROCESS_BYTES
    assert shards_module.shard_count(store, reads, group, 0) == 1
    store.max_memory = need // 3 + shards_module.PROCESS_BYTES
    assert shards_module.shard_count(store, reads, group, 0) == 4
    store.max_memory, store.shards = None, 2
    assert shards_module.shard_count(store, reads, group, 0) == 2
    store.shards = None
