"""Raw event tables as Dagster assets: one asset per declared source, written through write-audit-publish.

``landing/<source>`` stands for the files dropped in the landing folder (or the Kafka topic the
stream worker appends from). ``raw/<source>`` validates files, quarantines bad rows, stages the
good ones on the run's audit branch, audits them (its blocking check ``audit``) and publishes
them: the writer ``keel.ingest.batch.FileIngest``, the same one ``keel ingest`` runs.
"""

from pathlib import Path

import dagster as dg

from assets.metadata import markdown_table
from assets.write_audit_publish import RunContext, WapTable, daily_partitions, wap_asset
from keel.dsl import EventSource
from keel.ingest.batch import FileIngest, StagedFiles
from keel.ingest.landing_folder import landing_files
from keel.project import Project


class IngestConfig(dg.Config):
    """Which files to land; empty means every file in the source's landing folder."""

    files: list[str] = []


def landing_key(source: EventSource) -> dg.AssetKey:
    return dg.AssetKey(["landing", source.name])


def raw_key(source: EventSource) -> dg.AssetKey:
    return dg.AssetKey(["raw", source.name])


def file_ingest(source: EventSource):
    """The writer of a run: the configured files, or every file waiting in the landing folder."""

    def writer(run: RunContext) -> FileIngest:
        settings = run.resources.lakehouse.settings()
        files = [Path(f) for f in run.config.files] or landing_files(settings.landing, source)
        if not files:
            raise ValueError(
                f"no files for source '{source.name}' in {settings.landing / source.name} "
                "(drop CSV/Parquet/JSONL files there or give the run config files=[...])"
            )
        return FileIngest(
            run.resources.lakehouse.lakehouse(),
            source,
            tuple(files),
            window=(run.days[0], run.days[-1]),
            staging_root=settings.staging,
        )

    return writer


def ingest_figures(staging: StagedFiles, lake=None) -> dict:
    """What a person checks on an ingest: the files, rows read and landed, and why rows were refused."""
    return {
        "files": dg.MetadataValue.json(staging.files),
        "rows_read": staging.rows_read,
        "rows_valid": staging.rows_valid,
        "rows_quarantined": sum(staging.quarantined.values()),
        "quarantined_by_reason": dg.MetadataValue.md(
            markdown_table(["reason", "rows"], sorted(staging.quarantined.items())) if staging.quarantined else "none"
        ),
        "rows_outside_partitions": staging.rows_outside_window,
        # Event ids the table held already (keel.ingest.resent): corrections, and re-sends that changed nothing.
        "rows_replaced": staging.replaced,
        "rows_unchanged": staging.unchanged,
        "rows_duplicate": staging.duplicates,
    }


def raw_event_assets(
    source: EventSource, partitions: dg.PartitionsDefinition
) -> tuple[dg.AssetSpec, dg.AssetsDefinition]:
    landing = dg.AssetSpec(
        landing_key(source),
        description=(
            f"Events of '{source.name}' arriving: files (CSV, Parquet or JSONL) dropped in KEEL_LANDING/{source.name}/, "
            f"which the landing_files sensor ingests"
            + (
                f", and the Kafka topic {source.kafka_topic}, which `keel stream` appends from"
                if source.kafka_topic
                else ""
            )
            + "."
        ),
        group_name="sources",
        kinds={"file", "kafka"} if source.kafka_topic else {"file"},
        owners=[source.owner] if source.owner and "@" in source.owner else None,
    )
    table = WapTable(
        key=raw_key(source),
        table=source.table_name,
        day_column=source.timestamp,
        partitions_def=partitions,
        deps=[landing_key(source)],
        group_name="raw",
        description=(
            f"The raw '{source.name}' events ({source.table_name}), partitioned by day of {source.timestamp}. {source.description} "
            "Each run validates its files (bad rows go to keel.quarantine with the reason and file row), stages the good "
            "rows on the run's audit branch merged by event id, audits them and publishes them to main."
        ),
        audit_description=(
            f"Great Expectations suite for '{source.name}' on the run's audit branch: schema, keys not null, value "
            "ranges and categories, unique event ids, rows per day against the days before. Blocks the publish."
        ),
        writer=file_ingest(source),
        config=IngestConfig,
        run_metadata=ingest_figures,
        tags={"keel/source": source.name, **source.tags},
        owners=[source.owner] if source.owner and "@" in source.owner else None,
    )
    return landing, wap_asset(table)


def ingest_job_name(source: EventSource) -> str:
    return f"ingest_{source.name}"


def ingest_run_config(source: EventSource, files) -> dict:
    """The run config of an ingest run of ``source`` over ``files`` (the landing sensor's, the demo's)."""
    return {"ops": {raw_key(source).to_python_identifier(): {"config": {"files": [str(f) for f in files]}}}}


def raw_event_definitions(project: Project) -> dg.Definitions:
    partitions = daily_partitions(project)
    specs, assets, jobs = [], [], []
    for source in project.sources:
        landing, raw = raw_event_assets(source, partitions)
        specs.append(landing)
        assets.append(raw)
        jobs.append(
            dg.define_asset_job(
                ingest_job_name(source),
                selection=dg.AssetSelection.assets(raw),
                description=f"Validate, stage, audit and publish files of '{source.name}'.",
            )
        )
    return dg.Definitions(assets=[*specs, *assets], jobs=jobs)
