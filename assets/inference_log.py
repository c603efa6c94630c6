"""The serving process's inference log as a Dagster asset, loaded one UTC day at a time.

``monitoring/inference_log`` reads the partition's days from what serving wrote (JSONL files
under KEEL_HOME/inference_log and, when KEEL_KAFKA_BOOTSTRAP is set, the topic
keel.inference_log.writer), stages them on the run's audit branch, audits them (its blocking check
``audit``) and publishes them: the writer ``keel.inference_log.loader.LogDays``. Upstream in
the graph are the ``serving/<model>`` processes that write the log. The job
``load_inference_log`` runs at 00:30 UTC for the day before; a range backfills as one run,
and a reload replaces its days.
"""

import dataclasses
from collections.abc import Sequence

import dagster as dg

from assets.metadata import markdown_table
from assets.write_audit_publish import RunContext, WapTable, daily_partitions, wap_asset
from keel.inference_log.loader import LoadedLog, LogDays, LogSummary, summarize
from keel.inference_log.records import TABLE
from keel.lakehouse.tables import Lakehouse, day_filter
from keel.project import Project

PUBLISHED_KEY = dg.AssetKey(["monitoring", "inference_log"])
JOB_NAME = "load_inference_log"
HOUR_OF_DAY, MINUTE_OF_HOUR = 0, 30


class InferenceLogConfig(dg.Config):
    """``allow_empty_days``: publish days with no rows, for days the service really had no traffic."""

    allow_empty_days: bool = False


def inference_log_asset(partitions: dg.PartitionsDefinition, serving: Sequence[dg.AssetKey]) -> dg.AssetsDefinition:
    def writer(run: RunContext) -> LogDays:
        settings = dataclasses.replace(
            run.resources.lakehouse.settings(), kafka_bootstrap=run.resources.kafka.servers()
        )
        return LogDays(run.resources.lakehouse.lakehouse(), settings, tuple(run.days), run.config.allow_empty_days)

    def run_figures(loaded: LoadedLog, lake: Lakehouse) -> dict:
        data = lake.read(TABLE, snapshot_id=loaded.staged.snapshot_id, row_filter=day_filter("ts", loaded.staged.days))
        return load_metadata(loaded, summarize(data))

    return wap_asset(
        WapTable(
            key=PUBLISHED_KEY,
            table=TABLE,
            day_column="ts",
            partitions_def=partitions,
            deps=list(serving),
            resources=frozenset({"kafka"}),
            config=InferenceLogConfig,
            group_name="monitoring",
            description=(
                "Every answer the serving process gave, one row per request, model and role (model, version, "
                f"alias, features, prediction, latency), by UTC day of ts ({TABLE}); read from serving's log files "
                "and Kafka topic. Exact copies from retried writes are kept once; unreadable records go to "
                "keel.quarantine."
            ),
            audit_description=(
                "Audit of the staged inference log: columns set, one row per request, model and role (unique "
                "log_id), alias champion or challenger, version >= 1, latency >= 0, rows per day against the days "
                "before, and no empty day unless allow_empty_days. Blocks the publish."
            ),
            writer=writer,
            run_metadata=run_figures,
            day_metadata=lambda loaded, day: {"records": loaded.rows_per_day.get(day, 0)},
        )
    )


def load_metadata(loaded: LoadedLog, summary: LogSummary) -> dict:
    """What a person checks on a load: rows per day, who answered, how fast, how often degraded."""
    per_model = [
        [r["model"], r["version"], r["alias"], "yes" if r["shadow"] else "", r["rows"]] for r in summary.per_model
    ]
    out = {
        "rows_per_day": dg.MetadataValue.md(
            markdown_table(["day", "rows"], [[str(d), n] for d, n in loaded.rows_per_day.items()][-31:])
        ),
        "rows_per_model": dg.MetadataValue.md(
            markdown_table(["model", "version", "alias", "shadow", "rows"], per_model)
        ),
        "records_read": loaded.records_read,
        "duplicates_removed": loaded.duplicates,
        "records_quarantined": loaded.quarantined,
        "quarantined_by_reason": dg.MetadataValue.json(loaded.bad_records),
        "files_read": loaded.files,
        "kafka_records_read": loaded.kafka_records if loaded.kafka_records is not None else "kafka not configured",
    }
    for name, value in summary.latency_ms.items():
        out[f"latency_ms_{name}"] = float(value)
    if summary.degraded_share is not None:
        out["degraded_share"] = float(summary.degraded_share)
    return out


def inference_log_definitions(project: Project, serving: Sequence[dg.AssetKey] = ()) -> dg.Definitions:
    """The inference log asset (downstream of the ``serving`` assets that write it), a load job
    and a daily 00:30 UTC schedule. Its stage step needs the ``kafka`` resource (resources.kafka)."""
    asset = inference_log_asset(daily_partitions(project), serving)
    job = dg.define_asset_job(
        JOB_NAME,
        selection=dg.AssetSelection.assets(asset),
        description="Load a range of days of the serving process's inference log, audit and publish.",
    )
    schedule = dg.build_schedule_from_partitioned_job(
        job,
        hour_of_day=HOUR_OF_DAY,
        minute_of_hour=MINUTE_OF_HOUR,
        name=f"{JOB_NAME}_daily",
        description="Load yesterday's inference log every day at 00:30 UTC.",
        default_status=dg.DefaultScheduleStatus.RUNNING,
    )
    return dg.Definitions(assets=[asset], jobs=[job], schedules=[schedule])
