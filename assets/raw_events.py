"""Raw event tables as Dagster assets, written through write-audit-publish.

Per declared source, three steps in one run, each visible in the UI:
``raw/<source>_staged`` lands the files on the run's audit branch, the blocking check
``audit`` runs the source's Great Expectations suite on that branch, and ``raw/<source>``
fast-forwards main. A failed audit stops the run before the publish step.
"""

import datetime as dt
from pathlib import Path

import dagster as dg

from assets import single_run_backfills
from assets.metadata import audit_check_result, table_preview
from keel import wap
from keel.dsl import EventSource
from keel.ingest import audit_staged, prepare, stage_prepared, write_quarantine
from keel.lakehouse import day_filter, partition_label
from keel.project import Project
from keel.readers import FORMATS
from resources import LakehouseResource


class IngestConfig(dg.Config):
    """Which files to land; empty means every file in the source's landing folder."""

    files: list[str] = []


def daily_partitions(project: Project) -> dg.DailyPartitionsDefinition:
    return dg.DailyPartitionsDefinition(start_date=project.start_date.isoformat(), timezone="UTC")


def landing_files(landing: Path, source: EventSource) -> list[Path]:
    """Files waiting in ``landing/<source>/`` that a reader understands, oldest name first."""
    folder = landing / source.name
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and _known_format(p))


def _known_format(path: Path) -> bool:
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    return bool(suffixes) and suffixes[-1] in FORMATS


def wap_run_id(context: dg.OpExecutionContext | dg.AssetCheckExecutionContext) -> str:
    # A re-execution of a failed run keeps the branch of the run it retries.
    return context.run.root_run_id or context.run.run_id


def window_of(context) -> tuple[dt.date, dt.date]:
    window = context.partition_time_window
    return window.start.date(), (window.end - dt.timedelta(days=1)).date()


def raw_event_assets(source: EventSource, partitions: dg.PartitionsDefinition) -> list:
    staged_key = dg.AssetKey(["raw", f"{source.name}_staged"])
    landing_key = dg.AssetKey(["landing", source.name])
    published_key = dg.AssetKey(["raw", source.name])
    # Both steps are partitioned alike and a range runs as one run: one branch, one audit, one publish.
    shared = {
        "partitions_def": partitions,
        "backfill_policy": dg.BackfillPolicy.single_run(),
        "group_name": "raw",
        "tags": {"keel/source": source.name, **source.tags},
        "owners": [source.owner] if source.owner and "@" in source.owner else None,
    }

    landing = dg.AssetSpec(
        landing_key,
        description=f"Files dropped for '{source.name}' (CSV, Parquet or JSONL) in the landing folder.",
        group_name="landing",
        kinds={"file"},
    )

    @dg.asset(
        key=staged_key,
        deps=[landing_key],
        kinds={"iceberg", "duckdb"},
        **shared,
        description=(
            f"Events of '{source.name}' validated and landed on the run's audit branch "
            f"({source.table_name}@audit_<run id>); bad rows go to keel.quarantine. {source.description}"
        ),
    )
    def staged(context: dg.AssetExecutionContext, config: IngestConfig, lakehouse: LakehouseResource):
        settings = lakehouse.settings()
        lake = lakehouse.lakehouse()
        files = [Path(f) for f in config.files] or landing_files(settings.landing, source)
        if not files:
            raise dg.Failure(
                description=f"no files for source '{source.name}' in {settings.landing / source.name} "
                "(drop CSV/Parquet/JSONL files there or pass config files=[...])"
            )
        window = window_of(context)
        run_id = wap_run_id(context)
        context.log.info(f"validating {len(files)} file(s) for {partition_label(_days(window))}")
        with prepare(source, files, window=window) as prepared:
            quarantined = write_quarantine(lake, prepared, run_id)
            context.log.info(f"{prepared.rows_read} rows read, {prepared.rows_valid} valid, {quarantined} quarantined")
            stage = stage_prepared(lake, prepared, run_id)
            if stage is None:
                raise dg.Failure(
                    description=f"source '{source.name}': no valid rows for {partition_label(_days(window))} "
                    f"({prepared.rows_read} read, {quarantined} quarantined, "
                    f"{prepared.rows_outside_window} outside the partitions)",
                    metadata={"quarantined": prepared.quarantined},
                )
            preview = lake.read(
                source.table_name,
                snapshot_id=stage.snapshot_id,
                row_filter=day_filter(source.timestamp, stage.days[-1:]),
                limit=10,
            )
            return dg.MaterializeResult(
                metadata={
                    "branch": stage.branch,
                    "staged_snapshot_id": str(stage.snapshot_id),
                    "base_snapshot_id": str(stage.base_snapshot_id),
                    "partitions": stage.partition,
                    "files": dg.MetadataValue.json([str(f) for f in files]),
                    "rows_read": prepared.rows_read,
                    "rows_valid": prepared.rows_valid,
                    "rows_quarantined": quarantined,
                    "quarantined_by_reason": dg.MetadataValue.json(prepared.quarantined),
                    "rows_outside_partitions": prepared.rows_outside_window,
                    "dagster/row_count": stage.rows,
                    "preview": table_preview(preview, sort_by=source.timestamp),
                }
            )

    @dg.asset_check(
        asset=staged_key,
        name="audit",
        blocking=True,
        description=(
            f"Great Expectations suite for '{source.name}' on the audit branch: schema, keys not null, "
            "value ranges and categories, unique event ids, row count against recent partitions. "
            "Blocks the publish step."
        ),
    )
    def audit(context: dg.AssetCheckExecutionContext, lakehouse: LakehouseResource) -> dg.AssetCheckResult:
        lake = lakehouse.lakehouse()
        stage = wap.find_staged(lake, source.table_name, wap_run_id(context))
        return audit_check_result(audit_staged(lake, source, stage), stage.branch)

    @dg.asset(
        key=published_key,
        deps=[staged_key],
        kinds={"iceberg"},
        **shared,
        description=(
            f"The raw '{source.name}' events on main ({source.table_name}), partitioned by day of "
            f"{source.timestamp}. Published by fast-forwarding main to the audited branch. {source.description}"
        ),
    )
    def published(context: dg.AssetExecutionContext, lakehouse: LakehouseResource):
        lake = lakehouse.lakehouse()
        stage = wap.find_staged(lake, source.table_name, wap_run_id(context))
        before = lake.head(source.table_name)
        snapshot = wap.publish(lake, stage)
        rows = lake.partition_rows(source.table_name)
        in_run = {str(d): rows.get(d, 0) for d in stage.days}
        return dg.MaterializeResult(
            metadata={
                "snapshot_id": str(snapshot),
                "previous_snapshot_id": str(before),
                "partitions": stage.partition,
                "rows_in_partitions": dg.MetadataValue.json(in_run),
                "dagster/row_count": sum(rows.values()),
                "table": source.table_name,
            }
        )

    return [landing, staged, audit, published]


def _days(window: tuple[dt.date, dt.date]) -> list[dt.date]:
    return [window[0] + dt.timedelta(days=i) for i in range((window[1] - window[0]).days + 1)]


def ingest_job_name(source: EventSource) -> str:
    return f"ingest_{source.name}"


def ingest_run_config(source: EventSource, files) -> dict:
    """The run config of an ingest run of ``source`` over ``files`` (the landing sensor's, the demo's)."""
    return {"ops": {f"raw__{source.name}_staged": {"config": {"files": [str(f) for f in files]}}}}


def raw_event_definitions(project: Project) -> dg.Definitions:
    partitions = daily_partitions(project)
    assets, checks, specs, jobs = [], [], [], []
    for source in project.sources:
        with single_run_backfills():
            landing, staged, audit, published = raw_event_assets(source, partitions)
        specs.append(landing)
        assets += [staged, published]
        checks.append(audit)
        jobs.append(
            dg.define_asset_job(
                ingest_job_name(source),
                selection=dg.AssetSelection.assets(staged, published),
                description=f"Validate, stage, audit and publish files of '{source.name}'.",
                tags={"keel/table": source.table_name},
            )
        )
    return dg.Definitions(assets=[*specs, *assets], asset_checks=checks, jobs=jobs)
