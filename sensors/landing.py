"""The landing-folder sensor: a new or changed file starts an ingest run over the days it holds."""

import datetime as dt
import json
import time

import dagster as dg

from assets.raw_events import ingest_job_name, ingest_run_config, landing_files
from keel.project import Project
from keel.readers import FileFormatError, timestamp_range
from resources import LakehouseResource

# Dagster's run tags for a single run over a partition range (BackfillPolicy.single_run()).
ASSET_PARTITION_RANGE_START_TAG = "dagster/asset_partition_range_start"
ASSET_PARTITION_RANGE_END_TAG = "dagster/asset_partition_range_end"
# A file still being copied changes size and mtime; wait until it has been still this long.
SETTLE_SECONDS = 5.0


def landing_sensor(project: Project, jobs: list) -> dg.SensorDefinition:
    @dg.sensor(
        name="landing_files",
        jobs=jobs,
        minimum_interval_seconds=30,
        description=(
            "Watches KEEL_LANDING/<source>/ for new or changed CSV, Parquet and JSONL files and "
            "launches one ingest run per file over the day partitions its events fall in. "
            "The cursor maps each file to the size and mtime last ingested."
        ),
    )
    def landing_files_sensor(context: dg.SensorEvaluationContext, lakehouse: LakehouseResource):
        landing = lakehouse.settings().landing
        cursor: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
        requests, skipped = [], []
        today = dt.datetime.now(dt.UTC).date()
        for source in project.sources:
            for path in landing_files(landing, source):
                stat = path.stat()
                signature = f"{stat.st_size}:{stat.st_mtime_ns}"
                if cursor.get(str(path)) == signature:
                    continue
                if time.time() - stat.st_mtime < SETTLE_SECONDS:
                    continue
                try:
                    span = timestamp_range(path, source.timestamp)
                except FileFormatError as exc:
                    skipped.append(str(exc))
                    cursor[str(path)] = signature
                    continue
                if span is None:
                    skipped.append(f"{path}: no parsable {source.timestamp} values")
                    cursor[str(path)] = signature
                    continue
                first = max(span[0].date(), project.start_date)
                last = min(span[1].date(), today)
                if first > last:
                    skipped.append(f"{path}: events fall outside {project.start_date}..{today}")
                    cursor[str(path)] = signature
                    continue
                requests.append(
                    dg.RunRequest(
                        run_key=f"{path}:{signature}",
                        job_name=ingest_job_name(source),
                        run_config=ingest_run_config(source, [path]),
                        tags={
                            ASSET_PARTITION_RANGE_START_TAG: first.isoformat(),
                            ASSET_PARTITION_RANGE_END_TAG: last.isoformat(),
                            "keel/file": str(path),
                            "keel/source": source.name,
                        },
                    )
                )
                cursor[str(path)] = signature
        for message in skipped:
            context.log.warning(f"not ingested: {message}")
        if not requests:
            return dg.SensorResult(
                skip_reason="; ".join(skipped) or "no new files", cursor=json.dumps(cursor, sort_keys=True)
            )
        return dg.SensorResult(run_requests=requests, cursor=json.dumps(cursor, sort_keys=True))

    return landing_files_sensor


def sensor_definitions(project: Project, jobs: list) -> dg.Definitions:
    return dg.Definitions(sensors=[landing_sensor(project, jobs)])
