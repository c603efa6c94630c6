"""Maintenance on a real catalog: compaction keeps content, expiry keeps what branches need, stale branches go."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from keel.ingest.staging import OWNER_FILE, STAGING_PREFIX, clean_staging, process_start
from keel.lakehouse import wap
from keel.lakehouse.maintenance import TableMaintenance, day_column, maintain, remove_branches
from keel.lakehouse.tables import PROP_PARTITION, PROP_RUN_ID, PROP_SOURCE, Lakehouse, LakehouseError, day_filter
from tests.factories.payments import as_table, payment_rows

TABLE = "raw.payments"
D1, D2, D3 = dt.date(2026, 1, 5), dt.date(2026, 1, 6), dt.date(2026, 1, 7)
HOUR = dt.timedelta(hours=1)
NOW = dt.timedelta(0)


def append(lake: Lakehouse, data: pa.Table, run_id: str) -> int:
    """An append, as a stream writer lands events: one more small file per day it touches."""
    lake.table(TABLE).append(data, snapshot_properties=lake.snapshot_properties("stream", [], run_id))
    return lake.head(TABLE)


def publish(lake: Lakehouse, data: pa.Table, run_id: str) -> wap.StagedWrite:
    staged = wap.stage(lake, TABLE, [data], run_id=run_id, source="test", day_column="event_ts")
    wap.publish(lake, staged)
    return staged


def files_per_day(lake: Lakehouse, snapshot_id: int | None = None) -> dict[dt.date, int]:
    iceberg = lake.table(TABLE)
    files = iceberg.inspect.files(snapshot_id=snapshot_id or lake.head(TABLE))
    out: dict[dt.date, int] = {}
    for part in files.column("partition").to_pylist():
        out[part["event_ts_day"]] = out.get(part["event_ts_day"], 0) + 1
    return dict(sorted(out.items()))


def content(data: pa.Table) -> pa.Table:
    return data.sort_by("event_id")


def snapshot_ids(lake: Lakehouse) -> set[int]:
    return {s.snapshot_id for s in lake.table(TABLE).snapshots()}


@pytest.fixture
def small_files(lake, table, payments) -> list[int]:
    """Five appends over D1 and D2 and one over D3: 5, 5 and 1 files. Returns the heads, oldest first."""
    heads = []
    for i in range(5):
        batch = payment_rows(D1, 6, prefix=f"a{i}", amount=i) + payment_rows(D2, 4, prefix=f"a{i}", amount=i)
        heads.append(append(lake, as_table(payments, batch), f"stream-{i}"))
    heads.append(append(lake, as_table(payments, payment_rows(D3, 3, prefix="c")), "stream-5"))
    return heads


# compaction


def test_compaction_keeps_content_and_leaves_one_file_per_day(lake, small_files):
    before = content(lake.read(TABLE))
    assert files_per_day(lake) == {D1: 5, D2: 5, D3: 1}

    compacted = lake.compact(TABLE, day_column="event_ts", run_id="maint-1", min_files=2)

    assert compacted == {D1: 5, D2: 5}
    assert files_per_day(lake) == {D1: 1, D2: 1, D3: 1}
    after = content(lake.read(TABLE))
    assert after.equals(before)
    assert after.num_rows == 53
    assert lake.partition_rows(TABLE) == {D1: 30, D2: 20, D3: 3}


def test_compaction_is_a_stamped_snapshot_and_the_old_files_stay_readable(lake, small_files):
    before_head = lake.head(TABLE)
    before = content(lake.read(TABLE))

    lake.compact(TABLE, day_column="event_ts", run_id="maint-1", min_files=2)

    last = lake.snapshots(TABLE)[-1]
    assert last.properties[PROP_SOURCE] == "compaction"
    assert last.properties[PROP_RUN_ID] == "maint-1"
    assert last.properties[PROP_PARTITION] == "2026-01-05..2026-01-06"
    assert files_per_day(lake, before_head) == {D1: 5, D2: 5, D3: 1}
    assert content(lake.read(TABLE, snapshot_id=before_head)).equals(before)
    assert content(lake.read(TABLE, snapshot_id=small_files[0])).num_rows == 10


def test_compaction_skips_days_below_the_file_threshold(lake, small_files):
    head = lake.head(TABLE)

    assert lake.compact(TABLE, day_column="event_ts", run_id="maint-1", min_files=6) == {}
    assert lake.head(TABLE) == head

    assert lake.compact(TABLE, day_column="event_ts", run_id="maint-2", min_files=5) == {D1: 5, D2: 5}
    assert lake.compact(TABLE, day_column="event_ts", run_id="maint-3", min_files=2) == {}


def test_compaction_of_a_new_table_does_nothing(lake, table):
    head = lake.head(table)

    assert lake.compact(table, day_column="event_ts", run_id="maint-1") == {}
    assert lake.head(table) == head


def test_maintain_a_new_table(lake, table):
    (result,) = maintain(lake, run_id="maint-1", expire_after=NOW, branch_max_age=NOW)

    assert result == TableMaintenance(table=TABLE)
    assert lake.read(table).num_rows == 0


def test_compaction_after_rewrites_and_appends_keeps_the_latest_content(lake, table, payments):
    publish(lake, as_table(payments, payment_rows(D1, 20)), "run-1")
    publish(lake, as_table(payments, payment_rows(D1, 12, prefix="v2")), "run-2")
    for i in range(3):
        append(lake, as_table(payments, payment_rows(D1, 2, prefix=f"late{i}")), f"stream-{i}")
    before = content(lake.read(TABLE))
    assert files_per_day(lake) == {D1: 4}

    assert lake.compact(TABLE, day_column="event_ts", run_id="maint-1") == {D1: 4}

    assert files_per_day(lake) == {D1: 1}
    assert content(lake.read(TABLE)).equals(before)
    assert before.num_rows == 18


# expiry


def test_expire_nothing_newer_than_the_limit(lake, small_files):
    before = snapshot_ids(lake)

    assert lake.expire_snapshots(TABLE, HOUR) == []

    assert snapshot_ids(lake) == before


def test_expire_keeps_main_head_and_drops_everything_else_unreferenced(lake, small_files):
    head = lake.head(TABLE)
    content_before = content(lake.read(TABLE))
    everything = snapshot_ids(lake)

    expired = lake.expire_snapshots(TABLE, NOW)

    assert sorted(expired) == sorted(everything - {head})
    assert snapshot_ids(lake) == {head}
    assert lake.head(TABLE) == head
    assert content(lake.read(TABLE)).equals(content_before)
    assert [s.snapshot_id for s in lake.snapshots(TABLE)] == [head]
    with pytest.raises(LakehouseError, match=rf"has no snapshot {small_files[0]} \(expired or never existed"):
        lake.read(TABLE, snapshot_id=small_files[0])


def test_expire_keeps_snapshots_newer_than_the_limit(lake, table, payments):
    created = lake.head(TABLE)
    old = [append(lake, as_table(payments, payment_rows(D1, 3, prefix=f"o{i}")), f"old-{i}") for i in range(2)]
    # Writes elsewhere put time between the old and the new snapshots.
    other = lake.ensure_table("raw.other", pa.schema([("n", pa.int64())]))
    for i in range(3):
        other.append(pa.table({"n": [i]}))
    new = [append(lake, as_table(payments, payment_rows(D2, 3, prefix=f"n{i}")), f"new-{i}") for i in range(2)]
    iceberg = lake.table(TABLE)
    last_old_ms, first_new_ms = (iceberg.snapshot_by_id(s).timestamp_ms for s in (old[-1], new[0]))
    assert last_old_ms < first_new_ms
    kept_content = content(lake.read(TABLE, snapshot_id=new[0]))
    # Half a millisecond after the last old snapshot: all old snapshots and no new one precede the cutoff.
    cutoff = dt.datetime.fromtimestamp((last_old_ms + 0.5) / 1000, dt.UTC)

    expired = lake.expire_snapshots(TABLE, HOUR, now=cutoff + HOUR)

    assert sorted(expired) == sorted([created, *old])
    assert snapshot_ids(lake) == set(new)
    assert content(lake.read(TABLE, snapshot_id=new[0])).equals(kept_content)
    assert kept_content.num_rows == 9
    assert lake.read(TABLE).num_rows == 12


def test_expire_keeps_what_a_pending_audit_branch_needs(lake, table, payments):
    created = lake.head(TABLE)
    publish(lake, as_table(payments, payment_rows(D1, 10)), "run-1")
    # Replacing a day that holds rows commits a delete then an append on the branch.
    staged = wap.stage(
        lake,
        TABLE,
        [as_table(payments, payment_rows(D1, 4, prefix="v2"))],
        run_id="run-2",
        source="test",
        day_column="event_ts",
    )
    iceberg = lake.table(TABLE)
    branch_delete = iceberg.snapshot_by_id(staged.snapshot_id).parent_snapshot_id
    assert iceberg.snapshot_by_id(branch_delete).parent_snapshot_id == staged.base_snapshot_id == lake.head(TABLE)
    branch_content = content(lake.read(TABLE, branch=staged.branch))

    expired = lake.expire_snapshots(TABLE, NOW)

    assert snapshot_ids(lake) == {staged.base_snapshot_id, branch_delete, staged.snapshot_id}
    assert expired == [created]
    assert wap.find_staged(lake, TABLE, "run-2") == staged
    assert wap.publish(lake, staged) == staged.snapshot_id
    assert content(lake.read(TABLE)).equals(branch_content)
    assert branch_content.num_rows == 4


def test_expire_keeps_only_a_stale_branchs_own_commits(lake, table, payments):
    publish(lake, as_table(payments, payment_rows(D1, 10)), "run-1")
    fork = lake.head(TABLE)
    stale = wap.stage(
        lake,
        TABLE,
        [as_table(payments, payment_rows(D1, 4, prefix="stale"))],
        run_id="stale",
        source="test",
        day_column="event_ts",
    )
    branch_delete = lake.table(TABLE).snapshot_by_id(stale.snapshot_id).parent_snapshot_id
    for run in ("run-2", "run-3"):
        publish(lake, as_table(payments, payment_rows(D2, 3, prefix=run)), run)

    expired = lake.expire_snapshots(TABLE, NOW)

    assert fork in expired
    assert snapshot_ids(lake) == {lake.head(TABLE), branch_delete, stale.snapshot_id}
    assert lake.read(TABLE, branch=stale.branch).num_rows == 4
    with pytest.raises(wap.PublishConflict):
        wap.publish(lake, stale)


def test_expire_keeps_tagged_snapshots_readable(lake, small_files):
    tagged = small_files[1]
    lake.table(TABLE).manage_snapshots().create_tag(tagged, "before-backfill").commit()
    at_tag = content(lake.read(TABLE, snapshot_id=tagged))

    lake.expire_snapshots(TABLE, NOW)

    assert snapshot_ids(lake) == {tagged, lake.head(TABLE)}
    assert content(lake.read(TABLE, snapshot_id=tagged)).equals(at_tag)
    assert at_tag.num_rows == 20


# stale branches


def test_stale_audit_branches_are_removed_and_others_kept(lake, table, payments):
    for run in ("run-a", "run-b"):
        wap.stage(
            lake,
            TABLE,
            [as_table(payments, payment_rows(D1, 2, prefix=run))],
            run_id=run,
            source="test",
            day_column="event_ts",
        )
    lake.table(TABLE).manage_snapshots().create_branch(lake.head(TABLE), "experiment").commit()

    assert remove_branches(lake, TABLE, wap.BRANCH_PREFIX, HOUR) == []
    removed = remove_branches(lake, TABLE, wap.BRANCH_PREFIX, NOW)

    assert sorted(removed) == ["audit_run-a", "audit_run-b"]
    assert sorted(lake.table(TABLE).refs()) == ["experiment", "main"]
    with pytest.raises(LakehouseError, match="run 'run-a' staged nothing"):
        wap.find_staged(lake, TABLE, "run-a")


# the maintenance pass


def test_maintain_compacts_drops_stale_branches_and_expires(lake, small_files, payments):
    wap.stage(
        lake,
        TABLE,
        [as_table(payments, payment_rows(D3, 2, prefix="abandoned"))],
        run_id="abandoned",
        source="test",
        day_column="event_ts",
    )
    before = content(lake.read(TABLE))

    (result,) = maintain(
        lake, run_id="maint-1", expire_after=NOW, compact_min_files=4, branch_max_age=NOW, tables=[TABLE]
    )

    assert result == TableMaintenance(
        table=TABLE,
        # all but main's head: the creation, 6 appends, the branch's delete and append, compaction's delete
        expired_snapshots=1 + 6 + 2 + 1,
        compacted_days={D1: 5, D2: 5},
        removed_branches=["audit_abandoned"],
        files_before=11,
        files_after=3,
    )
    assert list(lake.table(TABLE).refs()) == ["main"]
    assert snapshot_ids(lake) == {lake.head(TABLE)}
    assert content(lake.read(TABLE)).equals(before)


def test_maintain_with_default_limits_keeps_history_for_time_travel(lake, small_files, payments):
    staged = wap.stage(
        lake,
        TABLE,
        [as_table(payments, payment_rows(D3, 2, prefix="pending"))],
        run_id="pending",
        source="test",
        day_column="event_ts",
    )
    at_first = content(lake.read(TABLE, snapshot_id=small_files[0]))
    as_of = lake.snapshots(TABLE)[2].committed_at
    at_moment = content(lake.read(TABLE, as_of=as_of))

    (result,) = maintain(lake, run_id="maint-1")

    assert result.compacted_days == {D1: 5, D2: 5}
    assert result.expired_snapshots == 0 and result.removed_branches == []
    assert (result.files_before, result.files_after) == (11, 3)
    assert content(lake.read(TABLE, snapshot_id=small_files[0])).equals(at_first)
    assert content(lake.read(TABLE, as_of=as_of)).equals(at_moment)
    assert lake.read(TABLE, branch=staged.branch).num_rows == 50 + 2
    # Compaction moved main, so the pending run must stage again rather than undo it.
    with pytest.raises(wap.PublishConflict):
        wap.publish(lake, staged)


def test_maintain_covers_every_table_and_skips_compaction_without_a_day_column(lake, small_files):
    lake.ensure_table(
        "ops.quarantine", pa.schema([("source", pa.string()), ("n", pa.int64())]), identity_column="source"
    )
    for i in range(4):
        lake.table("ops.quarantine").append(pa.table({"source": ["payments"], "n": [i]}))

    results = maintain(lake, run_id="maint-1", compact_min_files=2)

    assert [r.table for r in results] == ["ops.quarantine", TABLE]
    quarantine = results[0]
    assert quarantine.compacted_days == {} and quarantine.files_before == quarantine.files_after == 4
    assert results[1].compacted_days == {D1: 5, D2: 5}


def test_day_column_of_a_table(lake, table):
    lake.ensure_table("ops.quarantine", pa.schema([("source", pa.string())]), identity_column="source")

    assert day_column(lake.table(table)) == "event_ts"
    assert day_column(lake.table("ops.quarantine")) is None


def test_maintain_refuses_bad_arguments(lake, table):
    with pytest.raises(ValueError, match=r"compact_min_files=1: compaction needs at least 2 files per day"):
        maintain(lake, run_id="m", compact_min_files=1)
    with pytest.raises(ValueError, match=r"no such table\(s\): raw.nope \(known: raw.payments\)"):
        maintain(lake, run_id="m", tables=["raw.nope", TABLE])


def test_time_travel_by_moment_after_expiry_reaches_kept_snapshots_only(lake, table, payments):
    publish(lake, as_table(payments, payment_rows(D1, 5)), "run-1")
    publish(lake, as_table(payments, payment_rows(D1, 7, prefix="v2")), "run-2")
    first, second = lake.snapshots(TABLE)[1:]

    lake.expire_snapshots(TABLE, NOW)

    assert [s.snapshot_id for s in lake.snapshots(TABLE)] == [second.snapshot_id]
    assert lake.read(TABLE, as_of=second.committed_at).num_rows == 7
    with pytest.raises(LakehouseError, match=r"no snapshot as of .* the snapshots of that time have expired"):
        lake.read(TABLE, as_of=first.committed_at)
    assert lake.read(TABLE, row_filter=day_filter("event_ts", [D1])).num_rows == 7


# staging folders that killed ingests left


def staging_folder(root: Path, name: str, owner: dict | None, *, size: int = 1000, age_h: float = 0) -> Path:
    """A staging folder as an ingest leaves it: the database, and the owner record unless None."""
    folder = root / f"{STAGING_PREFIX}payments-{name}"
    folder.mkdir(parents=True)
    (folder / "staging.duckdb").write_bytes(b"x" * size)
    if owner is not None:
        (folder / OWNER_FILE).write_text(json.dumps(owner))
    moment = time.time() - age_h * 3600
    for path in [*folder.iterdir(), folder]:
        os.utime(path, (moment, moment))
    return folder


def owner(pid: int, *, host: str | None = None, start: str | None = "same") -> dict:
    return {
        "pid": pid,
        "host": host or socket.gethostname(),
        "process_start": process_start(pid) if start == "same" else start,
        "created_at": "2026-01-05T00:00:00+00:00",
    }


def finished_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def poll_until(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_clean_staging_removes_the_folders_of_gone_processes_and_keeps_those_of_live_ones(tmp_path):
    root = tmp_path / "staging"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        kept = [
            # A live ingest's folder stays however old: a big file may take long.
            staging_folder(root, "live-old", owner(os.getpid()), age_h=100),
            # Another host's processes cannot be seen: its folder stays while it changes.
            staging_folder(root, "other-host-recent", owner(1, host="elsewhere")),
            # A folder whose owner record is not written yet.
            staging_folder(root, "starting", None),
        ]
        zombie_owner = owner(sleeper.pid)
        # Killed, and not reaped yet by its parent: a zombie, gone all the same.
        sleeper.kill()
        poll_until(lambda: Path(f"/proc/{sleeper.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z")
        removed = [
            staging_folder(root, "dead", owner(finished_pid()), size=1234),
            staging_folder(root, "reused-pid", owner(os.getpid(), start="1"), size=10),
            staging_folder(root, "zombie", zombie_owner, size=100),
            staging_folder(root, "other-host-stale", owner(1, host="elsewhere"), size=7, age_h=25),
            staging_folder(root, "no-record-stale", None, size=3, age_h=25),
        ]
        (root / "notes").mkdir()
        freed = sum(folder_bytes(f) for f in removed)

        result = clean_staging(root, max_age=dt.timedelta(hours=24))
    finally:
        sleeper.wait()

    assert sorted(p.name for p in root.iterdir()) == sorted([*(f.name for f in kept), "notes"])
    assert sorted(result.removed) == sorted(f.name for f in removed)
    assert sorted(result.kept) == sorted(f.name for f in kept)
    assert result.bytes_freed == freed > 1234 + 10 + 100 + 7 + 3
    assert result.summary() == (
        f"staging {root}: removed 5 folder(s) left by killed ingests, freed {freed:,} bytes; kept 3 of running ingests"
    )


def test_clean_staging_of_no_folder_does_nothing_and_refuses_a_bad_age(tmp_path):
    assert clean_staging(tmp_path / "none").removed == []
    with pytest.raises(ValueError, match="staging max_age 0:00:00 must be positive"):
        clean_staging(tmp_path, max_age=dt.timedelta(0))
