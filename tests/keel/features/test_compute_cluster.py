"""Shards on a real Dask cluster: a scheduler and two worker processes on loopback, started here.

Training sets and a 7-day backfill computed across the cluster equal the in-process ones bit for
bit; a worker killed (SIGKILL) on its first task loses nothing: the scheduler gives its shards to
the other worker and the results are still identical.
"""

import datetime as dt

import pyarrow as pa
import pytest

from keel.compute import Compute, ComputeError
from keel.devservers.compute import DaskScheduler, DaskWorker
from keel.features.materialize import backfill, compute_days, read_version
from keel.features.training_sets import OfflineStore
from tests.factories.demo_lake import demo_store
from tests.keel.features.test_shards import bits

KILLER = "tests.dask_kill_on_first_task"
DAYS = [dt.date(2026, 1, 14) + dt.timedelta(days=i) for i in range(7)]


@pytest.fixture(scope="module")
def lake_home(tmp_path_factory):
    return demo_store(tmp_path_factory.mktemp("cluster"), days=24, users=150)


@pytest.fixture(scope="module")
def cluster(lake_home):
    """A scheduler and two workers configured, as deployed ones are, by their KEEL_* environment."""
    env = lake_home[0].settings.as_env()
    scheduler = DaskScheduler().start()
    workers = [DaskWorker(scheduler.address, env=env).start() for _ in range(2)]
    yield scheduler, workers, env
    for w in workers:
        w.stop()
    scheduler.stop()


@pytest.fixture(scope="module")
def stores(lake_home, cluster):
    """The same lakehouse seen in-process and through the cluster."""
    local, tables = lake_home
    remote = OfflineStore.from_settings(
        type(local.settings).from_env({**local.settings.as_env(), "KEEL_COMPUTE": cluster[0].address})
    )
    txn = tables["transactions"]
    spine = pa.table({"user_id": txn.column("user_id"), "event_ts": txn.column("event_ts")}).slice(0, 800)
    return local, remote, spine


FEATURES = ["user_transactions.txn_count_7d", "user_transactions.amount_std_30d", "user_clicks.click_count_7d"]


def test_a_training_set_and_a_backfill_across_two_workers_equal_the_in_process_ones(cluster, stores):
    local, remote, spine = stores
    here = local.get_training_set(spine, FEATURES, shards=4)
    there = remote.get_training_set(spine, FEATURES, shards=4)
    assert bits(there.table) == bits(here.table)
    assert there.shards.engine == cluster[0].address
    assert set(there.shards.workers) == {w.address for w in cluster[1]}  # both took shards
    assert all(t.peak_rss > 0 and t.seconds > 0 for t in there.shards.tasks)

    group = local.project.group("user_transactions")
    local.shards = remote.shards = 4
    want, _, _ = compute_days(local, group, DAYS)
    write, report, published = backfill(remote, group, DAYS[0], DAYS[-1], "cluster-run")
    assert published is not None and report.success
    assert write.shards.engine == cluster[0].address and write.shards.shards == 4
    landed = read_version(remote.lake, group, group.version).cast(want.schema)
    assert bits(landed.sort_by([("feature_ts", "ascending"), ("user_id", "ascending")])) == bits(want)


def test_a_worker_killed_mid_job_loses_no_shard(cluster, stores):
    local, remote, spine = stores
    scheduler, (steady, other), env = cluster
    other.stop()  # the cluster is now the steady worker and one that dies on its first task
    victim = DaskWorker(scheduler.address, env=env, preload=KILLER).start()
    try:
        want = local.get_training_set(spine, FEATURES, shards=8)
        got = remote.get_training_set(spine, FEATURES, shards=8)
        assert victim.process.wait(30) == -9  # it died, SIGKILLed, mid-task
        assert bits(got.table) == bits(want.table)
        assert set(got.shards.workers) == {steady.address}

        victim.restart()  # a replacement joins, and dies the same way during the backfill
        group = local.project.group("user_clicks")
        local.shards = remote.shards = 8
        want_days, _, _ = compute_days(local, group, DAYS)
        got_days, _, report = compute_days(remote, group, DAYS)
        assert victim.process.wait(30) == -9
        assert bits(got_days) == bits(want_days)
        assert report.workers == [steady.address] and len(report.tasks) == 8
    finally:
        victim.stop()


def test_a_worker_configured_for_another_lakehouse_says_so(cluster, stores, tmp_path):
    _, remote, spine = stores
    scheduler, (steady, _), env = cluster
    steady.stop()
    stray = DaskWorker(scheduler.address, env={**env, "KEEL_HOME": str(tmp_path), "KEEL_CATALOG_URI": ""}).start()
    try:
        with pytest.raises(
            ComputeError, match=r"this Dask worker is configured for catalog 'sqlite:///.*start the workers"
        ):
            remote.get_training_set(spine, FEATURES, shards=2)
    finally:
        stray.stop()


def test_no_scheduler_at_the_address_is_a_clear_error():
    with pytest.raises(ComputeError, match=r"KEEL_COMPUTE='tcp://127.0.0.1:9'.*unset KEEL_COMPUTE"):
        Compute("tcp://127.0.0.1:9", connect_timeout=1).map(print, [("x", ())])
