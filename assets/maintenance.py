"""Lakehouse maintenance as a Dagster asset, run daily by a schedule."""

import datetime as dt

import dagster as dg

from assets.metadata import markdown_table
from keel.ingest.staging import clean_staging
from keel.lakehouse.maintenance import maintain
from resources import LakehouseResource


class MaintenanceConfig(dg.Config):
    expire_after_days: float = 7.0
    compact_min_files: int = 4
    branch_max_age_days: float = 7.0
    # A staging folder of another host's ingest (whose process cannot be seen) goes once unchanged this long.
    staging_max_age_hours: float = 24.0


@dg.asset(
    key=["ops", "lakehouse_maintenance"],
    group_name="ops",
    kinds={"iceberg"},
    description=(
        "Compacts day partitions made of many small files into one, removes audit branches "
        "older than the limit, and expires snapshots older than the limit (main's head and "
        "branch heads are kept). Time travel reaches back as far as the snapshots kept. Also removes "
        "the staging folders (KEEL_HOME/staging) that killed ingests left, and says how many bytes that freed."
    ),
)
def lakehouse_maintenance(context: dg.AssetExecutionContext, config: MaintenanceConfig, lakehouse: LakehouseResource):
    results = maintain(
        lakehouse.lakehouse(),
        run_id=context.run.run_id,
        expire_after=dt.timedelta(days=config.expire_after_days),
        compact_min_files=config.compact_min_files,
        branch_max_age=dt.timedelta(days=config.branch_max_age_days),
    )
    staging = clean_staging(lakehouse.settings().staging, max_age=dt.timedelta(hours=config.staging_max_age_hours))
    if staging.removed:
        context.log.info(staging.summary())
    rows = [
        [r.table, r.expired_snapshots, len(r.compacted_days), len(r.removed_branches), r.files_before, r.files_after]
        for r in results
    ]
    return dg.MaterializeResult(
        metadata={
            "tables": len(results),
            "snapshots_expired": sum(r.expired_snapshots for r in results),
            "days_compacted": sum(len(r.compacted_days) for r in results),
            "branches_removed": sum(len(r.removed_branches) for r in results),
            "staging_folders_removed": len(staging.removed),
            "staging_bytes_freed": staging.bytes_freed,
            "staging_folders_kept": len(staging.kept),
            "summary": dg.MetadataValue.md(
                markdown_table(
                    ["table", "expired", "days compacted", "branches removed", "files before", "files after"], rows
                )
            ),
        }
    )


maintenance_job = dg.define_asset_job("lakehouse_maintenance", selection=[lakehouse_maintenance])


def maintenance_definitions() -> dg.Definitions:
    return dg.Definitions(
        assets=[lakehouse_maintenance],
        jobs=[maintenance_job],
        schedules=[
            dg.ScheduleDefinition(
                name="daily_lakehouse_maintenance",
                job=maintenance_job,
                cron_schedule="0 3 * * *",
                execution_timezone="UTC",
                description="Compact and expire snapshots every night at 03:00 UTC.",
                default_status=dg.DefaultScheduleStatus.RUNNING,
            )
        ],
    )
