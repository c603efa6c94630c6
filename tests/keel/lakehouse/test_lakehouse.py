"""The lakehouse on a real SQLite catalog: day partitions, snapshot stamps, rewrites, time travel, schema evolution."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from pyiceberg.expressions import AlwaysFalse
from pyiceberg.transforms import DayTransform, IdentityTransform

from keel.lakehouse import wap
from keel.lakehouse.tables import (
    PROP_CODE_VERSION,
    PROP_PARTITION,
    PROP_RUN_ID,
    PROP_SOURCE,
    Lakehouse,
    LakehouseError,
    day_filter,
    days_of,
    partition_label,
    replace_rows,
)
from tests.factories.payments import as_table, payment_rows

TABLE = "raw.payments"
D1, D2, D3 = dt.date(2026, 1, 5), dt.date(2026, 1, 6), dt.date(2026, 1, 7)
KEEL_PROPS = {PROP_RUN_ID, PROP_PARTITION, PROP_CODE_VERSION, PROP_SOURCE}


def write(lake: Lakehouse, name: str, data: pa.Table, run_id: str, *, source: str = "test") -> int:
    """Replace the days ``data`` covers, the way every keel writer does; returns main's new head."""
    days = days_of(data, "event_ts")
    replace_rows(lake.table(name), data, day_filter("event_ts", days), lake.snapshot_properties(source, days, run_id))
    return lake.head(name)


def ordered(data: pa.Table) -> list[dict]:
    return data.sort_by("event_id").to_pylist()


def event_ids(data: pa.Table) -> list[str]:
    return sorted(data.column("event_id").to_pylist())


# tables and partitioning


def test_event_table_is_partitioned_by_day_of_event_ts(lake, table):
    iceberg = lake.table(table)

    (field,) = iceberg.spec().fields
    assert isinstance(field.transform, DayTransform)
    assert field.name == "event_ts_day"
    assert iceberg.schema().find_column_name(field.source_id) == "event_ts"


def test_identity_partitioned_table(lake):
    schema = pa.schema([("source", pa.string()), ("reason", pa.string())])

    iceberg = lake.ensure_table("ops.quarantine", schema, identity_column="source")

    (field,) = iceberg.spec().fields
    assert isinstance(field.transform, IdentityTransform)
    assert iceberg.schema().find_column_name(field.source_id) == "source"


def test_rows_land_in_one_partition_per_day(lake, table, payments):
    data = as_table(payments, payment_rows(D1, 12) + payment_rows(D2, 5) + payment_rows(D3, 9))

    write(lake, table, data, "run-1")

    assert lake.partition_rows(table) == {D1: 12, D2: 5, D3: 9}
    files = lake.table(table).inspect.files()
    assert sorted(p["event_ts_day"] for p in files.column("partition").to_pylist()) == [D1, D2, D3]


def test_new_table_starts_with_one_empty_stamped_snapshot(lake, table, payments):
    (snap,) = lake.snapshots(table)

    assert snap.parent_id is None
    assert snap.properties == {
        PROP_RUN_ID: "create",
        PROP_PARTITION: "",
        PROP_CODE_VERSION: "test-sha",
        PROP_SOURCE: "create",
    }
    assert lake.head(table) == snap.snapshot_id
    assert lake.read(table).num_rows == 0
    empty = lake.read(table)
    assert empty.schema.names == payments.arrow_schema().names
    assert [f.nullable for f in empty.schema] == [f.nullable for f in payments.arrow_schema()]


def test_partition_rows_of_a_new_table_is_empty(lake, table):
    assert lake.partition_rows(table) == {}
    assert lake.partition_rows(table, snapshot_id=lake.head(table)) == {}


def test_ensure_table_twice_changes_nothing(lake, table, payments):
    before = lake.table(table).metadata

    lake.ensure_table(table, payments.arrow_schema(), day_column="event_ts")

    after = lake.table(table).metadata
    assert after.current_schema_id == before.current_schema_id
    assert [s.snapshot_id for s in after.snapshots] == [s.snapshot_id for s in before.snapshots]
    assert after.metadata_log == before.metadata_log


def test_tables_exists_and_head(lake, table, payments):
    lake.ensure_table("features.user_txn", pa.schema([("user_id", pa.string())]))

    assert lake.tables() == ["features.user_txn", "raw.payments"]
    assert lake.exists(table) and not lake.exists("raw.nothing")
    assert lake.head(table) == lake.table(table).current_snapshot().snapshot_id
    assert lake.head(table, branch="audit_missing") is None


def test_unknown_table_is_a_clear_error(lake, table):
    with pytest.raises(LakehouseError, match=r"table 'raw.refunds' does not exist yet .*--source refunds"):
        lake.read("raw.refunds")
    for call in (lambda: lake.head("raw.refunds"), lambda: lake.partition_rows("raw.refunds")):
        with pytest.raises(LakehouseError, match="'raw.refunds'"):
            call()


def test_lakehouse_from_env_uses_keel_home(keel_home):
    lake = Lakehouse.from_env()

    lake.ensure_table("raw.x", pa.schema([("a", pa.int64())]))

    assert lake.code_version == "test-sha"
    assert (keel_home / "catalog.db").is_file()
    assert any((keel_home / "warehouse").rglob("*.metadata.json"))


# snapshot stamps


def test_every_write_is_stamped_with_run_partition_code_and_source(lake, table, payments):
    write(lake, table, as_table(payments, payment_rows(D1, 4)), "run-1", source="ingest:payments")
    write(lake, table, as_table(payments, payment_rows(D1, 6) + payment_rows(D2, 3)), "run-2", source="backfill")
    write(lake, table, as_table(payments, payment_rows(D1, 2) + payment_rows(D3, 2)), "run-3", source="ingest:payments")

    snaps = lake.snapshots(table)

    stamped = [(s.properties[PROP_RUN_ID], s.properties[PROP_PARTITION], s.properties[PROP_SOURCE]) for s in snaps]
    # A rewrite of data already there is a delete then an append, both stamped.
    assert stamped == [
        ("create", "", "create"),
        ("run-1", "2026-01-05", "ingest:payments"),
        ("run-2", "2026-01-05..2026-01-06", "backfill"),
        ("run-2", "2026-01-05..2026-01-06", "backfill"),
        ("run-3", "2026-01-05,2026-01-07", "ingest:payments"),
        ("run-3", "2026-01-05,2026-01-07", "ingest:payments"),
    ]
    assert all(set(s.properties) == KEEL_PROPS for s in snaps)
    assert {s.properties[PROP_CODE_VERSION] for s in snaps} == {"test-sha"}
    assert [s.operation for s in snaps] == ["append", "append", "delete", "append", "delete", "append"]
    assert [s.parent_id for s in snaps[1:]] == [s.snapshot_id for s in snaps[:-1]]
    assert snaps[-1].snapshot_id == lake.head(table)
    assert all(a.committed_at <= b.committed_at for a, b in zip(snaps, snaps[1:], strict=False))
    assert all(s.committed_at.tzinfo is dt.UTC for s in snaps)


def test_published_staged_write_is_stamped(lake, table, payments):
    staged = wap.stage(
        lake,
        table,
        [as_table(payments, payment_rows(D2, 8))],
        run_id="dagster-run-7",
        source="ingest:payments",
        day_column="event_ts",
    )
    wap.publish(lake, staged)

    last = lake.snapshots(table)[-1]

    assert last.snapshot_id == staged.snapshot_id == lake.head(table)
    assert last.properties[PROP_RUN_ID] == "dagster-run-7"
    assert last.properties[PROP_PARTITION] == "2026-01-06"
    assert last.properties[PROP_CODE_VERSION] == "test-sha"
    assert last.properties[PROP_SOURCE] == "ingest:payments"


def test_code_version_comes_from_the_lakehouse(settings, payments):
    lake = Lakehouse(Lakehouse.from_settings(settings).catalog, code_version="4f2a9c1")
    lake.ensure_table(TABLE, payments.arrow_schema(), day_column="event_ts")

    write(lake, TABLE, as_table(payments, payment_rows(D1, 3)), "run-1")

    assert [s.properties[PROP_CODE_VERSION] for s in lake.snapshots(TABLE)] == ["4f2a9c1", "4f2a9c1"]


# rewriting partitions


def test_writing_the_same_partition_twice_leaves_one_copy(lake, table, payments):
    data = as_table(payments, payment_rows(D1, 30) + payment_rows(D2, 10))

    first = write(lake, table, data, "run-1")
    once = lake.read(table)
    second = write(lake, table, data, "run-1")
    twice = lake.read(table)

    assert second != first
    assert twice.num_rows == 40
    assert pc.count_distinct(twice.column("event_id")).as_py() == 40
    assert ordered(twice) == ordered(once) == ordered(data)
    assert lake.partition_rows(table) == {D1: 30, D2: 10}


def test_rewriting_a_partition_replaces_it_and_leaves_other_days(lake, table, payments):
    write(lake, table, as_table(payments, payment_rows(D1, 20) + payment_rows(D2, 10)), "run-1")

    write(lake, table, as_table(payments, payment_rows(D1, 5, prefix="v2", amount=500.0)), "run-2")

    now = lake.read(table)
    assert lake.partition_rows(table) == {D1: 5, D2: 10}
    on_d1 = now.filter(pc.equal(pc.cast(now.column("event_ts"), pa.date32()), pa.scalar(D1)))
    assert event_ids(on_d1) == [f"v2-2026-01-05-{i}" for i in range(5)]
    assert sorted(on_d1.column("amount").to_pylist()) == [500.0, 501.0, 502.0, 503.0, 504.0]
    assert event_ids(now) == sorted([f"v2-2026-01-05-{i}" for i in range(5)] + [f"p-2026-01-06-{i}" for i in range(10)])


def test_rewrite_keeps_rows_at_the_day_boundaries_in_their_day(lake, table, payments):
    def at(ts: dt.datetime, event_id: str) -> dict:
        return {**payment_rows(ts.date(), 1)[0], "event_id": event_id, "event_ts": ts}

    midnight = dt.datetime(2026, 1, 6, tzinfo=dt.UTC)
    rows = [
        at(midnight - dt.timedelta(microseconds=1), "last-of-d1"),
        at(midnight, "first-of-d2"),
        at(midnight + dt.timedelta(days=1) - dt.timedelta(microseconds=1), "last-of-d2"),
        at(midnight + dt.timedelta(days=1), "first-of-d3"),
    ]
    write(lake, table, as_table(payments, rows), "run-1")

    write(lake, table, as_table(payments, [at(midnight + dt.timedelta(hours=12), "noon-d2")]), "run-2")

    assert event_ids(lake.read(table)) == ["first-of-d3", "last-of-d1", "noon-d2"]
    assert lake.partition_rows(table) == {D1: 1, D2: 1, D3: 1}


# time travel


def test_read_at_the_previous_snapshot_returns_the_old_content(lake, table, payments):
    old = as_table(payments, payment_rows(D1, 10))
    old_head = write(lake, table, old, "run-1")
    write(lake, table, as_table(payments, payment_rows(D1, 3, prefix="new")), "run-2")

    assert ordered(lake.read(table, snapshot_id=old_head)) == ordered(old)
    assert event_ids(lake.read(table)) == [f"new-2026-01-05-{i}" for i in range(3)]
    assert lake.partition_rows(table, snapshot_id=old_head) == {D1: 10}
    assert lake.partition_rows(table) == {D1: 3}


def test_read_as_of_a_moment_returns_that_moments_content(lake, table, payments):
    created = lake.snapshots(table)[0].committed_at
    first = as_table(payments, payment_rows(D1, 10))
    write(lake, table, first, "run-1")
    after_first = dt.datetime.now(dt.UTC)
    write(lake, table, as_table(payments, payment_rows(D1, 4, prefix="second")), "run-2")
    snaps = lake.snapshots(table)
    first_at = snaps[1].committed_at
    assert snaps[2].committed_at > after_first >= first_at, "the second write must start after the first ended"

    assert lake.read(table, as_of=created).num_rows == 0
    assert ordered(lake.read(table, as_of=first_at)) == ordered(first)
    assert ordered(lake.read(table, as_of=after_first)) == ordered(first)
    assert ordered(lake.read(table, as_of=first_at.astimezone(dt.timezone(dt.timedelta(hours=-5))))) == ordered(first)
    assert event_ids(lake.read(table, as_of=dt.datetime.now(dt.UTC))) == [f"second-2026-01-05-{i}" for i in range(4)]


def test_read_as_of_a_published_snapshots_commit_time_returns_it(lake, table, payments):
    # What `keel tables NAME` lists as a snapshot's commit time must be a moment main held it.
    staged = wap.stage(
        lake, table, [as_table(payments, payment_rows(D1, 6))], run_id="r1", source="test", day_column="event_ts"
    )
    wap.publish(lake, staged)

    published = lake.snapshots(table)[-1]

    assert published.snapshot_id == staged.snapshot_id
    assert lake.read(table, as_of=published.committed_at).num_rows == 6


def test_read_as_of_before_the_table_existed_is_a_clear_error(lake, table):
    before = lake.snapshots(table)[0].committed_at - dt.timedelta(days=1)

    with pytest.raises(LakehouseError) as caught:
        lake.read(table, as_of=before)

    assert str(caught.value) == (
        f"table 'raw.payments' has no snapshot as of {before.isoformat()} (it did not exist yet, or the snapshots "
        "of that time have expired; see 'keel tables raw.payments' for the snapshots kept)"
    )


def test_read_as_of_a_naive_datetime_is_a_clear_error(lake, table):
    naive = dt.datetime(2026, 1, 5, 12, 0)

    with pytest.raises(LakehouseError) as caught:
        lake.read(table, as_of=naive)

    message = str(caught.value)
    assert "'raw.payments'" in message
    assert "as_of=datetime.datetime(2026, 1, 5, 12, 0) has no time zone" in message
    assert "aware UTC datetime" in message


def test_read_of_an_unknown_snapshot_is_a_clear_error(lake, table):
    with pytest.raises(LakehouseError, match=r"table 'raw.payments' has no snapshot 12345 \(expired or never existed"):
        lake.read(table, snapshot_id=12345)


def test_read_of_an_unknown_branch_names_it_and_the_branches_there_are(lake, table, payments):
    wap.stage(lake, table, [as_table(payments, payment_rows(D1, 2))], run_id="r1", source="test", day_column="event_ts")

    with pytest.raises(LakehouseError) as caught:
        lake.read(table, branch="audit_r2")

    assert str(caught.value) == "table 'raw.payments' has no branch 'audit_r2' (branches: ['audit_r1', 'main'])"


def test_read_takes_one_point_in_time_only(lake, table):
    head = lake.head(table)

    with pytest.raises(LakehouseError, match="at most one of snapshot_id, as_of and branch"):
        lake.read(table, snapshot_id=head, branch="main")
    with pytest.raises(LakehouseError, match="at most one of snapshot_id, as_of and branch"):
        lake.read(table, snapshot_id=head, as_of=dt.datetime.now(dt.UTC))


def test_read_a_branch_filter_columns_and_limit(lake, table, payments):
    write(lake, table, as_table(payments, payment_rows(D1, 10) + payment_rows(D2, 10)), "run-1")
    staged = wap.stage(
        lake,
        table,
        [as_table(payments, payment_rows(D3, 7))],
        run_id="r9",
        source="test",
        day_column="event_ts",
    )

    assert lake.read(table, branch=staged.branch).num_rows == 27
    assert lake.read(table, branch="main").num_rows == 20
    only_d2 = lake.read(table, row_filter=day_filter("event_ts", [D2]), columns=["event_id", "amount"])
    assert only_d2.column_names == ["event_id", "amount"]
    assert event_ids(only_d2) == sorted(f"p-2026-01-06-{i}" for i in range(10))
    assert lake.read(table, row_filter="amount >= 18.0").num_rows == 4
    assert lake.read(table, limit=3).num_rows == 3


# schema evolution


def test_added_column_keeps_old_snapshots_readable_and_new_writes_carry_it(lake, table, payments):
    old_rows = as_table(payments, payment_rows(D1, 8))
    old_head = write(lake, table, old_rows, "run-1")
    old_columns = payments.arrow_schema().names
    wider = payments.arrow_schema().append(pa.field("channel", pa.string(), nullable=True))

    evolved = lake.ensure_table(table, wider, day_column="event_ts")

    assert evolved.schema().column_names == [*old_columns, "channel"]
    assert lake.head(table) == old_head, "adding a column writes no data"
    new_rows = pa.Table.from_pylist([{**r, "channel": "web"} for r in payment_rows(D2, 5, prefix="w")], schema=wider)
    write(lake, table, new_rows, "run-2")

    at_old = lake.read(table, snapshot_id=old_head)
    assert at_old.column_names == old_columns
    assert ordered(at_old) == ordered(old_rows)
    now = lake.read(table).sort_by("event_id")
    assert now.column_names == [*old_columns, "channel"]
    assert now.num_rows == 13
    channel_by_id = dict(zip(now.column("event_id").to_pylist(), now.column("channel").to_pylist(), strict=True))
    assert {k: v for k, v in channel_by_id.items() if k.startswith("w-")} == {
        f"w-2026-01-06-{i}": "web" for i in range(5)
    }
    assert {v for k, v in channel_by_id.items() if k.startswith("p-")} == {None}
    assert lake.read(table, snapshot_id=old_head, columns=["event_id"]).num_rows == 8


def test_added_column_shows_at_mains_head_before_the_next_write(lake, table, payments):
    before = write(lake, table, as_table(payments, payment_rows(D1, 4)), "run-1")
    wider = payments.arrow_schema().append(pa.field("channel", pa.string()))

    lake.ensure_table(table, wider, day_column="event_ts")

    assert lake.head(table) == before
    now = lake.read(table)
    assert now.column_names == wider.names
    assert now.column("channel").to_pylist() == [None] * 4
    assert lake.read(table, columns=["event_id", "channel"]).num_rows == 4
    assert "channel" not in lake.read(table, snapshot_id=before).column_names


def test_new_columns_must_be_nullable(lake, table, payments):
    wider = payments.arrow_schema().append(pa.field("merchant", pa.string(), nullable=False))

    with pytest.raises(LakehouseError, match=r"table 'raw.payments': new column 'merchant' is required .*nullable"):
        lake.ensure_table(table, wider, day_column="event_ts")

    assert "merchant" not in lake.table(table).schema().column_names


def test_empty_read_of_an_evolved_table_uses_the_snapshots_schema(lake, table, payments):
    created = lake.head(table)
    wider = payments.arrow_schema().append(pa.field("channel", pa.string()))
    lake.ensure_table(table, wider, day_column="event_ts")

    assert lake.read(table, snapshot_id=created).schema.names == payments.arrow_schema().names
    assert lake.read(table).schema.names == wider.names


# helpers


def test_day_filter_merges_consecutive_days(lake, table, payments):
    write(lake, table, as_table(payments, [r for d in (D1, D2, D3) for r in payment_rows(d, 3)]), "run-1")

    assert day_filter("event_ts", []) == AlwaysFalse()
    assert str(day_filter("event_ts", [D3, D1, D2])).count("GreaterThanOrEqual") == 1
    assert str(day_filter("event_ts", [D1, D3])).count("GreaterThanOrEqual") == 2
    for days in ([D1], [D1, D3], [D2, D3], [D1, D2, D3]):
        got = lake.read(table, row_filter=day_filter("event_ts", days))
        assert days_of(got, "event_ts") == days


def test_partition_label():
    assert partition_label([]) == ""
    assert partition_label([D2, D2]) == "2026-01-06"
    assert partition_label([D3, D1, D2]) == "2026-01-05..2026-01-07"
    assert partition_label([D3, D1]) == "2026-01-05,2026-01-07"


def test_days_of_is_utc(payments):
    late_in_new_york = dt.datetime(2026, 1, 5, 23, 30, tzinfo=dt.timezone(dt.timedelta(hours=-5)))
    data = pa.table({"event_ts": pa.array([late_in_new_york], pa.timestamp("us", tz="America/New_York"))})

    assert days_of(data, "event_ts") == [D2]
    assert days_of(data.slice(0, 0), "event_ts") == []


def test_a_table_gains_the_entity_bucket_partition_and_keeps_its_files_readable(lake, payments):
    """A partition-spec evolution: files written before it are read by every shard (their bucket is
    unknown) and filtered by key; files written after it carry their bucket and are read by its shard only."""
    from keel.lakehouse.buckets import ENTITY_BUCKETS, bucket_field, read_shard, shard_of, shard_tasks

    before = as_table(payments, payment_rows(D1, 40, prefix="old"))
    lake.ensure_table(TABLE, payments.arrow_schema(), day_column="event_ts")
    write(lake, TABLE, before, "r1")
    assert bucket_field(lake.table(TABLE)) is None

    lake.ensure_table(TABLE, payments.arrow_schema(), day_column="event_ts", bucket_column="user_id")
    table = lake.table(TABLE)
    assert bucket_field(table)[1:] == ("user_id", ENTITY_BUCKETS)
    assert bucket_field(table, table.spec().spec_id - 1) is None  # the day spec the old files keep
    after = as_table(payments, payment_rows(D2, 40, prefix="new"))
    write(lake, TABLE, after, "r2")
    assert ordered(lake.read(TABLE)) == ordered(pa.concat_tables([before, after]))

    table = lake.table(TABLE)
    everything = pa.concat_tables([before, after])
    for shards in (1, 2, 4, 8, 16):
        got = []
        for shard in range(shards):
            scan = table.scan()
            tasks, exact = shard_tasks(table, scan.plan_files(), shard, shards)
            old_files = [t for t in tasks if t.file.spec_id != table.spec().spec_id]
            assert len(old_files) == 1 and not exact  # the old day's one file, read by every shard
            part = read_shard(table, scan, scan.row_filter, "user_id", shard, shards)
            assert set(shard_of(part.column("user_id"), shards).tolist()) <= {shard}
            got.append(part)
        assert ordered(pa.concat_tables(got)) == ordered(everything), shards
