"""Feature groups as Dagster assets, one per declared group, written through write-audit-publish.

Per group: ``features/<group>_staged`` computes the partition range point-in-time and
stages it on the run's audit branch, the blocking check ``audit`` checks it there (keys,
counts, ranges, entities covered per day against recent days), and ``features/<group>``
fast-forwards main. The graph reads source -> group -> downstream groups.
"""

import dagster as dg

from assets import single_run_backfills
from assets.metadata import audit_check_result, markdown_table, table_preview
from assets.raw_events import daily_partitions, wap_run_id, window_of
from keel import wap
from keel.dsl import FeatureGroup
from keel.lakehouse import day_filter
from keel.materialize import audit_group, days_between, stage_days
from keel.project import Project
from keel.registry import describe, lineage, register
from keel.store import FeatureStore
from resources import LakehouseResource


def feature_group_assets(project: Project, group: FeatureGroup, partitions: dg.PartitionsDefinition) -> list:
    staged_key = dg.AssetKey(["features", f"{group.name}_staged"])
    published_key = dg.AssetKey(["features", group.name])
    upstream = (
        [dg.AssetKey(["raw", group.source.name])]
        if group.source is not None
        else [dg.AssetKey(["features", u.name]) for u in group.upstream]
    )
    info = lineage(project, group.name)
    shared = {
        "partitions_def": partitions,
        "backfill_policy": dg.BackfillPolicy.single_run(),
        "group_name": "features",
        "tags": {"keel/feature_group": group.name, **group.tags},
        "owners": [group.owner] if group.owner and "@" in group.owner else None,
        "code_version": f"v{group.version}-{group.fingerprint()}",
    }
    definition = dg.MetadataValue.md(
        markdown_table(["feature", "definition"], [[f.name, describe(f)] for f in group.features])
    )
    static = {
        "version": group.version,
        "fingerprint": group.fingerprint(),
        "entity": f"{group.entity.name} {list(group.entity.join_keys)}",
        "ttl": group.ttl or "none",
        "online": group.online,
        "definition": definition,
        "lineage": dg.MetadataValue.json(
            {"sources": info.sources, "upstream": info.upstream, "downstream": info.downstream}
        ),
    }

    @dg.asset(
        key=staged_key,
        deps=upstream,
        kinds={"iceberg", "duckdb"},
        metadata=static,
        description=(
            f"{group.description} Computed point-in-time for each day's end and staged on the run's audit "
            f"branch ({group.table_name}@audit_<run id>)."
        ),
        **shared,
    )
    def staged(context: dg.AssetExecutionContext, lakehouse: LakehouseResource):
        store = FeatureStore(lakehouse.lakehouse(), project)
        register(store.lake, project, group)
        days = days_between(*window_of(context))
        context.log.info(f"computing {group.name} v{group.version} for {len(days)} day(s)")
        write = stage_days(store, group, days, wap_run_id(context))
        preview = store.lake.read(
            group.table_name,
            snapshot_id=write.staged.snapshot_id,
            row_filter=day_filter("feature_ts", days[-1:]),
            limit=10,
        )
        per_day = [[str(d), n] for d, n in write.entities_per_day.items()]
        return dg.MaterializeResult(
            metadata={
                **static,
                "branch": write.staged.branch,
                "staged_snapshot_id": str(write.staged.snapshot_id),
                "partitions": write.staged.partition,
                "dagster/row_count": sum(write.entities_per_day.values()),
                "entities_per_day": dg.MetadataValue.md(markdown_table(["day", "entities"], per_day[-31:])),
                "preview": table_preview(preview),
            }
        )

    @dg.asset_check(
        asset=staged_key,
        name="audit",
        blocking=True,
        description=(
            f"Audit of '{group.name}' on the audit branch: keys and feature_ts set, counts present and "
            "non-negative, values within their source column's range, entities per day against recent days."
        ),
    )
    def audit(context: dg.AssetCheckExecutionContext, lakehouse: LakehouseResource) -> dg.AssetCheckResult:
        lake = lakehouse.lakehouse()
        stage = wap.find_staged(lake, group.table_name, wap_run_id(context))
        return audit_check_result(audit_group(lake, group, stage), stage.branch)

    @dg.asset(
        key=published_key,
        deps=[staged_key],
        kinds={"iceberg"},
        metadata=static,
        description=f"{group.description} The '{group.name}' feature table on main ({group.table_name}).",
        **shared,
    )
    def published(context: dg.AssetExecutionContext, lakehouse: LakehouseResource):
        lake = lakehouse.lakehouse()
        stage = wap.find_staged(lake, group.table_name, wap_run_id(context))
        before = lake.head(group.table_name)
        snapshot = wap.publish(lake, stage)
        rows = lake.partition_rows(group.table_name)
        return dg.MaterializeResult(
            metadata={
                **static,
                "snapshot_id": str(snapshot),
                "previous_snapshot_id": str(before),
                "partitions": stage.partition,
                "dagster/row_count": sum(rows.values()),
                "table": group.table_name,
            }
        )

    return [staged, audit, published]


def feature_job_name(group: FeatureGroup) -> str:
    return f"features_{group.name}"


def feature_group_definitions(project: Project) -> dg.Definitions:
    partitions = daily_partitions(project)
    assets, checks, jobs = [], [], []
    for group in project.feature_groups:
        with single_run_backfills():
            staged, audit, published = feature_group_assets(project, group, partitions)
        assets += [staged, published]
        checks.append(audit)
        jobs.append(
            dg.define_asset_job(
                feature_job_name(group),
                selection=dg.AssetSelection.assets(staged, published),
                description=f"Compute, audit and publish the '{group.name}' feature group for a range of days.",
                tags={"keel/table": group.table_name},
            )
        )
    return dg.Definitions(assets=assets, asset_checks=checks, jobs=jobs)
