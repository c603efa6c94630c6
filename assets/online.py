"""The online store's assets: one sync per online feature group, with a consistency check.

``online/<group>`` reads the published ``features/<group>`` table and pushes each changed
entity's latest values to the online store (Redis, or SQLite when embedded), incrementally
from the snapshot it last synced. It is eager: when the daemon runs, a newly published
partition of the group triggers a sync. The check ``consistency`` samples entities, reads
their online values and compares them with the offline point-in-time values at the same
``feature_ts``.
"""

import dagster as dg

from assets.metadata import markdown_table
from keel.dsl import FeatureGroup
from keel.features.training_sets import OfflineStore
from keel.online.consistency import check_group
from keel.online.sync import sync_group
from keel.project import Project
from resources import LakehouseResource, OnlineStoreResource

ONLINE_SYNC_JOB = "online_sync"
CONSISTENCY_SAMPLE = 100


def online_group_assets(project: Project, group: FeatureGroup) -> tuple:
    key = dg.AssetKey(["online", group.name])

    @dg.asset(
        key=key,
        deps=[dg.AssetKey(["features", group.name])],
        group_name="online",
        kinds={"redis", "sqlite"},
        automation_condition=dg.AutomationCondition.eager(),
        tags={"keel/feature_group": group.name},
        owners=[group.owner] if group.owner and "@" in group.owner else None,
        description=(
            f"Latest '{group.name}' values per entity in the online store, synced incrementally from "
            f"{group.table_name}; a value older than the stored one never replaces it."
        ),
    )
    def online_sync(context: dg.AssetExecutionContext, lakehouse: LakehouseResource, online: OnlineStoreResource):
        with online.store() as store:
            result = sync_group(lakehouse.lakehouse(), store, group)
        context.log.info(
            f"{group.name}: {result.mode} sync of snapshot {result.snapshot_id}, "
            f"{result.entities_changed:,} entities changed, {result.keys_written:,} keys written"
        )
        return dg.MaterializeResult(
            metadata={
                "mode": result.mode,
                "keys_written": result.keys_written,
                "entities_changed": result.entities_changed,
                "duration_s": result.duration_s,
                "snapshot_synced": str(result.snapshot_id),
                "previous_snapshot": str(result.previous_snapshot_id),
                "store": result.store,
                "group_version": group.version,
            }
        )

    @dg.asset_check(
        asset=key,
        name="consistency",
        description=(
            f"Samples up to {CONSISTENCY_SAMPLE} entities of '{group.name}', reads their online values and "
            "compares each with the offline point-in-time value at the same feature_ts (floats within 1e-9)."
        ),
    )
    def consistency(lakehouse: LakehouseResource, online: OnlineStoreResource) -> dg.AssetCheckResult:
        with online.store() as store:
            result = check_group(OfflineStore(lakehouse.lakehouse(), project), store, group, sample=CONSISTENCY_SAMPLE)
        rows = [[m["entity"], m["feature_ts"], m["feature"], m["online"], m["offline"]] for m in result.mismatches]
        return dg.AssetCheckResult(
            passed=result.matched == result.compared,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                "entities": result.entities,
                "values_compared": result.compared,
                "match_rate": result.match_rate,
                "mismatches": dg.MetadataValue.md(
                    markdown_table(["entity", "feature_ts", "feature", "online", "offline"], rows) if rows else "none"
                ),
            },
        )

    return online_sync, consistency


def online_definitions(project: Project) -> dg.Definitions:
    assets, checks = [], []
    for group in project.feature_groups:
        if group.online:
            sync, check = online_group_assets(project, group)
            assets.append(sync)
            checks.append(check)
    if not assets:
        return dg.Definitions()
    job = dg.define_asset_job(
        ONLINE_SYNC_JOB,
        selection=dg.AssetSelection.assets(*assets),
        description="Push the latest published feature values to the online store and check them against offline.",
    )
    return dg.Definitions(assets=assets, asset_checks=checks, jobs=[job])
