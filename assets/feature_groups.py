"""Feature groups as Dagster assets: one asset per declared group, written through write-audit-publish.

``features/<group>`` computes its days point-in-time (values as of each day's end), stages them
on the run's audit branch, audits them there (its blocking check ``audit``: keys, counts, ranges,
entities per day against the days before) and publishes them: the writer
``keel.features.materialize.GroupDays``, the same one ``keel backfill`` runs. The graph reads
source -> group -> downstream groups.
"""

import dagster as dg

from assets.metadata import markdown_table, shard_metadata
from assets.write_audit_publish import RunContext, WapTable, daily_partitions, wap_asset
from keel.dsl import FeatureGroup
from keel.features.materialize import GroupDays, GroupWrite
from keel.features.registry import describe, lineage
from keel.project import Project


def feature_key(group: FeatureGroup) -> dg.AssetKey:
    return dg.AssetKey(["features", group.name])


def feature_group_asset(project: Project, group: FeatureGroup, partitions: dg.PartitionsDefinition):
    upstream = (
        [dg.AssetKey(["raw", group.source.name])]
        if group.source is not None
        else [feature_key(u) for u in group.upstream]
    )
    info = lineage(project, group.name)
    definition = dg.MetadataValue.md(
        markdown_table(["feature", "definition"], [[f.name, describe(f)] for f in group.features])
    )

    def writer(run: RunContext) -> GroupDays:
        return GroupDays(run.resources.lakehouse.feature_store(project), group, tuple(run.days))

    def day_figures(write: GroupWrite, day) -> dict:
        return {"entities": write.entities_per_day.get(day, 0)}

    return wap_asset(
        WapTable(
            key=feature_key(group),
            table=group.table_name,
            day_column="feature_ts",
            partitions_def=partitions,
            deps=upstream,
            group_name="features",
            description=(
                f"{group.description} The '{group.name}' feature table ({group.table_name}): for every entity with "
                "recent events, its features as of each day's end, computed point-in-time by the same engine as "
                "training sets."
            ),
            audit_description=(
                f"Audit of '{group.name}' on the run's audit branch: keys and feature_ts set, counts present and "
                "non-negative, values within their source column's range, entities per day against the days before. "
                "Blocks the publish."
            ),
            writer=writer,
            day_metadata=day_figures,
            run_metadata=lambda write, lake: shard_metadata(write.shards),
            tags={"keel/feature_group": group.name, **group.tags},
            owners=[group.owner] if group.owner and "@" in group.owner else None,
            code_version=f"v{group.version}-{group.fingerprint()}",
            metadata={
                "version": group.version,
                "fingerprint": group.fingerprint(),
                "entity": f"{group.entity.name} {list(group.entity.join_keys)}",
                "ttl": group.ttl or "none",
                "online": group.online,
                "definition": definition,
                "lineage": dg.MetadataValue.json(
                    {"sources": info.sources, "upstream": info.upstream, "downstream": info.downstream}
                ),
            },
        )
    )


def feature_job_name(group: FeatureGroup) -> str:
    return f"features_{group.name}"


def feature_group_definitions(project: Project) -> dg.Definitions:
    partitions = daily_partitions(project)
    assets, jobs = [], []
    for group in project.feature_groups:
        asset = feature_group_asset(project, group, partitions)
        assets.append(asset)
        jobs.append(
            dg.define_asset_job(
                feature_job_name(group),
                selection=dg.AssetSelection.assets(asset),
                description=f"Compute, audit and publish the '{group.name}' feature group for a range of days.",
            )
        )
    return dg.Definitions(assets=assets, jobs=jobs)
