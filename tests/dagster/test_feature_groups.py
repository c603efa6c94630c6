"""Feature groups as Dagster assets: the graph, ranged runs through write-audit-publish, and metadata."""

import datetime as dt

import dagster as dg
import pytest

from assets.feature_groups import feature_group_definitions, feature_job_name
from assets.raw_events import raw_event_definitions
from keel.project import Project
from resources import resource_definitions
from sensors.landing import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
from tests.factories.features import HISTORY, START, groups_for, land


@pytest.fixture
def project(payments) -> Project:
    spend, ratio = groups_for(payments)
    return Project(name="t", sources=(payments,), start_date=START, feature_groups=(spend, ratio))


@pytest.fixture
def defs(project, settings) -> dg.Definitions:
    return dg.Definitions.merge(
        raw_event_definitions(project), feature_group_definitions(project), resource_definitions(settings)
    )


def run(defs, instance, group, first: dt.date, last: dt.date) -> dg.ExecuteInProcessResult:
    return defs.resolve_job_def(feature_job_name(group)).execute_in_process(
        instance=instance,
        tags={ASSET_PARTITION_RANGE_START_TAG: first.isoformat(), ASSET_PARTITION_RANGE_END_TAG: last.isoformat()},
        raise_on_error=False,
    )


def test_the_graph_reads_source_then_group_then_downstream_group(defs):
    graph = defs.resolve_asset_graph()
    spend = graph.get(dg.AssetKey(["features", "spend"]))
    ratio = graph.get(dg.AssetKey(["features", "spend_ratio"]))
    assert dg.AssetKey(["raw", "payments"]) in spend.parent_keys
    assert dg.AssetKey(["features", "spend"]) in ratio.parent_keys
    assert graph.get(dg.AssetKey(["features", "spend"])).partitions_def is not None
    checks = graph.get_check_keys_for_assets({spend.key})
    assert [c.name for c in checks] == ["audit"]


def test_a_range_computes_audits_and_publishes_each_group(defs, project, lake, payments):
    land(lake, payments, HISTORY, "h")
    last = START + dt.timedelta(days=9)
    with dg.instance_for_test() as instance:
        spend_run = run(defs, instance, project.group("spend"), START, last)
        ratio_run = run(defs, instance, project.group("spend_ratio"), START, last)

    assert spend_run.success and ratio_run.success
    key = dg.AssetKey(["features", "spend"])
    declared = defs.resolve_assets_def(key).metadata_by_key[key]
    assert declared["version"] == 1
    assert "sum(amount) over 7d where NOT is_refund" in declared["definition"].value
    assert declared["lineage"].value["downstream"] == ["spend_ratio"]
    # One materialization per day, each with that day's entities and rows on main.
    days = spend_run.get_asset_materialization_events()
    assert len(days) == 10
    published = lake.read("features.spend")
    for event in days:
        meta, day = event.materialization.metadata, dt.date.fromisoformat(event.materialization.partition)
        on_day = sum(1 for t in published.column("feature_ts").to_pylist() if t.date() == day)
        assert meta["dagster/row_count"].value == meta["entities"].value == on_day
        assert meta["snapshot_id"].value == str(lake.head("features.spend"))
    # How the run computed: its shards, where, each shard's time and peak memory (on the audit check).
    (audit,) = spend_run.get_asset_check_evaluations()
    shards = audit.metadata
    assert (shards["shards"].value, shards["compute"].value, shards["workers_used"].value) == (1, "in-process", 1)
    assert shards["peak_memory_mib"].value > 0
    assert "| spend shard 1/1 | in-process |" in shards["shard_tasks"].value
    table = lake.read("features.spend_ratio")
    assert table.num_rows == lake.read("features.spend").num_rows
    assert set(table.column("big_spender").to_pylist()) <= {True, False, None}
    assert True in table.column("big_spender").to_pylist()  # bob's 300 on day 1
