"""The online store on every backend (SQLite, a real Redis server and a real Redis Cluster), the
sync and consistency."""

import dataclasses
import datetime as dt
import uuid

import pyarrow as pa
import pytest
import redis

from keel.dsl import Derived, Feature, FeatureGroup
from keel.features.materialize import backfill
from keel.online.consistency import check_consistency
from keel.online.redis_backend import RedisClusterOnlineStore, RedisOnlineStore
from keel.online.sqlite_backend import SqliteOnlineStore
from keel.online.store import (
    EXPIRED,
    MISSING,
    NULL,
    PRESENT,
    OnlineStoreError,
    record_name,
)
from keel.online.sync import sync_group
from keel.project import Project
from keel.store import FeatureStore
from tests.factories.features import HISTORY, START, at, event, land, online_groups

UTC = dt.UTC


def typed_group(payments) -> FeatureGroup:
    """One feature of every stored type: int, float, bool, string, timestamp, date."""
    return FeatureGroup(
        name="typed",
        entity=payments.entity,
        source=payments,
        ttl="2d",
        online=True,
        features=(
            Feature("n", "count", window="30d"),
            Feature("amount_sum", "sum", "amount", window="30d"),
            Feature("refund_last", "last", "is_refund", window="30d"),
            Feature("currency_last", "last", "currency", window="30d"),
            Feature("first_ts", "first", "event_ts", window="30d"),
            Derived("first_day", "CAST(first_ts AS DATE)", type="date"),
        ),
    )


@pytest.fixture(params=["sqlite", "redis", "redis-cluster"])
def online(request, tmp_path):
    if request.param == "sqlite":
        store = SqliteOnlineStore(tmp_path / "online.db")
    elif request.param == "redis":
        store = RedisOnlineStore(request.getfixturevalue("redis_url"), prefix=f"t{uuid.uuid4().hex[:8]}")
    else:
        url = request.getfixturevalue("redis_cluster_url")
        store = RedisClusterOnlineStore(url, prefix=f"t{uuid.uuid4().hex[:8]}")
    yield store
    store.close()


def project_of(payments, *groups: FeatureGroup) -> Project:
    return Project(name="t", sources=(payments,), start_date=START, feature_groups=groups)


def rows(group: FeatureGroup, records: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(records, schema=group.arrow_schema())


def typed_row(user: str, ts: dt.datetime, **values) -> dict:
    base = {
        "user_id": user,
        "feature_ts": ts,
        "n": 3,
        "amount_sum": 0.1 + 0.2,
        "refund_last": True,
        "currency_last": "EUR",
        "first_ts": dt.datetime(2026, 3, 1, 9, 30, 0, 123456, UTC),
        "first_day": dt.date(2026, 3, 1),
    }
    return {**base, **values}


NOW = dt.datetime(2026, 3, 10, 12, tzinfo=UTC)


def test_values_of_every_type_come_back_exactly_with_age_and_status(online, payments):
    typed = typed_group(payments)
    written = online.write(typed, rows(typed, [typed_row("ann", NOW - dt.timedelta(hours=2))]), now=NOW)
    assert written == 1
    store = FeatureStore(None, project_of(payments, typed), online)

    found = store.get_online_features(["ann", "nobody"], ["first_day", "n", "amount_sum", "currency_last"], now=NOW)

    assert found.features == ["first_day", "n", "amount_sum", "currency_last"]
    assert list(found.to_dict()) == ["user_id", "first_day", "n", "amount_sum", "currency_last"]
    assert found.values["amount_sum"] == [0.1 + 0.2, None]  # repr round-trips the last bit
    assert found.values["first_day"] == [dt.date(2026, 3, 1), None]
    assert found.values["n"] == [3, None]
    assert found.status["n"] == [PRESENT, MISSING]
    assert found.age_s["n"] == [7200.0, None]
    full = store.get_online_features(["ann"], ["typed.refund_last", "typed.first_ts"], now=NOW)
    assert full.values == {"refund_last": [True], "first_ts": [dt.datetime(2026, 3, 1, 9, 30, 0, 123456, UTC)]}
    table = full.to_table(with_status=True)
    assert table.column_names == [
        "user_id",
        "refund_last",
        "first_ts",
        "refund_last__age_s",
        "refund_last__status",
        "first_ts__age_s",
        "first_ts__status",
    ]


def test_an_older_value_never_replaces_a_newer_one_and_null_clears_a_field(online, payments):
    typed = typed_group(payments)
    newer, older = NOW - dt.timedelta(hours=1), NOW - dt.timedelta(hours=5)
    online.write(typed, rows(typed, [typed_row("ann", newer, n=5)]), now=NOW)

    assert online.write(typed, rows(typed, [typed_row("ann", older, n=1)]), now=NOW) == 0
    [[record]] = online.read([(typed, ["n"])], ["ann"])
    assert record.values == [5]

    # The same moment again replaces (a recomputed value), and a NULL removes the old value.
    assert online.write(typed, rows(typed, [typed_row("ann", newer, n=6, currency_last=None)]), now=NOW) == 1
    [[record]] = online.read([(typed, ["n", "currency_last"])], ["ann"])
    assert record.values == [6, None]
    store = FeatureStore(None, project_of(payments, typed), online)
    assert store.get_online_features(["ann"], ["currency_last"], now=NOW).status["currency_last"] == [NULL]


def test_expired_values_read_as_none_with_their_status_and_are_dropped_after_retention(online, payments):
    typed = typed_group(payments)  # ttl 2d; records kept one more TTL
    online.write(
        typed,
        rows(
            typed,
            [
                typed_row("fresh", NOW - dt.timedelta(days=2)),  # exactly the TTL old: still valid
                typed_row("stale", NOW - dt.timedelta(days=3)),
                typed_row("gone", NOW - dt.timedelta(days=4, seconds=1)),  # past retention: not stored
            ],
        ),
        now=NOW,
    )
    store = FeatureStore(None, project_of(payments, typed), online)
    found = store.get_online_features(["fresh", "stale", "gone"], ["n"], now=NOW)
    assert found.values["n"] == [3, None, None]
    assert found.status["n"] == [PRESENT, EXPIRED, MISSING]
    assert found.age_s["n"][1] == 3 * 86400


def test_clear_removes_one_groups_records_and_watermark_and_sample_draws_from_the_stored(online, payments):
    typed = typed_group(payments)
    other = dataclasses.replace(typed, name="other")
    users = [f"u{i:03d}" for i in range(40)]
    online.write(typed, rows(typed, [typed_row(u, NOW - dt.timedelta(hours=1)) for u in users]), now=NOW)
    online.write(other, rows(other, [typed_row("ann", NOW)]), now=NOW)
    online.set_sync_state(typed, 42)

    drawn = online.sample(typed, 10, seed=3)
    assert len(set(drawn)) == 10 and set(drawn) <= set(users) and drawn == online.sample(typed, 10, seed=3)
    assert sorted(online.sample(typed, 100)) == users  # every record, the watermark not among them
    assert online.sync_state(typed)["snapshot_id"] == 42

    assert online.clear(typed) == 40
    assert online.sample(typed, 100) == [] and online.sync_state(typed) is None
    assert online.read([(typed, ["n"])], users[:2]) == [[None, None]]
    assert online.sample(other, 5) == ["ann"]


def test_redis_keeps_one_hash_per_group_and_entity_with_an_expiry(redis_url, payments):
    typed = typed_group(payments)
    store = RedisOnlineStore(redis_url, prefix="layout")
    now = dt.datetime.now(UTC)
    store.write(typed, rows(typed, [typed_row("ann", now - dt.timedelta(hours=1), currency_last=None)]))
    client = redis.Redis.from_url(redis_url)
    key = f"layout:{record_name(typed)}:ann"
    fields = client.hgetall(key)
    assert fields[b"n"] == b"3" and fields[b"amount_sum"] == b"0.30000000000000004"
    assert b"currency_last" not in fields  # NULL: no field
    # Dropped one TTL after the value expires: 2d + 2d - 1h from now.
    assert abs(client.pttl(key) / 1000 - (4 * 86400 - 3600)) < 5
    store.close()
    client.close()


def test_redis_reads_survive_killed_connections_and_error_replies(redis_url, payments):
    typed = typed_group(payments)
    store = RedisOnlineStore(redis_url, prefix="conn")
    now = dt.datetime.now(UTC)
    store.write(typed, rows(typed, [typed_row(u, now - dt.timedelta(hours=1)) for u in ("ann", "bob")]))
    wanted = [(typed, ["n", "amount_sum"])]
    expected = store.read(wanted, ["ann", "bob"])
    client = redis.Redis.from_url(redis_url)
    # The server drops every client connection (as a restart does): the pooled one is stale.
    client.client_kill_filter(_type="normal", skipme=True)
    assert store.read(wanted, ["ann", "bob"]) == expected
    # An error reply in the middle of a batch: the read fails and the connection is not
    # reused with the rest of the replies unread.
    client.set(f"conn:{record_name(typed)}:eve", "not a hash")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        store.read(wanted, ["ann", "eve", "bob"])
    assert store.read(wanted, ["ann", "bob"]) == expected
    store.close()
    client.close()


def test_lookups_name_what_is_wrong(online, payments):
    spend, ratio = online_groups(payments)
    offline_only = dataclasses.replace(typed_group(payments), name="offline_only", online=False)
    store = FeatureStore(None, project_of(payments, spend, ratio, offline_only), online)
    with pytest.raises(OnlineStoreError, match="'offline_only' is not served online; declare it with online=True"):
        store.get_online_features(["ann"], ["offline_only.n"])
    with pytest.raises(OnlineStoreError, match="feature 'nope' is not declared"):
        store.get_online_features(["ann"], ["nope"])
    with pytest.raises(OnlineStoreError, match=r"entity_ids\[1\] = None is not a value for the key\(s\) user_id"):
        store.get_online_features(["ann", None], ["n_7d"])
    with pytest.raises(OnlineStoreError, match="must be a list of entity ids"):
        store.get_online_features("ann", ["n_7d"])
    with pytest.raises(OnlineStoreError, match="lack column.*feature_ts"):
        online.write(spend, pa.table({"user_id": ["ann"]}))


def test_an_unreachable_redis_is_named_with_the_fix(payments):
    store = RedisOnlineStore("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    with pytest.raises(OnlineStoreError, match=r"Redis at redis://127.0.0.1:1/0 is unreachable .*KEEL_REDIS_URL"):
        store.read([(typed_group(payments), ["n"])], ["ann"])


# Sync ----------------------------------------------------------------------------------------


@pytest.fixture
def synced(lake, payments, online):
    spend, ratio = online_groups(payments)
    store = FeatureStore(lake, project_of(payments, spend, ratio), online)
    land(lake, payments, HISTORY, "h")
    backfill(store, spend, START, START + dt.timedelta(days=9), "bf1")
    return store, spend, ratio


def test_sync_pushes_each_entitys_latest_row_then_only_what_changed(synced, lake, payments):
    store, spend, _ = synced
    now = at(10)
    first = sync_group(lake, store.online, spend, now=now)
    assert (first.mode, first.entities_changed, first.keys_written) == ("full", 2, 2)
    assert first.snapshot_id == lake.head(spend.table_name)
    found = store.get_online_features(["alice", "bob"], ["n_7d", "amount_7d"], now=now)
    # Latest rows are day 9's (feature_ts = its last microsecond): alice has a4 in (t - 7d, t], bob has b2.
    assert found.values == {"n_7d": [1, 1], "amount_7d": [20.0, 10.0]}
    assert found.age_s["n_7d"] == [pytest.approx(1e-6), pytest.approx(1e-6)]

    again = sync_group(lake, store.online, spend, now=now)
    assert (again.mode, again.keys_written) == ("up to date", 0)

    # A new event for carol only, backfilled for day 10: only days 10's entities are re-read.
    land(lake, payments, [event("c1", "carol", at(10, 8), 42.0)], "late")
    backfill(store, spend, START + dt.timedelta(days=10), START + dt.timedelta(days=10), "bf2")
    third = sync_group(lake, store.online, spend, now=at(11))
    assert third.mode == "incremental" and third.previous_snapshot_id == first.snapshot_id
    assert third.entities_changed == 3  # day 10 holds alice, bob (still within their windows) and carol
    assert store.get_online_features(["carol"], ["amount_7d"], now=at(11)).values == {"amount_7d": [42.0]}


def test_sync_never_puts_back_a_value_older_than_the_streams(synced, lake):
    store, spend, _ = synced
    stream_value = pa.Table.from_pylist(
        [
            {
                "user_id": "alice",
                "feature_ts": at(10, 6),
                "n_7d": 9,
                "amount_7d": 99.0,
                "last_amount": 1.0,
                "avg_7d": 11.0,
            }
        ],
        schema=spend.arrow_schema(),
    )
    store.online.write(spend, stream_value, now=at(10, 7))
    result = sync_group(lake, store.online, spend, now=at(10, 7))
    assert result.keys_written == 1  # bob only
    assert store.get_online_features(["alice"], ["n_7d"], now=at(10, 7)).values == {"n_7d": [9]}


def test_a_watermark_outside_mains_history_falls_back_to_a_full_sync(synced, lake):
    store, spend, _ = synced
    store.online.set_sync_state(spend, 123456789)
    result = sync_group(lake, store.online, spend, now=at(10))
    assert result.mode == "full" and result.keys_written == 2


def test_sync_refuses_groups_that_are_offline_or_unpublished(lake, payments, online):
    spend, _ = online_groups(payments)
    with pytest.raises(OnlineStoreError, match="no published table yet.*keel backfill spend"):
        sync_group(lake, online, spend)
    with pytest.raises(OnlineStoreError, match="is not online"):
        sync_group(lake, online, dataclasses.replace(spend, online=False))


def test_synced_values_equal_offline_and_a_corrupted_one_is_reported(synced, lake):
    store, spend, ratio = synced
    backfill(store, ratio, START, START + dt.timedelta(days=9), "bf-ratio")
    for group in (spend, ratio):
        sync_group(lake, store.online, group, now=at(10))

    report = check_consistency(store, store.online, sample=10)
    assert [(g.group, g.entities, g.compared) for g in report.groups] == [("spend", 2, 8), ("spend_ratio", 2, 2)]
    assert report.match_rate == 1.0 and not report.mismatches

    wrong = pa.Table.from_pylist(
        [
            {
                "user_id": "bob",
                "feature_ts": at(10, 1),
                "n_7d": 1,
                "amount_7d": 10.5,
                "last_amount": 10.0,
                "avg_7d": 10.5,
            }
        ],
        schema=spend.arrow_schema(),
    )
    store.online.write(spend, wrong, now=at(10))  # a later feature_ts than the synced day-9 row wins
    report = check_consistency(store, store.online, [spend], sample=10)
    assert report.matched == report.compared - 2
    assert {(m["entity"], m["feature"], m["online"], m["offline"]) for m in report.mismatches} == {
        ("bob", "amount_7d", 10.5, 10.0),
        ("bob", "avg_7d", 10.5, 10.0),
    }
