"""Write-audit-publish on real Iceberg branches: staging, fast-forward publish, conflicts, crashes and reruns."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from keel.lakehouse import wap
from keel.lakehouse.tables import PROP_BASE_SNAPSHOT, PROP_RUN_ID, Lakehouse, LakehouseError, day_filter
from tests.factories.payments import as_table, payment_rows

TABLE = "raw.payments"
D1, D2, D3 = dt.date(2026, 1, 5), dt.date(2026, 1, 6), dt.date(2026, 1, 7)


def stage(lake, chunks, run_id, **kwargs) -> wap.StagedWrite:
    return wap.stage(lake, TABLE, chunks, run_id=run_id, source="ingest:payments", day_column="event_ts", **kwargs)


def stage_and_publish(lake, chunks, run_id, **kwargs) -> int:
    return wap.publish(lake, stage(lake, chunks, run_id, **kwargs))


def ordered(data: pa.Table) -> list[dict]:
    return data.sort_by("event_id").to_pylist()


def assert_one_copy_each(data: pa.Table, expected_ids: set[str]) -> None:
    assert data.num_rows == len(expected_ids)
    assert pc.count_distinct(data.column("event_id")).as_py() == len(expected_ids)
    assert set(data.column("event_id").to_pylist()) == expected_ids


def ids(day: dt.date, n: int, prefix: str = "p") -> set[str]:
    return {f"{prefix}-{day.isoformat()}-{i}" for i in range(n)}


# stage


def test_stage_writes_to_the_runs_audit_branch_and_leaves_main_alone(lake, table, payments):
    stage_and_publish(lake, [as_table(payments, payment_rows(D1, 10))], "earlier")
    main_before = lake.head(table)
    main_rows = ordered(lake.read(table))
    new = as_table(payments, payment_rows(D2, 12))

    staged = stage(lake, [new], "run-42")

    assert staged.branch == "audit_run-42"
    assert staged.table == table and staged.run_id == "run-42"
    assert staged.base_snapshot_id == main_before
    assert staged.days == (D2,) and staged.partition == "2026-01-06"
    assert staged.rows == 12
    assert lake.head(table, staged.branch) == staged.snapshot_id != main_before
    assert lake.head(table) == main_before
    assert ordered(lake.read(table)) == main_rows
    on_branch = lake.read(table, branch=staged.branch)
    assert on_branch.num_rows == 22
    assert ordered(lake.read(table, branch=staged.branch, row_filter=day_filter("event_ts", [D2]))) == ordered(new)
    branch_snap = lake.table(table).snapshot_by_id(staged.snapshot_id)
    props = branch_snap.summary.additional_properties
    assert props[PROP_RUN_ID] == "run-42"
    assert props[PROP_BASE_SNAPSHOT] == str(main_before)


def test_branch_names_are_tame(lake, table, payments):
    assert wap.branch_name("0b7f-33aa_x") == "audit_0b7f-33aa_x"
    assert wap.branch_name("manual/backfill 2026:01") == "audit_manual_backfill_2026_01"

    staged = stage(lake, [as_table(payments, payment_rows(D1, 2))], "manual/backfill 2026:01")

    assert staged.branch in lake.table(table).refs()


def test_stage_one_commit_per_chunk_each_replacing_its_days(lake, table, payments):
    stage_and_publish(lake, [as_table(payments, payment_rows(D1, 9) + payment_rows(D2, 9))], "earlier")
    base = lake.head(table)
    chunks = [as_table(payments, payment_rows(D1, 4, prefix="a")), as_table(payments, payment_rows(D3, 6, prefix="b"))]

    staged = stage(lake, chunks, "run-1")

    assert staged.days == (D1, D3) and staged.rows == 10
    assert lake.partition_rows(table, snapshot_id=staged.snapshot_id) == {D1: 4, D2: 9, D3: 6}
    iceberg = lake.table(table)
    own = []
    snap = iceberg.snapshot_by_id(staged.snapshot_id)
    while snap.snapshot_id != base:
        own.append(snap.summary.additional_properties["keel.partition"])
        snap = iceberg.snapshot_by_id(snap.parent_snapshot_id)
    # D1 already held rows, so its replacement is a delete then an append; D3 is a plain append.
    assert own == ["2026-01-07", "2026-01-05", "2026-01-05"]


def test_listed_days_without_rows_are_emptied(lake, table, payments):
    stage_and_publish(lake, [as_table(payments, payment_rows(D1, 5) + payment_rows(D2, 5))], "earlier")

    staged = stage(lake, [as_table(payments, payment_rows(D1, 3, prefix="n"))], "run-1", days=[D1, D2])
    wap.publish(lake, staged)

    assert staged.days == (D1, D2) and staged.rows == 3
    assert lake.partition_rows(table) == {D1: 3}
    assert set(lake.read(table).column("event_id").to_pylist()) == ids(D1, 3, "n")


def test_staging_nothing_is_an_error_and_leaves_no_branch(lake, table, payments):
    with pytest.raises(LakehouseError, match=r"stage 'raw.payments': nothing was written"):
        stage(lake, [as_table(payments, [])], "run-empty")

    assert "audit_run-empty" not in lake.table(table).refs()


def test_a_day_split_over_two_chunks_is_refused(lake, table, payments):
    rows = payment_rows(D1, 6)

    with pytest.raises(LakehouseError, match=r"day\(s\) 2026-01-05 appear in two chunks"):
        stage(lake, [as_table(payments, rows[:3]), as_table(payments, rows[3:])], "run-1")


def test_chunks_are_conformed_to_the_table_schema(lake, table, payments):
    rows = payment_rows(D1, 5)
    shuffled = pa.Table.from_pylist(
        [{k: r[k] for k in ("amount", "event_ts", "event_id", "is_refund", "currency", "user_id")} for r in rows]
    )

    staged = stage(lake, [shuffled], "run-1")

    got = lake.read(table, branch=staged.branch).sort_by("event_id")
    assert got.column_names == payments.arrow_schema().names
    assert got.column("items").to_pylist() == [None] * 5
    assert got.column("amount").to_pylist() == [r["amount"] for r in rows]


def test_a_chunk_without_a_required_column_is_refused(lake, table, payments):
    data = as_table(payments, payment_rows(D1, 3)).drop_columns(["currency"])

    with pytest.raises(LakehouseError, match="data lacks required column 'currency'"):
        stage(lake, [data], "run-1")


def test_bad_mode_or_merge_without_key_is_refused(lake, table, payments):
    data = [as_table(payments, payment_rows(D1, 2))]

    with pytest.raises(ValueError, match=r"stage 'raw.payments': mode 'upsert' is not known"):
        stage(lake, data, "run-1", mode="upsert")
    with pytest.raises(ValueError, match=r"mode 'merge' needs the key column"):
        stage(lake, data, "run-1", mode="merge")
    assert "audit_run-1" not in lake.table(table).refs()


def test_staging_the_same_run_twice_does_not_double_data(lake, table, payments):
    data = [as_table(payments, payment_rows(D1, 20)), as_table(payments, payment_rows(D2, 7))]

    first = stage(lake, data, "run-1")
    second = stage(lake, data, "run-1")

    assert second.snapshot_id != first.snapshot_id
    assert second.base_snapshot_id == first.base_snapshot_id
    assert_one_copy_each(lake.read(table, branch="audit_run-1"), ids(D1, 20) | ids(D2, 7))
    branches = [r for r in lake.table(table).refs() if r.startswith("audit_")]
    assert branches == ["audit_run-1"]
    wap.publish(lake, second)
    assert_one_copy_each(lake.read(table), ids(D1, 20) | ids(D2, 7))


# publish


def test_publish_fast_forwards_main_to_the_branch(lake, table, payments):
    stage_and_publish(lake, [as_table(payments, payment_rows(D1, 10))], "earlier")
    main_before = lake.head(table)
    staged = stage(lake, [as_table(payments, payment_rows(D2, 15))], "run-1")
    branch_content = ordered(lake.read(table, branch=staged.branch))

    new_head = wap.publish(lake, staged)

    assert new_head == staged.snapshot_id == lake.head(table)
    assert ordered(lake.read(table)) == branch_content
    assert lake.table(table).snapshot_by_id(new_head).parent_snapshot_id == main_before
    assert "audit_run-1" not in lake.table(table).refs()
    assert lake.partition_rows(table) == {D1: 10, D2: 15}


def test_publish_when_main_moved_meanwhile_is_a_conflict(lake, table, payments):
    base = lake.head(table)
    mine = stage(lake, [as_table(payments, payment_rows(D1, 10, prefix="mine"))], "run-mine")
    theirs = stage(lake, [as_table(payments, payment_rows(D1, 4, prefix="theirs"))], "run-theirs")
    wap.publish(lake, theirs)

    with pytest.raises(wap.PublishConflict) as caught:
        wap.publish(lake, mine)

    assert str(caught.value) == (
        f"table 'raw.payments': main moved to snapshot {theirs.snapshot_id} after run 'run-mine' staged "
        f"on {base}; publishing would discard that write. Stage the run again on the new head (rerun it); "
        "branch 'audit_run-mine' is kept for inspection"
    )
    assert isinstance(caught.value, LakehouseError)
    assert lake.head(table) == theirs.snapshot_id
    assert_one_copy_each(lake.read(table), ids(D1, 4, "theirs"))
    assert lake.head(table, "audit_run-mine") == mine.snapshot_id


def test_conflict_on_other_days_too_then_restaging_keeps_both_writes(lake, table, payments):
    mine_data = [as_table(payments, payment_rows(D2, 6, prefix="mine"))]
    mine = stage(lake, mine_data, "run-mine")
    stage_and_publish(lake, [as_table(payments, payment_rows(D1, 4, prefix="theirs"))], "run-theirs")

    with pytest.raises(wap.PublishConflict):
        wap.publish(lake, mine)
    wap.publish(lake, stage(lake, mine_data, "run-mine"))

    assert_one_copy_each(lake.read(table), ids(D1, 4, "theirs") | ids(D2, 6, "mine"))


class RacingLakehouse(Lakehouse):
    """A lakehouse where another run publishes right after this one reads main's head."""

    def __init__(self, lake: Lakehouse, rival: wap.StagedWrite) -> None:
        super().__init__(lake.catalog, lake.code_version)
        self.rival: wap.StagedWrite | None = rival

    def head(self, name: str, branch: str = "main") -> int | None:
        head = super().head(name, branch)
        if branch == "main" and self.rival is not None:
            rival, self.rival = self.rival, None
            wap.publish(Lakehouse(self.catalog, self.code_version), rival)
        return head


def test_a_writer_landing_between_check_and_commit_is_a_conflict(lake, table, payments):
    mine = stage(lake, [as_table(payments, payment_rows(D1, 5, prefix="mine"))], "run-mine")
    theirs = stage(lake, [as_table(payments, payment_rows(D1, 3, prefix="theirs"))], "run-theirs")
    racing = RacingLakehouse(lake, rival=theirs)

    with pytest.raises(wap.PublishConflict, match=r"main changed while run 'run-mine' was publishing"):
        wap.publish(racing, mine)

    assert racing.rival is None, "the rival must have published during the check"
    assert lake.head(table) == theirs.snapshot_id
    assert_one_copy_each(lake.read(table), ids(D1, 3, "theirs"))
    assert lake.head(table, "audit_run-mine") == mine.snapshot_id


def test_publishing_a_restaged_or_discarded_branch_is_refused(lake, table, payments):
    data = [as_table(payments, payment_rows(D1, 3))]
    old = stage(lake, data, "run-1")
    stage(lake, data, "run-1")

    with pytest.raises(LakehouseError, match=r"no longer points at the staged snapshot .*stage the run again"):
        wap.publish(lake, old)

    assert wap.discard(lake, table, "run-1") is True
    with pytest.raises(LakehouseError, match=rf"branch 'audit_run-1' no longer points at .* {old.snapshot_id}"):
        wap.publish(lake, old)
    assert lake.read(table).num_rows == 0


def test_publishing_twice_is_refused(lake, table, payments):
    staged = stage(lake, [as_table(payments, payment_rows(D1, 3))], "run-1")
    wap.publish(lake, staged)

    with pytest.raises(LakehouseError, match="no longer points at the staged snapshot"):
        wap.publish(lake, staged)

    assert_one_copy_each(lake.read(table), ids(D1, 3))


# merge


def test_merge_keeps_the_days_other_rows_and_upserts_by_key(lake, table, payments):
    stage_and_publish(lake, [as_table(payments, payment_rows(D1, 10) + payment_rows(D2, 10))], "earlier")
    updates = as_table(payments, payment_rows(D1, 15, amount=100.0)[5:])

    staged = stage(lake, [updates], "run-merge", mode="merge", key="event_id")
    wap.publish(lake, staged)

    assert staged.days == (D1,) and staged.rows == 15
    now = lake.read(table)
    assert_one_copy_each(now, ids(D1, 15) | ids(D2, 10))
    amounts = dict(zip(now.column("event_id").to_pylist(), now.column("amount").to_pylist(), strict=True))
    assert [amounts[f"p-2026-01-05-{i}"] for i in range(15)] == [10.0 + i for i in range(5)] + [
        100.0 + i for i in range(5, 15)
    ]
    assert [amounts[f"p-2026-01-06-{i}"] for i in range(10)] == [10.0 + i for i in range(10)]
    assert lake.partition_rows(table) == {D1: 15, D2: 10}


def test_merge_of_the_same_input_twice_is_idempotent(lake, table, payments):
    stage_and_publish(lake, [as_table(payments, payment_rows(D1, 8, prefix="old"))], "earlier")
    batch = [as_table(payments, payment_rows(D1, 6))]

    stage_and_publish(lake, batch, "run-1", mode="merge", key="event_id")
    once = ordered(lake.read(table))
    stage_and_publish(lake, batch, "run-2", mode="merge", key="event_id")

    assert ordered(lake.read(table)) == once
    assert_one_copy_each(lake.read(table), ids(D1, 8, "old") | ids(D1, 6))


def test_merge_into_an_empty_table(lake, table, payments):
    staged = stage(lake, [as_table(payments, payment_rows(D3, 4))], "run-1", mode="merge", key="event_id")
    wap.publish(lake, staged)

    assert_one_copy_each(lake.read(table), ids(D3, 4))


# discard and recovery


def test_discard_removes_the_branch(lake, table, payments):
    stage(lake, [as_table(payments, payment_rows(D1, 3))], "run-1")
    main = lake.head(table)

    assert wap.discard(lake, table, "run-1") is True
    assert wap.discard(lake, table, "run-1") is False
    assert list(lake.table(table).refs()) == ["main"]
    assert lake.head(table) == main
    with pytest.raises(LakehouseError, match="has no branch 'audit_run-1'"):
        lake.read(table, branch="audit_run-1")


def test_find_staged_recovers_the_staged_write(lake, table, payments):
    stage_and_publish(lake, [as_table(payments, payment_rows(D1, 5))], "earlier")
    chunks = [
        as_table(payments, payment_rows(D1, 7, prefix="x")),
        as_table(payments, payment_rows(D2, 3)),
        as_table(payments, payment_rows(D3, 11)),
    ]
    staged = stage(lake, chunks, "dagster-1f2e")

    found = wap.find_staged(Lakehouse(lake.catalog, "another-process"), table, "dagster-1f2e")

    assert found == staged
    assert found.days == (D1, D2, D3) and found.rows == 21 and found.partition == "2026-01-05..2026-01-07"
    wap.publish(lake, found)
    assert lake.partition_rows(table) == {D1: 7, D2: 3, D3: 11}


def test_find_staged_after_a_restage_sees_only_the_new_write(lake, table, payments):
    stage(lake, [as_table(payments, payment_rows(D1, 4)), as_table(payments, payment_rows(D2, 4))], "run-1")
    again = stage(lake, [as_table(payments, payment_rows(D3, 2))], "run-1")

    found = wap.find_staged(lake, table, "run-1")

    assert found == again
    assert found.days == (D3,) and found.rows == 2


def test_find_staged_of_a_merge_over_listed_days(lake, table, payments):
    stage_and_publish(lake, [as_table(payments, payment_rows(D1, 6) + payment_rows(D2, 2))], "earlier")
    staged = stage(
        lake, [as_table(payments, payment_rows(D1, 9)[3:])], "run-1", mode="merge", key="event_id", days=[D1, D2]
    )

    found = wap.find_staged(lake, table, "run-1")

    assert found == staged
    # A merge of no rows into a listed day keeps that day's rows: only 'replace' empties it.
    assert found.days == (D1, D2) and found.rows == 9 + 2
    wap.publish(lake, found)
    assert lake.partition_rows(table) == {D1: 9, D2: 2}


def test_find_staged_without_a_branch_is_a_clear_error(lake, table, payments):
    staged = stage(lake, [as_table(payments, payment_rows(D1, 3))], "run-1")
    wap.publish(lake, staged)

    with pytest.raises(LakehouseError) as caught:
        wap.find_staged(lake, table, "run-1")

    assert str(caught.value) == (
        "table 'raw.payments' has no branch 'audit_run-1': run 'run-1' staged nothing "
        "(or it was published or discarded already)"
    )


def test_find_staged_after_main_moved_still_finds_the_write_and_publish_conflicts(lake, table, payments):
    mine = stage(lake, [as_table(payments, payment_rows(D2, 5))], "run-mine")
    stage_and_publish(lake, [as_table(payments, payment_rows(D1, 5))], "run-theirs")

    found = wap.find_staged(lake, table, "run-mine")

    assert found == mine
    with pytest.raises(wap.PublishConflict):
        wap.publish(lake, found)


# crashes and reruns


class SimulatedCrash(BaseException):
    """The process dies: nothing catches it and no step after it runs."""


def crash_while_staging(lake, chunks: list[pa.Table], run_id: str, crash: str, **kwargs) -> None:
    """Stage, and die before publishing ('after-stage') or after the first chunk's commit ('mid-stage')."""

    def dying_chunks():
        yield chunks[0]
        raise SimulatedCrash

    if crash == "after-stage":
        stage(lake, chunks, run_id, **kwargs)
    else:
        with pytest.raises(SimulatedCrash):
            stage(lake, dying_chunks(), run_id, **kwargs)


def assert_rerun_leaves_one_copy(lake, chunks, rerun_id: str, **kwargs) -> None:
    wap.publish(lake, stage(lake, chunks, rerun_id, **kwargs))

    final = lake.read(TABLE)
    assert_one_copy_each(final, ids(D1, 40) | ids(D2, 25) | ids(D3, 9, "kept"))
    assert lake.partition_rows(TABLE) == {D1: 40, D2: 25, D3: 9}
    if rerun_id == "run-1":
        assert [r for r in lake.table(TABLE).refs() if r.startswith("audit_")] == []
    else:
        # The dead run's branch is stale: it can no longer be published over the rerun's write.
        stale = wap.find_staged(lake, TABLE, "run-1")
        with pytest.raises(wap.PublishConflict):
            wap.publish(lake, stale)
        assert lake.read(TABLE).num_rows == 74


@pytest.fixture
def crash_input(lake, table, payments) -> list[pa.Table]:
    """Main holds another day already; the input covers two new days."""
    stage_and_publish(lake, [as_table(payments, payment_rows(D3, 9, prefix="kept"))], "earlier")
    return [as_table(payments, payment_rows(D1, 40)), as_table(payments, payment_rows(D2, 25))]


@pytest.mark.parametrize("mode", [{"mode": "replace"}, {"mode": "merge", "key": "event_id"}], ids=["replace", "merge"])
@pytest.mark.parametrize("rerun_id", ["run-1", "run-2"])
@pytest.mark.parametrize("crash", ["after-stage", "mid-stage"])
def test_rerun_after_a_crash_before_publish_leaves_one_copy_of_each_row(
    lake, table, crash_input, crash, rerun_id, mode
):
    main_before = lake.head(table)
    kept = ordered(lake.read(table))

    crash_while_staging(Lakehouse(lake.catalog, lake.code_version), crash_input, "run-1", crash, **mode)

    assert lake.read(table, branch="audit_run-1").num_rows == 9 + (65 if crash == "after-stage" else 40)
    assert lake.head(table) == main_before
    assert ordered(lake.read(table)) == kept
    assert_rerun_leaves_one_copy(Lakehouse.from_env(), crash_input, rerun_id, **mode)


CRASHING_STAGE = textwrap.dedent("""
    import json, os, sys
    import pyarrow.parquet as pq
    from keel.lakehouse import wap
    from keel.lakehouse.tables import Lakehouse

    files, crash = sys.argv[1:-1], sys.argv[-1]

    def chunks():
        for i, path in enumerate(files):
            if crash == "mid-stage" and i == 1:
                os._exit(17)  # killed after the first chunk's commit
            yield pq.read_table(path)

    staged = wap.stage(Lakehouse.from_env(), "raw.payments", chunks(), run_id="run-1",
                       source="ingest:payments", day_column="event_ts")
    print(json.dumps({"snapshot_id": staged.snapshot_id}), flush=True)
    os._exit(17)  # killed before publishing
""")


@pytest.mark.parametrize(("crash", "rerun_id"), [("after-stage", "run-2"), ("mid-stage", "run-1")])
def test_rerun_after_a_killed_process_leaves_one_copy_of_each_row(lake, table, crash_input, tmp_path, crash, rerun_id):
    main_before = lake.head(table)
    kept = ordered(lake.read(table))
    files = []
    for i, chunk in enumerate(crash_input):
        files.append(str(tmp_path / f"chunk-{i}.parquet"))
        pq.write_table(chunk, files[-1])

    proc = subprocess.run(
        [sys.executable, "-c", CRASHING_STAGE, *files, crash], capture_output=True, text=True, timeout=120
    )

    assert proc.returncode == 17, proc.stderr
    refs = lake.table(table).refs()
    assert "audit_run-1" in refs, "the dead process must have left its branch behind"
    left_behind = lake.read(table, branch="audit_run-1")
    if crash == "after-stage":
        assert json.loads(proc.stdout)["snapshot_id"] == refs["audit_run-1"].snapshot_id
        assert left_behind.num_rows == 9 + 65
    else:
        assert proc.stdout == ""
        assert left_behind.num_rows == 9 + 40
    assert lake.head(table) == main_before
    assert ordered(lake.read(table)) == kept
    assert_rerun_leaves_one_copy(lake, [pq.read_table(f) for f in files], rerun_id)


@pytest.mark.parametrize(("mode", "key"), [("replace", None), ("merge", "event_id")])
def test_rerun_after_a_crash_after_publish_leaves_one_copy_of_each_row(lake, table, payments, mode, key):
    chunks = [as_table(payments, payment_rows(D1, 30)), as_table(payments, payment_rows(D2, 12))]

    stage_and_publish(lake, chunks, "run-1", mode=mode, key=key)
    once = ordered(lake.read(table))
    # The orchestrator never heard of the publish and runs the step again under a new run id.
    stage_and_publish(lake, chunks, "run-1-retry", mode=mode, key=key)

    assert ordered(lake.read(table)) == once
    assert_one_copy_each(lake.read(table), ids(D1, 30) | ids(D2, 12))
