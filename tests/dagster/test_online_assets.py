"""The online sync assets: downstream of each online group, metadata, and the consistency check."""

import dataclasses
import datetime as dt

import dagster as dg
import pyarrow as pa
import pytest

from assets.feature_groups import feature_group_definitions
from assets.online import ONLINE_SYNC_JOB, online_definitions
from assets.raw_events import raw_event_definitions
from keel.features.materialize import backfill
from keel.online.store import OnlineStore
from keel.project import Project
from keel.store import FeatureStore
from resources import resource_definitions
from tests.factories.features import HISTORY, START, at, land, online_groups


@pytest.fixture
def project(payments) -> Project:
    # A TTL of ten years keeps these March 2026 values from expiring on the wall clock the sync runs by.
    spend, ratio = online_groups(payments, ttl="3650d")
    return Project(name="t", sources=(payments,), start_date=START, feature_groups=(spend, ratio))


@pytest.fixture
def defs(project, settings) -> dg.Definitions:
    return dg.Definitions.merge(
        raw_event_definitions(project),
        feature_group_definitions(project),
        online_definitions(project),
        resource_definitions(settings),
    )


def check_results(result) -> dict[str, dg.AssetCheckEvaluation]:
    return {
        e.event_specific_data.asset_key.path[-1]: e.event_specific_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }


def test_each_online_group_syncs_downstream_of_its_table_with_a_consistency_check(defs):
    graph = defs.resolve_asset_graph()
    for name in ("spend", "spend_ratio"):
        node = graph.get(dg.AssetKey(["online", name]))
        assert node.parent_keys == {dg.AssetKey(["features", name])}
        assert node.automation_condition is not None
        assert [c.name for c in graph.get_check_keys_for_assets({node.key})] == ["consistency"]


def test_the_sync_job_writes_records_metadata_and_passes_its_checks(defs, project, lake, payments, settings):
    land(lake, payments, HISTORY, "h")
    store = FeatureStore(lake, project)
    for group in project.feature_groups:
        backfill(store, group, START, START + dt.timedelta(days=9), f"bf-{group.name}")

    with dg.instance_for_test() as instance:
        first = defs.resolve_job_def(ONLINE_SYNC_JOB).execute_in_process(instance=instance)
        second = defs.resolve_job_def(ONLINE_SYNC_JOB).execute_in_process(instance=instance)

    meta = first.asset_materializations_for_node("online__spend")[0].metadata
    assert meta["mode"].value == "full" and meta["keys_written"].value == 2
    assert meta["snapshot_synced"].value == str(lake.head("features.spend"))
    assert meta["store"].value == str(settings.home / "online.db")
    assert second.asset_materializations_for_node("online__spend")[0].metadata["mode"].value == "up to date"
    checks = check_results(first)
    assert set(checks) == {"spend", "spend_ratio"}
    assert all(c.passed and c.metadata["match_rate"].value == 1.0 for c in checks.values())


def test_a_wrong_online_value_fails_the_check_with_the_mismatch(defs, project, lake, payments, settings):
    land(lake, payments, HISTORY, "h")
    spend = project.group("spend")
    backfill(FeatureStore(lake, project), spend, START, START + dt.timedelta(days=9), "bf")
    with OnlineStore.from_settings(settings) as online:
        bad = {"user_id": "alice", "feature_ts": at(10, 1), "n_7d": 7, "amount_7d": 20.0, "last_amount": 20.0}
        online.write(spend, pa.Table.from_pylist([{**bad, "avg_7d": 20.0}], schema=spend.arrow_schema()))

    job = dg.define_asset_job("sync_spend", selection=dg.AssetSelection.assets(dg.AssetKey(["online", "spend"])))
    with dg.instance_for_test() as instance:
        result = (
            dg.Definitions.merge(defs, dg.Definitions(jobs=[job]))
            .resolve_job_def("sync_spend")
            .execute_in_process(instance=instance)
        )

    check = check_results(result)["spend"]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert check.metadata["match_rate"].value == pytest.approx(7 / 8)
    assert (
        "| alice |" in check.metadata["mismatches"].value and "| n_7d | 7 | 1 |" in check.metadata["mismatches"].value
    )


def test_offline_groups_get_no_online_assets(payments):
    spend, _ = online_groups(payments)
    offline = Project(
        name="t", sources=(payments,), start_date=START, feature_groups=(dataclasses.replace(spend, online=False),)
    )
    assert not list(online_definitions(offline).assets or [])
