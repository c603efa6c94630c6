"""Model monitoring as Dagster assets: drift and live performance per model, by window.

Per monitored model: ``monitoring/<name>_drift`` compares each window's logged traffic with
the version's training reference (checks ``drift``, ``prediction_drift``, ``label_drift``) and
draws an HTML report; ``monitoring/<name>_performance`` joins the labels that arrived to the
logged predictions (check ``performance``). Both are partitioned like the monitor (daily, or
hourly), backfill a range in one run, and update when the inference log is published
(eager). ``monitor_<name>`` runs both; its schedule judges yesterday at 01:00 UTC and again
the window whose labels have landed since (``label_delay`` + ``label_window`` ago).

Each window's figures are on its own partition's materialization (the judged window's also
carry every feature's statistics, the plots and the report's link); the checks judge the
latest window of the run and list the run's windows; their verdicts come from
``keel.monitoring.verdicts``. A WARN check is an alert; an ERROR ``drift`` or ``performance``
check is what the retrain sensor acts on.
"""

import datetime as dt
import logging
from collections.abc import Sequence
from pathlib import Path

import dagster as dg

from assets import single_run_backfills
from assets.inference_log import PUBLISHED_KEY as INFERENCE_LOG_KEY
from assets.metadata import markdown_table
from assets.models import champion_key
from keel.config import Settings
from keel.models.reference import ReferenceSampleError
from keel.monitoring import report as drift_report
from keel.monitoring import verdicts
from keel.monitoring.declarations import MonitorSpec
from keel.monitoring.drift import DriftError, DriftReport
from keel.monitoring.report import most_drifted
from keel.monitoring.run import DriftRun, PerformanceRun, References, drift_history, run_drift, run_performance
from keel.project import Project
from resources import LakehouseResource, MlflowResource

HOUR_OF_DAY = 1


def drift_key(name: str) -> dg.AssetKey:
    return dg.AssetKey(["monitoring", f"{name}_drift"])


def performance_key(name: str) -> dg.AssetKey:
    return dg.AssetKey(["monitoring", f"{name}_performance"])


def monitor_job_name(name: str) -> str:
    return f"monitor_{name}"


def monitor_partitions(project: Project, monitor: MonitorSpec) -> dg.PartitionsDefinition:
    start = project.start_date.isoformat()
    if monitor.partitions == "hourly":
        return dg.HourlyPartitionsDefinition(start_date=f"{start}-00:00", timezone="UTC")
    return dg.DailyPartitionsDefinition(start_date=start, timezone="UTC")


def monitoring_assets(project: Project, monitor: MonitorSpec) -> list:
    spec = monitor.model
    labels_key = dg.AssetKey(["raw", spec.labels.name])
    shared = {
        "partitions_def": monitor_partitions(project, monitor),
        "backfill_policy": dg.BackfillPolicy.single_run(),
        "group_name": "monitoring",
        "automation_condition": dg.AutomationCondition.eager(),
        "tags": {"keel/model": spec.name},
        "kinds": {"iceberg", "duckdb"},
    }

    @dg.asset(
        key=drift_key(spec.name),
        deps=[INFERENCE_LOG_KEY, labels_key, champion_key(spec)],
        # Runs writing one monitoring table wait for each other (the instance's pools count whole runs).
        pool="monitoring.drift",
        check_specs=[
            dg.AssetCheckSpec(
                "drift",
                asset=drift_key(spec.name),
                description=(
                    f"Feature drift of '{spec.name}' in the latest window: ERROR when at least "
                    f"{monitor.drift_share:.0%} of features drifted{' (by importance)' if monitor.weighted else ''}, "
                    "WARN when some feature or the prediction moved."
                ),
            ),
            dg.AssetCheckSpec(
                "prediction_drift",
                asset=drift_key(spec.name),
                description=f"The distribution of '{spec.name}''s scores against its hold-out scores "
                f"({monitor.prediction.statistic} >= {monitor.prediction.threshold:g} is ERROR).",
            ),
            dg.AssetCheckSpec(
                "label_drift",
                asset=drift_key(spec.name),
                description="The labels that arrived for the window against the training labels (WARN).",
            ),
        ],
        description=(
            f"Drift of '{spec.name}': each window's answers in monitoring.inference_log against the serving version's "
            f"training reference, per feature (numeric: {monitor.numeric.statistic}, categorical: "
            f"{monitor.categorical.statistic}; every statistic is recorded), for the prediction and for the labels. "
            "Rows go to monitoring.drift, one per window, version and target; each run writes an HTML report."
        ),
        **shared,
    )
    def drift_asset(context: dg.AssetExecutionContext, lakehouse: LakehouseResource, mlflow: MlflowResource):
        settings = mlflow.settings()
        lake = lakehouse.lakehouse()
        window = context.partition_time_window
        try:
            run = run_drift(lake, settings, monitor, window.start, window.end, context.run.run_id)
        except (DriftError, ReferenceSampleError) as exc:
            raise dg.Failure(str(exc), allow_retries=False) from None
        windows = by_window(context, run.reports)
        for key in context.partition_keys:
            context.add_asset_metadata(drift_window_metadata(windows.get(key, []), run), partition_key=key)
        shown = run.judged()
        if shown is not None:
            path = drift_report.report_path(settings.home, spec.name, shown.start)
            history = drift_history(lake, spec.name, until=window.end)
            drift_report.write(history, path, model=spec.name, window_start=shown.start, version=shown.version)
            metadata = latest_drift_metadata(shown)
            metadata["plots"] = dg.MetadataValue.md(
                drift_report.plots_markdown(history, model=spec.name, window_start=shown.start, version=shown.version)
            )
            metadata["report"] = dg.MetadataValue.path(str(path))
            metadata.update(report_link_metadata(context.log, settings, path, shown))
            context.add_asset_metadata(metadata, partition_key=window_key(context, shown.start))
        return dg.MaterializeResult(check_results=drift_checks(run, monitor))

    @dg.asset(
        key=performance_key(spec.name),
        deps=[INFERENCE_LOG_KEY, labels_key, champion_key(spec)],
        pool="monitoring.performance",
        check_specs=[
            dg.AssetCheckSpec(
                "performance",
                asset=performance_key(spec.name),
                description=(
                    f"Live {spec.metric} of '{spec.name}' on the latest window with at least {monitor.min_labels} "
                    f"labels against the training hold-out: a drop over {monitor.tolerance:g} is ERROR, over "
                    f"{monitor.tolerance / 2:g} WARN."
                ),
            )
        ],
        description=(
            f"Performance of '{spec.name}': logged predictions joined to the first label of their entity timed up to "
            f"{monitor.label_window} after them, per window and version (metrics, calibration), in "
            "monitoring.performance. Windows are judged again as labels arrive."
        ),
        **shared,
    )
    def performance_asset(context: dg.AssetExecutionContext, lakehouse: LakehouseResource, mlflow: MlflowResource):
        settings = mlflow.settings()
        window = context.partition_time_window
        try:
            run = run_performance(
                lakehouse.lakehouse(),
                settings,
                monitor,
                window.start,
                window.end,
                context.run.run_id,
                references=References(settings, spec.name),
            )
        except (DriftError, ReferenceSampleError) as exc:
            raise dg.Failure(str(exc), allow_retries=False) from None
        windows = by_window(context, run.reports)
        for key in context.partition_keys:
            meta = performance_window_metadata(windows.get(key, []), run, spec.metric)
            context.add_asset_metadata(meta, partition_key=key)
        return dg.MaterializeResult(check_results=[performance_check(run, monitor)])

    return [drift_asset, performance_asset]


# Check results ----------------------------------------------------------------------------

SEVERITY = {verdicts.ERROR: dg.AssetCheckSeverity.ERROR, verdicts.WARN: dg.AssetCheckSeverity.WARN}


def check_result(verdict: verdicts.Verdict, drawn: dict | None = None) -> dg.AssetCheckResult:
    """An engine verdict as a Dagster check result; ``drawn`` is metadata the asset adds (tables of the run)."""
    metadata = {k: dg.MetadataValue.json(v) if isinstance(v, list) else v for k, v in verdict.metadata.items()}
    return dg.AssetCheckResult(
        check_name=verdict.check,
        passed=verdict.passed,
        severity=SEVERITY[verdict.severity],
        description=verdict.description,
        metadata={**metadata, **(drawn or {})},
    )


def drift_checks(run: DriftRun, monitor: MonitorSpec) -> list[dg.AssetCheckResult]:
    feature, *targets = verdicts.drift_verdicts(run, monitor)
    return [check_result(feature, drift_overview(run)), *(check_result(v) for v in targets)]


def performance_check(run: PerformanceRun, monitor: MonitorSpec) -> dg.AssetCheckResult:
    # The run's windows at a glance (each window's own figures are on its partition).
    overview = {"windows_in_run": _performance_table(run.reports, monitor.model.metric)}
    return check_result(verdicts.performance_verdict(run, monitor), overview)


# Metadata ---------------------------------------------------------------------------------


def report_link_metadata(log: logging.Logger, settings: Settings, path: Path, r: DriftReport) -> dict:
    """The report logged to the version's MLflow run, linked as the MLflow UI page that shows it."""
    try:
        logged = drift_report.log_report(settings, path, model=r.model, version=r.version, window_start=r.start)
    except drift_report.ReportLogError as exc:
        # The drift results are already in monitoring.drift; failing the run here would drop this
        # materialization and its checks (no alert, no retrain) for the sake of a link. So the run
        # succeeds and says plainly that the report is only on disk; a rerun of the window logs it.
        log.warning(str(exc))
        return {"report_url_error": str(exc)}
    log.info(f"drift report: {logged.url}")
    return {"report_url": dg.MetadataValue.url(logged.url), "report_artifact": logged.artifact_uri}


def window_key(context: dg.AssetExecutionContext, start: dt.datetime) -> str:
    """The partition (day or hour) a monitoring window is."""
    return context.assets_def.partitions_def.get_partition_key_for_timestamp(start.timestamp())


def by_window(context: dg.AssetExecutionContext, reports: Sequence) -> dict[str, list]:
    """A run's reports by the partition of their window (a window has one report per version)."""
    out: dict[str, list] = {}
    for r in reports:
        out.setdefault(window_key(context, r.start), []).append(r)
    return out


def _drift_row(r: DriftReport) -> list:
    return [f"{r.start:%Y-%m-%d %H:%M}", r.version, r.rows, r.sample_rows, f"{r.drift_share:.0%}", r.level]


def drift_window_metadata(reports: list[DriftReport], run: DriftRun) -> dict:
    """One window: each version's answers and verdict, and the judged version's drifted features."""
    out = {"table": "monitoring.drift", "snapshot_id": str(run.snapshot_id)}
    if not reports:
        return {**out, "answers": 0, "level": "no traffic"}
    main = max(reports, key=lambda r: r.rows)
    return {
        **out,
        "answers": sum(r.rows for r in reports),
        "level": main.level,
        "drift_share": float(main.drift_share),
        "drifted": dg.MetadataValue.json([t.name for t in most_drifted(main.drifted)]),
        "versions": dg.MetadataValue.md(
            markdown_table(
                ["window", "version", "answers", "compared", "drifted", "level"], [_drift_row(r) for r in reports]
            )
        ),
    }


def latest_drift_metadata(r: DriftReport) -> dict:
    """The judged window's every feature and statistic, for the partition the checks speak of."""
    rows = [
        [t.name, t.kind, t.threshold.statistic, _fmt(t.value), t.level, *(_fmt(v) for v in t.statistics().values())]
        for t in sorted(r.features, key=lambda t: -(t.value or 0) if t.threshold.larger_is_worse else (t.value or 1))
    ]
    out = {
        "latest_features": dg.MetadataValue.md(
            markdown_table(
                ["feature", "kind", "judged by", "value", "level", "psi", "ks", "ks_p", "wass", "js", "chi2_p"], rows
            )
        ),
        "latest_drift_share": float(r.drift_share),
        "sample_rows": r.sample_rows,
    }
    if r.prediction:
        out["latest_prediction_psi"] = float(r.prediction.stats.psi)
    for note in r.notes:
        out["note"] = note
    return out


def drift_overview(run: DriftRun) -> dict:
    """The run's windows at a glance, for the drift check (each window's own figures are on its partition)."""
    windows = [_drift_row(r) for r in run.reports]
    return {
        "windows_in_run": dg.MetadataValue.md(
            markdown_table(["window", "version", "answers", "compared", "drifted", "level"], windows[-60:])
            if windows
            else "no traffic"
        ),
        "windows_drifted": sum(r.level == "drift" for r in run.reports),
    }


def _performance_row(r, metric: str) -> list:
    return [
        f"{r.start:%Y-%m-%d %H:%M}",
        r.version,
        r.predictions,
        r.labelled,
        _fmt(r.live.get(metric)),
        _fmt(r.training.get(metric)),
        _fmt(r.live.get("precision")),
        _fmt(r.live.get("recall")),
        _fmt(r.live.get("ece")),
        r.level,
    ]


def _performance_table(reports, metric: str) -> dg.MetadataValue:
    header = ["window", "version", "predictions", "labelled", metric, f"training {metric}"]
    header += ["precision", "recall", "ece", "level"]
    rows = [_performance_row(r, metric) for r in reports]
    return dg.MetadataValue.md(markdown_table(header, rows[-60:]) if rows else "no traffic")


def performance_window_metadata(reports: list, run: PerformanceRun, metric: str) -> dict:
    """One window: each version's predictions, labels and live metrics, and the calibration of the judged one."""
    out = {"table": "monitoring.performance", "snapshot_id": str(run.snapshot_id)}
    if not reports:
        return {**out, "predictions": 0, "level": "no traffic"}
    main = max(reports, key=lambda r: r.labelled)
    out |= {
        "predictions": sum(r.predictions for r in reports),
        "labelled_predictions": sum(r.labelled for r in reports),
        "level": main.level,
        "versions": _performance_table(reports, metric),
    }
    if main.live.get(metric) is not None:
        out[metric] = float(main.live[metric])
    if main.calibration:
        out["calibration"] = dg.MetadataValue.md(
            markdown_table(
                ["bin", "rows", "mean predicted", "observed rate"],
                [
                    [b["bin"], b["count"], f"{b['mean_prediction']:.3f}", f"{b['observed_rate']:.3f}"]
                    for b in main.calibration
                ],
            )
        )
    return out


def _fmt(value) -> str:
    return "" if value is None or value != value else f"{value:.4g}"


# Definitions ------------------------------------------------------------------------------


def monitoring_schedule(monitor: MonitorSpec, job: dg.JobDefinition) -> dg.ScheduleDefinition:
    """Yesterday's windows at 01:00 UTC, and the windows whose labels have landed since."""

    @dg.schedule(
        name=f"{job.name}_daily",
        job=job,
        cron_schedule=f"0 {HOUR_OF_DAY} * * *",
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=(
            f"Monitor '{monitor.name}' every day at 01:00 UTC: yesterday, and the day "
            f"{monitor.label_delay} + {monitor.label_window} before it once its labels can have landed."
        ),
    )
    def schedule(context: dg.ScheduleEvaluationContext):
        today = context.scheduled_execution_time.astimezone(dt.UTC).date()
        yesterday = today - dt.timedelta(days=1)
        matured = yesterday - monitor.label_delay_delta - monitor.label_window_delta
        requests = []
        for day in sorted({yesterday, matured}):
            if monitor.partitions == "hourly":
                first, last = f"{day:%Y-%m-%d}-00:00", f"{day:%Y-%m-%d}-23:00"
            else:
                first = last = day.isoformat()
            requests.append(
                dg.RunRequest(
                    run_key=f"{job.name}-{day}",
                    tags={"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last},
                )
            )
        return requests

    return schedule


def monitoring_definitions(project: Project, monitors: Sequence[MonitorSpec]) -> dg.Definitions:
    assets, jobs, schedules = [], [], []
    for monitor in monitors:
        with single_run_backfills():
            pair = monitoring_assets(project, monitor)
        job = dg.define_asset_job(
            monitor_job_name(monitor.name),
            selection=dg.AssetSelection.assets(*pair),
            description=f"Drift and performance of '{monitor.name}' over a range of windows.",
            tags={"keel/model": monitor.name},
        )
        assets += pair
        jobs.append(job)
        schedules.append(monitoring_schedule(monitor, job))
    return dg.Definitions(assets=assets, jobs=jobs, schedules=schedules)
