"""Data quality of the feature tables and the inference log as Dagster assets, one day at a time.

``monitoring/<table>_quality`` profiles each day of its table against the table's own recent
history (``keel.monitoring.data_quality``) and records the outcomes in ``monitoring.quality``. Its checks
``nulls``, ``range``, ``categories``, ``freshness`` and ``volume`` judge the latest day of the
run: WARN or ERROR by the rules' bounds. They alert; they do not retrain (a model retrained
on broken data learns the breakage).
"""

from collections.abc import Sequence

import dagster as dg

from assets import single_run_backfills
from assets.inference_log import PUBLISHED_KEY as INFERENCE_LOG_KEY
from assets.metadata import markdown_table
from assets.write_audit_publish import daily_partitions, run_days
from keel.inference_log.records import TABLE as INFERENCE_LOG_TABLE
from keel.monitoring.data_quality import (
    CHECKS,
    QualityTarget,
    profile_days,
    project_targets,
    quality_rows,
    write_quality,
)
from keel.project import Project
from resources import LakehouseResource

QUALITY_JOB = "data_quality"
SEVERITY = {"error": dg.AssetCheckSeverity.ERROR, "warn": dg.AssetCheckSeverity.WARN}
CHECK_TEXT = {
    "nulls": "a column's NULL share against its mean over the history",
    "range": "the share of numbers outside the history's [min, max]",
    "categories": "the share of rows holding a string value the history never had",
    "freshness": "the age of the newest row at the end of the day",
    "volume": "the day's rows against the same weekday of recent weeks",
}


def quality_key(target: QualityTarget) -> dg.AssetKey:
    return dg.AssetKey(["monitoring", f"{target.table.split('.')[-1]}_quality"])


def quality_targets(project: Project) -> list[tuple[QualityTarget, dg.AssetKey]]:
    """Every feature table and the inference log, with the asset that publishes each."""
    upstream = {group.table_name: dg.AssetKey(["features", group.name]) for group in project.feature_groups}
    upstream[INFERENCE_LOG_TABLE] = INFERENCE_LOG_KEY
    return [(target, upstream[target.table]) for target in project_targets(project)]


def quality_asset(target: QualityTarget, upstream: dg.AssetKey, partitions: dg.PartitionsDefinition):
    key = quality_key(target)

    @dg.asset(
        key=key,
        deps=[upstream],
        partitions_def=partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),
        automation_condition=dg.AutomationCondition.eager(),
        # Runs writing monitoring.quality wait for each other (the instance's pools count whole runs).
        pool="monitoring.quality",
        group_name="monitoring",
        kinds={"iceberg", "duckdb"},
        check_specs=[
            dg.AssetCheckSpec(name, asset=key, description=f"{target.table}: {CHECK_TEXT[name]}.") for name in CHECKS
        ],
        description=(
            f"Data quality of {target.table} per day against its last {target.rules.history_days} days: NULL shares, "
            "ranges, new categories, freshness and volume (weekday-aware), recorded in monitoring.quality."
        ),
    )
    def quality(context: dg.AssetExecutionContext, lakehouse: LakehouseResource):
        lake = lakehouse.lakehouse()
        days = run_days(context)
        try:
            results = profile_days(lake, target, days)
        except ValueError as exc:
            raise dg.Failure(str(exc), allow_retries=False) from None
        rows = quality_rows(results, context.run.run_id)
        snapshot = write_quality(lake, target.table, days, rows, context.run.run_id)
        latest = results[-1]
        checks = []
        for name in CHECKS:
            failing = latest.failing(name)
            level = latest.worst(name)
            described = "; ".join(f"{o.column + ': ' if o.column else ''}{o.detail}" for o in failing[:6])
            if not failing:
                found = [o for o in latest.outcomes if o.check == name]
                described = found[0].detail if len(found) == 1 else f"{len(found)} column(s) {level}"
            checks.append(
                dg.AssetCheckResult(
                    check_name=name,
                    passed=level in ("ok", "unknown"),
                    severity=SEVERITY.get(level, dg.AssetCheckSeverity.WARN),
                    description=f"{latest.day}: {described}",
                    metadata={"day": str(latest.day), "failing": len(failing), "level": level},
                )
            )
        for result in results:
            context.add_asset_metadata(day_metadata(target, result, snapshot), partition_key=result.day.isoformat())
        return dg.MaterializeResult(check_results=checks)

    return quality


def day_metadata(target: QualityTarget, result, snapshot: int) -> dict:
    """One day's profile: its rows, each check's level, and the problems found that day."""
    problems = [[o.check, o.column, o.level, o.detail] for o in result.outcomes if o.level in ("warn", "error")]
    return {
        "table": target.table,
        "profiled_rows": result.rows,
        "snapshot_id": str(snapshot),
        **{f"level_{name}": result.worst(name) for name in CHECKS},
        "problems": dg.MetadataValue.md(
            markdown_table(["check", "column", "level", "detail"], problems) if problems else "none"
        ),
    }


def quality_definitions(
    project: Project, targets: Sequence[tuple[QualityTarget, dg.AssetKey]] | None = None
) -> dg.Definitions:
    """A quality asset per watched table, the job ``data_quality`` over all of them and a daily
    01:15 UTC schedule for yesterday (the assets are eager too, when the daemon runs)."""
    partitions = daily_partitions(project)
    with single_run_backfills():
        assets = [quality_asset(t, up, partitions) for t, up in (targets or quality_targets(project))]
    job = dg.define_asset_job(
        QUALITY_JOB,
        selection=dg.AssetSelection.assets(*assets),
        description="Profile a range of days of every feature table and the inference log against their history.",
    )
    schedule = dg.build_schedule_from_partitioned_job(
        job,
        hour_of_day=1,
        minute_of_hour=15,
        name=f"{QUALITY_JOB}_daily",
        description="Yesterday's data quality, at 01:15 UTC.",
        default_status=dg.DefaultScheduleStatus.RUNNING,
    )
    return dg.Definitions(assets=assets, jobs=[job], schedules=[schedule])
