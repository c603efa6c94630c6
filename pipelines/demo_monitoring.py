"""The demo's monitoring loop: traffic across the planted drift, monitoring, alerts, retrain, promotion.

The shop's data drifts after a day of the demo window (``pipelines.generate``: new sign-ups
favour other plans and devices, baskets grow, sessions lengthen). The first champion was
trained on labels from before the drift only. This step replays its traffic from two weeks
before the drift to yesterday (``keel.replay``), loads the inference log, profiles the
tables, and runs the model's monitoring through Dagster; then it ticks the alert and
retrain sensors as the daemon would, runs the retrain they ask for, and reports whether the
new challenger was promoted.
"""

from __future__ import annotations

import datetime as dt
import json
import time

import dagster as dg
import pyarrow.compute as pc

from keel.config import Settings
from keel.lakehouse import Lakehouse

REPLAY_PER_DAY = 200
BEFORE_DRIFT_DAYS = 14
QUALITY_DAYS = 14


def monitoring_loop(defs, instance, settings: Settings, lake: Lakehouse, spec, span, drift_day: dt.date, run_job):
    """Run the loop; returns (lines to print, the names of failed steps)."""
    from assets.data_quality import QUALITY_JOB
    from assets.inference_log import JOB_NAME as LOAD_JOB
    from assets.models import train_job_name
    from assets.monitoring import monitor_job_name
    from keel import replay
    from keel.drift_report import report_path
    from keel.store import FeatureStore
    from pipelines import project

    lines, failed = [], []
    first, last = max(span[0], drift_day - dt.timedelta(days=BEFORE_DRIFT_DAYS)), span[1]
    days = [first + dt.timedelta(days=i) for i in range((last - first).days + 1)]

    t = time.perf_counter()
    replayed = replay.replay(FeatureStore(lake, project), settings, spec, days, per_day=REPLAY_PER_DAY)
    lines.append(f"        replayed {replay.summary(replayed)} (drift planted from {drift_day})")

    recent = max(first, last - dt.timedelta(days=QUALITY_DAYS - 1))
    for job, label, window in (
        (LOAD_JOB, "inference log loaded", (first, last)),
        (QUALITY_JOB, f"data quality of the last {QUALITY_DAYS} days profiled", (recent, last)),
    ):
        print(f"        {label}: ", end="", flush=True)
        result = run_job(defs, job, instance, window, {})
        if not result.success:
            failed.append(job)
            return lines, failed
    quality = _quality_problems(instance, defs)
    lines.append("        data quality, latest day: " + (", ".join(quality) if quality else "no problems"))

    print("        monitoring: ", end="", flush=True)
    result = run_job(defs, monitor_job_name(spec.name), instance, (first, last), {})
    if not result.success:
        failed.append(monitor_job_name(spec.name))
        return lines, failed
    lines += _drift_lines(lake, spec, drift_day)
    checks = {
        e.event_specific_data.check_name: e.event_specific_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }
    for name in ("drift", "prediction_drift", "label_drift", "performance"):
        check = checks.get(name)
        if check is not None:
            state = "passed" if check.passed else f"FAILED ({check.severity.value})"
            lines.append(f"        check {name:<17}{state}: {check.description}")
    lines.append(
        f"        HTML drift report: {report_path(settings.home, spec.name, dt.datetime.combine(last, dt.time(), dt.UTC))}"
    )

    alerts = _tick(defs, "monitoring_alerts", instance)
    sent = [a for a in _read_alerts(settings) if a.get("status") == "firing"]
    lines.append(f"        alerts sensor: {alerts.skip_message or 'sent nothing'}")
    for alert in sent[-3:]:
        lines.append(f"          {alert.get('severity')} {alert.get('title')}")

    retrain = _tick(defs, f"retrain_{spec.name}", instance)
    if not retrain.run_requests:
        lines.append(f"        retrain sensor: no retrain ({retrain.skip_message or 'nothing failed with ERROR'})")
        return lines, failed
    request = retrain.run_requests[0]
    lines.append(
        f"        retrain sensor fired on {request.tags.get('keel/trigger')}: running {train_job_name(spec)} ..."
    )
    print("        retraining: ", end="", flush=True)
    trained = defs.resolve_job_def(train_job_name(spec)).execute_in_process(
        instance=instance,
        tags=dict(request.tags),
        run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
        raise_on_error=False,
    )
    print(f"{'published' if trained.success else 'FAILED'} (run {trained.run_id[:8]})", flush=True)
    if not trained.success:
        failed.append(train_job_name(spec))
        return lines, failed
    challenger = trained.asset_materializations_for_node(f"models__{spec.name}_challenger")[0].metadata
    decided = trained.asset_materializations_for_node(f"models__{spec.name}_champion")[0].metadata
    lines.append(
        f"        new challenger v{challenger['version'].value}: hold-out {spec.metric} "
        f"{challenger['metrics'].value.get(spec.metric, float('nan')):.3f} (trained on labels up to now)"
    )
    lines.append(f"        promoted to champion: {decided['promoted'].value} ({decided['reason'].value})")
    lines.append(f"        (loop took {time.perf_counter() - t:.0f}s)")
    return lines, failed


def _tick(defs, name: str, instance) -> dg.SensorResult:
    sensor = defs.resolve_sensor_def(name) if hasattr(defs, "resolve_sensor_def") else defs.get_sensor_def(name)
    return sensor.evaluate_tick(dg.build_sensor_context(instance=instance, definitions=defs))


def _drift_lines(lake: Lakehouse, spec, drift_day: dt.date) -> list[str]:
    """How many windows before and after the drift were judged drifted, and the top features."""
    from keel.drift import DRIFT_TABLE

    rows = lake.read(DRIFT_TABLE).filter(pc.equal(pc.field("model"), spec.name))
    dataset = [r for r in rows.to_pylist() if r["target"] == "dataset"]
    before = [r for r in dataset if r["window_start"].date() < drift_day]
    after = [r for r in dataset if r["window_start"].date() >= drift_day]
    out = [
        f"        dataset drift: {sum(r['level'] == 'drift' for r in before)} of {len(before)} windows before the drift, "
        f"{sum(r['level'] == 'drift' for r in after)} of {len(after)} from it on"
    ]
    if dataset:
        last = max(r["window_start"] for r in dataset)
        latest = [r for r in rows.to_pylist() if r["window_start"] == last and r["target"] == "feature"]
        top = sorted((r for r in latest if r["level"] == "drift"), key=lambda r: -(r["value"] or 0))[:5]
        if top:
            out.append(
                f"        drifted on {last:%Y-%m-%d}: "
                + ", ".join(f"{r['name']} ({r['statistic']} {r['value']:.2f})" for r in top)
            )
    return out


def _quality_problems(instance, defs) -> list[str]:
    from assets.data_quality import QUALITY_JOB

    job = defs.resolve_job_def(QUALITY_JOB)
    runs = instance.get_runs(filters=dg.RunsFilter(job_name=job.name), limit=1)
    problems = []
    for event in instance.all_logs(runs[0].run_id) if runs else []:
        data = event.dagster_event.event_specific_data if event.dagster_event else None
        if isinstance(data, dg.AssetCheckEvaluation) and not data.passed:
            problems.append(f"{data.asset_key.path[-1]}:{data.check_name} {data.severity.value}")
    return problems


def _read_alerts(settings: Settings) -> list[dict]:
    path = settings.alert_file
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
