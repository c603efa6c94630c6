"""Training sets from the lakehouse, group tables, versions and the registry, on real Iceberg tables."""

import datetime as dt

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from keel.features import shards
from keel.features.materialize import audit_group, backfill, day_end, read_version, stage_days
from keel.features.registry import RegistryError, lineage, register, registered
from keel.project import Project
from keel.store import FeatureStore, TrainingSetError
from tests.factories.features import HISTORY, SPINE, START, at, event, groups_for, land, spine


@pytest.fixture
def project(payments) -> Project:
    spend, ratio = groups_for(payments)
    return Project(name="t", sources=(payments,), start_date=START, feature_groups=(spend, ratio))


@pytest.fixture
def store(lake, project) -> FeatureStore:
    return FeatureStore(lake, project)


def test_training_set_has_point_in_time_values_in_spine_order(store, lake, payments):
    land(lake, payments, HISTORY, "h")

    result = store.get_training_set(SPINE, ["spend.n_7d", "amount_7d", "last_amount", "avg_7d"])

    table = result.table
    assert table.column_names == ["user_id", "event_ts", "label", "n_7d", "amount_7d", "last_amount", "avg_7d"]
    assert table.column("label").to_pylist() == [1, 0, 0, 1, 0, 1]
    assert table.column("n_7d").to_pylist() == [3, 1, 1, 0, 0, 0]
    assert table.column("amount_7d").to_pylist() == [120.0, 10.0, 50.0, None, None, None]
    # a2 and a3 share an instant; the later event id, a3 (the refund: last_amount has no filter), is last.
    assert table.column("last_amount").to_pylist() == [5.0, 10.0, 50.0, None, None, None]
    assert result.snapshots == {payments.table_name: lake.head(payments.table_name)}


def test_events_after_every_spine_time_change_nothing(store, lake, payments):
    land(lake, payments, HISTORY, "h")
    before = store.get_training_set(SPINE, ["n_7d", "amount_7d", "last_amount", "big_spender"])
    latest = max(SPINE.column("event_ts").to_pylist())
    late = [
        event(f"late{i}", u, latest + dt.timedelta(minutes=1 + i), 999.0)
        for i, u in enumerate(["alice", "bob", "carol"] * 3)
    ]
    land(lake, payments, late, "late")

    after = store.get_training_set(SPINE, ["n_7d", "amount_7d", "last_amount", "big_spender"])

    assert after.snapshots != before.snapshots
    assert after.table == before.table


def test_as_of_reproduces_a_training_set_after_corrections(store, lake, payments):
    land(lake, payments, HISTORY, "h")
    first = store.get_training_set(SPINE, ["n_7d", "amount_7d"])
    land(lake, payments, [event("a0", "alice", at(2, 1), 1000.0)], "correction")  # before alice's first spine time
    changed = store.get_training_set(SPINE, ["n_7d", "amount_7d"])
    assert changed.table != first.table

    again = store.get_training_set(SPINE, ["n_7d", "amount_7d"], as_of=first)

    assert again.table == first.table
    assert again.snapshots == first.snapshots


def test_spine_from_pandas_parquet_and_csv_gives_the_same_rows(store, lake, payments, tmp_path):
    land(lake, payments, HISTORY, "h")
    expected = store.get_training_set(SPINE, ["n_7d", "amount_7d"]).table
    parquet, csv = tmp_path / "spine.parquet", tmp_path / "spine.csv"
    pq.write_table(SPINE, parquet)
    pacsv.write_csv(SPINE, csv)

    for given in (SPINE.to_pandas(), parquet, str(csv)):
        table = store.get_training_set(given, ["n_7d", "amount_7d"]).table
        assert table.column("n_7d") == expected.column("n_7d"), given
        assert table.column("amount_7d") == expected.column("amount_7d"), given
        assert table.column("user_id").to_pylist() == expected.column("user_id").to_pylist()


def test_only_the_partitions_the_windows_need_are_read(store, lake, payments, monkeypatch):
    land(lake, payments, HISTORY + [event("old", "alice", at(-40), 1.0)], "h")
    filters = []
    real_read = shards.read_shard

    def recording_read(table, scan, row_filter, *args):
        filters.append(str(row_filter))
        return real_read(table, scan, row_filter, *args)

    monkeypatch.setattr(shards, "read_shard", recording_read)
    one_day = spine([("alice", at(20), 0)])
    store.get_training_set(one_day, ["n_7d"])

    # 30 days back (the TTL, the longest span) from day 20, up to day 20.
    assert len(filters) == 1
    assert "2026-02-19" in filters[0] and "2026-03-21" in filters[0]


def test_bad_requests_name_the_problem(store, lake, payments):
    land(lake, payments, HISTORY, "h")
    with pytest.raises(TrainingSetError, match="feature 'nope' is not declared"):
        store.get_training_set(SPINE, ["nope"])
    with pytest.raises(TrainingSetError, match="has no feature 'nope'"):
        store.get_training_set(SPINE, ["spend.nope"])
    with pytest.raises(TrainingSetError, match="no timestamp column 'ts'"):
        store.get_training_set(SPINE, ["n_7d"], timestamp="ts")
    with pytest.raises(TrainingSetError, match="lacks the entity key column"):
        store.get_training_set(SPINE.drop_columns(["user_id"]), ["n_7d"])
    with pytest.raises(TrainingSetError, match="requested twice"):
        store.get_training_set(SPINE, ["n_7d", "spend.n_7d"])


def test_group_rows_equal_training_set_values_at_their_feature_ts(store, lake, payments, project):
    land(lake, payments, HISTORY, "h")
    spend = project.group("spend")
    write, report, snapshot = backfill(store, spend, START, START + dt.timedelta(days=10), "bf1")
    assert report.success and snapshot == lake.head(spend.table_name)

    table = lake.read(spend.table_name).sort_by([("feature_ts", "ascending"), ("user_id", "ascending")])
    assert table.num_rows == sum(write.entities_per_day.values()) > 0
    check = table.select(["user_id", "feature_ts"]).rename_columns(["user_id", "event_ts"])
    values = store.get_training_set(check, ["n_7d", "amount_7d", "last_amount", "avg_7d"]).table
    for name in ("n_7d", "amount_7d", "last_amount", "avg_7d"):
        assert table.column(name).to_pylist() == values.column(name).to_pylist(), name
    # Day 0's row for alice is as of the day's last microsecond.
    first = table.slice(0, 1).to_pylist()[0]
    assert first["feature_ts"] == day_end(START)


def test_backfilling_a_range_twice_leaves_identical_tables(store, lake, payments, project):
    land(lake, payments, HISTORY, "h")
    spend = project.group("spend")
    backfill(store, spend, START, START + dt.timedelta(days=9), "bf1")
    first = lake.read(spend.table_name).sort_by([("feature_ts", "ascending"), ("user_id", "ascending")])

    backfill(store, spend, START, START + dt.timedelta(days=9), "bf2")

    second = lake.read(spend.table_name).sort_by([("feature_ts", "ascending"), ("user_id", "ascending")])
    assert second == first
    assert lake.snapshots(spend.table_name)[-1].properties["keel.run_id"] == "bf2"


def test_a_changed_definition_needs_a_new_version_and_the_old_stays_readable(lake, payments):
    land(lake, payments, HISTORY, "h")
    v1, _ = groups_for(payments, version=1, window="7d")
    store1 = FeatureStore(lake, Project(name="t", sources=(payments,), start_date=START, feature_groups=(v1,)))
    backfill(store1, v1, START, START + dt.timedelta(days=9), "v1")
    old = lake.read(v1.table_name).sort_by([("feature_ts", "ascending"), ("user_id", "ascending")])

    changed, _ = groups_for(payments, version=1, window="3d")
    store2 = FeatureStore(lake, Project(name="t", sources=(payments,), start_date=START, feature_groups=(changed,)))
    with pytest.raises(RegistryError, match="bump its version to 2"):
        backfill(store2, changed, START, START + dt.timedelta(days=9), "v1-changed")

    v2, _ = groups_for(payments, version=2, window="3d")
    store3 = FeatureStore(lake, Project(name="t", sources=(payments,), start_date=START, feature_groups=(v2,)))
    backfill(store3, v2, START, START + dt.timedelta(days=9), "v2")

    new = lake.read(v2.table_name).sort_by([("feature_ts", "ascending"), ("user_id", "ascending")])
    assert new.column("n_7d") != old.column("n_7d")
    assert read_version(lake, v2, 1).sort_by([("feature_ts", "ascending"), ("user_id", "ascending")]) == old
    assert [r["version"] for r in registered(lake, "spend")] == [1, 2]


def test_a_day_covering_far_fewer_entities_fails_the_audit_and_main_stays(store, lake, payments, project):
    busy = [event(f"e{d}-{u}", f"u{u}", at(d, 10), 5.0) for d in range(6) for u in range(40)]
    quiet = [event("q1", "u1", at(40, 10), 5.0)]  # 34 days later: only u1 is within the TTL
    land(lake, payments, busy + quiet, "h")
    spend = project.group("spend")
    backfill(store, spend, START, START + dt.timedelta(days=5), "bf1")
    head = lake.head(spend.table_name)

    write = stage_days(store, spend, [START + dt.timedelta(days=40)], "bf-quiet")
    report = audit_group(lake, spend, write.staged)

    assert not report.success
    assert [o.expectation for o in report.failures] == ["expect_daily_row_count_to_be_between"]
    assert lake.head(spend.table_name) == head


def test_upstream_groups_register_first_and_lineage_follows_the_dag(store, lake, payments, project):
    ratio = project.group("spend_ratio")
    assert register(lake, project, ratio) is True
    assert register(lake, project, ratio) is False
    assert [r["group_name"] for r in registered(lake)] == ["spend", "spend_ratio"]

    info = lineage(project, "spend")
    assert info.sources == ["raw.payments"]
    assert info.downstream == ["spend_ratio"]
    assert lineage(project, "spend_ratio").upstream == ["spend"]
    assert lineage(project, "spend_ratio").sources == ["raw.payments"]
