"""The serving process's inference log as Dagster assets, loaded one UTC day at a time.

Write-audit-publish like the raw events: ``monitoring/inference_log_staged`` reads the
partition's days from what serving wrote (JSONL files under KEEL_HOME/inference_log and,
when KEEL_KAFKA_BOOTSTRAP is set, the topic keel.inference_log) and stages them on the run's
audit branch; the blocking check ``audit`` checks the branch; ``monitoring/inference_log``
fast-forwards main. The job ``load_inference_log`` runs at 00:30 UTC for the day before; a
range backfills as one run, and a reload replaces its days.
"""

import dataclasses

import dagster as dg

from assets import single_run_backfills
from assets.metadata import audit_check_result, markdown_table, table_preview
from assets.raw_events import daily_partitions, wap_run_id, window_of
from keel import wap
from keel.inference_log import TABLE, TOPIC, InferenceLogError
from keel.inference_log_load import LoadedLog, LogSummary, audit_inference_log, stage_inference_log, summarize
from keel.lakehouse import day_filter
from keel.materialize import days_between
from keel.project import Project
from resources import LakehouseResource
from resources.kafka import KafkaResource

SOURCE_KEY = dg.AssetKey(["serving", "inference_log"])
STAGED_KEY = dg.AssetKey(["monitoring", "inference_log_staged"])
PUBLISHED_KEY = dg.AssetKey(["monitoring", "inference_log"])
JOB_NAME = "load_inference_log"
HOUR_OF_DAY, MINUTE_OF_HOUR = 0, 30


class InferenceLogAuditConfig(dg.Config):
    """``allow_empty_days``: publish days with no rows, for days the service really had no traffic."""

    allow_empty_days: bool = False


def inference_log_assets(partitions: dg.PartitionsDefinition) -> list:
    shared = {
        "partitions_def": partitions,
        "backfill_policy": dg.BackfillPolicy.single_run(),
        "group_name": "monitoring",
    }
    source = dg.AssetSpec(
        SOURCE_KEY,
        description=(
            "What the serving process logs per answer: JSONL files under KEEL_HOME/inference_log/day=YYYY-MM-DD, "
            f"or the Kafka topic {TOPIC} when KEEL_KAFKA_BOOTSTRAP is set."
        ),
        group_name="serving",
        kinds={"file", "kafka"},
    )

    @dg.asset(
        key=STAGED_KEY,
        deps=[SOURCE_KEY],
        kinds={"iceberg", "duckdb"},
        metadata={"table": TABLE},
        description=(
            "Every answer serving logged on the partition's UTC days (model, version, role, features, prediction, "
            f"latency), read from the log files and topic and staged on the run's audit branch ({TABLE}@audit_<run "
            "id>). Exact copies from retried writes are kept once; unreadable records go to keel.quarantine."
        ),
        **shared,
    )
    def staged(context: dg.AssetExecutionContext, lakehouse: LakehouseResource, kafka: KafkaResource):
        settings = dataclasses.replace(lakehouse.settings(), kafka_bootstrap=kafka.servers())
        lake = lakehouse.lakehouse()
        days = days_between(*window_of(context))
        try:
            loaded = stage_inference_log(lake, settings, days, wap_run_id(context))
        except InferenceLogError as exc:
            raise dg.Failure(str(exc)) from None
        for note in loaded.notes:
            context.log.info(note)
        if loaded.quarantined:
            context.log.warning(f"{loaded.quarantined} unreadable record(s) quarantined: {loaded.bad_records}")
        snapshot = loaded.staged.snapshot_id
        data = lake.read(TABLE, snapshot_id=snapshot, row_filter=day_filter("ts", days))
        preview = lake.read(TABLE, snapshot_id=snapshot, row_filter=day_filter("ts", days[-1:]), limit=10)
        return dg.MaterializeResult(
            metadata={**load_metadata(loaded, summarize(data)), "preview": table_preview(preview, sort_by="ts")}
        )

    @dg.asset_check(
        asset=STAGED_KEY,
        name="audit",
        blocking=True,
        description=(
            "Audit of the staged inference log: columns set, one row per request, model and role (unique log_id), "
            "alias champion or challenger, version >= 1, latency >= 0, rows per day against recent days, and no "
            "empty day unless allow_empty_days. Blocks the publish step."
        ),
    )
    def audit(
        context: dg.AssetCheckExecutionContext, config: InferenceLogAuditConfig, lakehouse: LakehouseResource
    ) -> dg.AssetCheckResult:
        lake = lakehouse.lakehouse()
        stage = wap.find_staged(lake, TABLE, wap_run_id(context))
        return audit_check_result(
            audit_inference_log(lake, stage, allow_empty_days=config.allow_empty_days), stage.branch
        )

    @dg.asset(
        key=PUBLISHED_KEY,
        deps=[STAGED_KEY],
        kinds={"iceberg"},
        metadata={"table": TABLE},
        description=f"The serving process's answers, one row per request, model and role, by day of ts ({TABLE}).",
        **shared,
    )
    def published(context: dg.AssetExecutionContext, lakehouse: LakehouseResource):
        lake = lakehouse.lakehouse()
        stage = wap.find_staged(lake, TABLE, wap_run_id(context))
        before = lake.head(TABLE)
        snapshot = wap.publish(lake, stage)
        return dg.MaterializeResult(
            metadata={
                "table": TABLE,
                "snapshot_id": str(snapshot),
                "previous_snapshot_id": str(before),
                "partitions": stage.partition,
                "dagster/row_count": stage.rows,
            }
        )

    return [source, staged, audit, published]


def load_metadata(loaded: LoadedLog, summary: LogSummary) -> dict:
    """What a person checks on a load: rows per day, who answered, how fast, how often degraded."""
    per_model = [
        [r["model"], r["version"], r["alias"], "yes" if r["shadow"] else "", r["rows"]] for r in summary.per_model
    ]
    out = {
        "table": TABLE,
        "branch": loaded.staged.branch,
        "staged_snapshot_id": str(loaded.staged.snapshot_id),
        "partitions": loaded.staged.partition,
        "dagster/row_count": loaded.staged.rows,
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


def inference_log_definitions(project: Project) -> dg.Definitions:
    """The inference log's staged/audit/published assets, a load job and a daily 00:30 UTC schedule.

    The staged step needs the ``kafka`` resource (resources.kafka), bound in the code location.
    """
    with single_run_backfills():
        source, staged, audit, published = inference_log_assets(daily_partitions(project))
    job = dg.define_asset_job(
        JOB_NAME,
        selection=dg.AssetSelection.assets(staged, published),
        description="Load a range of days of the serving process's inference log, audit and publish.",
    )
    schedule = dg.build_schedule_from_partitioned_job(
        job,
        hour_of_day=HOUR_OF_DAY,
        minute_of_hour=MINUTE_OF_HOUR,
        name=f"{JOB_NAME}_daily",
        description="Load yesterday's inference log every day at 00:30 UTC.",
    )
    return dg.Definitions(assets=[source, staged, published], asset_checks=[audit], jobs=[job], schedules=[schedule])
