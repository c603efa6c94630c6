"""The demo's monitoring loop: traffic across the planted drift, monitoring, alerts, retrain, promotion.

The shop's data drifts after a day of the demo window (``pipelines.generate``: new sign-ups
favour other plans and devices, baskets grow, sessions lengthen). The first champion was
trained on labels from before the drift only. This step replays its traffic from two weeks
before the drift to yesterday (``keel.monitoring.replay``), loads the inference log, profiles the
tables and runs the model's monitoring, each as a Dagster run; then Dagster's daemon closes
the loop by itself: the monitoring_alerts sensor sends the alerts, the retrain sensor starts
the train job on the failed drift check, and the new challenger is promoted or not.
"""

from __future__ import annotations

import datetime as dt
import json
import time

import pyarrow.compute as pc

from keel.config import Settings
from keel.lakehouse.tables import Lakehouse

REPLAY_PER_DAY = 200
BEFORE_DRIFT_DAYS = 14
QUALITY_DAYS = 14
# The retrain and alert sensors tick every 60 s (the demo's KEEL_SENSOR_INTERVAL_S, if set); the
# retrain run queues behind nothing.
SENSOR_WAIT_S = 300


def monitoring_loop(runs, settings: Settings, lake: Lakehouse, spec, span, drift_day: dt.date):
    """Run the loop; returns (lines to print, the names of failed steps)."""
    from assets.data_quality import QUALITY_JOB
    from assets.inference_log import JOB_NAME as LOAD_JOB
    from assets.models import train_job_name
    from assets.monitoring import monitor_job_name
    from keel.monitoring import replay
    from keel.monitoring.report import report_path
    from keel.store import FeatureStore
    from pipelines import project

    lines, failed = [], []
    first, last = max(span[0], drift_day - dt.timedelta(days=BEFORE_DRIFT_DAYS)), span[1]
    days = [first + dt.timedelta(days=i) for i in range((last - first).days + 1)]

    t = time.perf_counter()
    replayed = replay.replay(FeatureStore(lake, project), settings, spec, days, per_day=REPLAY_PER_DAY)
    lines.append(f"        replayed {replay.summary(replayed)} (drift planted from {drift_day})")

    recent = max(first, last - dt.timedelta(days=QUALITY_DAYS - 1))
    quality = None
    for job, label, window in (
        (LOAD_JOB, "inference log loaded", (first, last)),
        (QUALITY_JOB, f"data quality of the last {QUALITY_DAYS} days profiled", (recent, last)),
    ):
        print(f"        {label}: ", end="", flush=True)
        result = runs.job(job, span=window)
        if not result.success:
            failed.append(job)
            return lines, failed
        quality = result
    problems = [f"{c.asset_key.path[-1]}:{c.check_name} {c.severity.value}" for c in quality.checks if not c.passed]
    lines.append("        data quality, latest day: " + (", ".join(problems) if problems else "no problems"))

    print("        monitoring: ", end="", flush=True)
    launched = time.time()
    result = runs.job(monitor_job_name(spec.name), span=(first, last))
    if not result.success:
        failed.append(monitor_job_name(spec.name))
        return lines, failed
    monitored_at = time.time()
    lines += _drift_lines(lake, spec, drift_day)
    checks = {c.check_name: c for c in result.checks}
    for name in ("drift", "prediction_drift", "label_drift", "performance"):
        check = checks.get(name)
        if check is not None:
            state = "passed" if check.passed else f"FAILED ({check.severity.value})"
            lines.append(f"        check {name:<17}{state}: {check.description}")
    drift = result.metadata(f"monitoring/{spec.name}_drift")
    report = drift.get("report_url") or report_path(
        settings.home, spec.name, dt.datetime.combine(last, dt.time(), dt.UTC)
    )
    lines.append(f"        HTML drift report: {report}")
    print("\n".join(lines), flush=True)
    lines.clear()

    every = settings.sensor_interval_s or 60
    print(f"        waiting for the daemon: the alert and retrain sensors tick every {every} s ...", flush=True)
    runs.tick_after("monitoring_alerts", launched=launched, finished=monitored_at, timeout_s=SENSOR_WAIT_S)
    # The alerts this loop's checks raised (the alert file keeps every earlier one too).
    since = dt.datetime.fromtimestamp(launched, dt.UTC)
    sent = [
        a for a in _read_alerts(settings) if a.get("status") == "firing" and dt.datetime.fromisoformat(a["ts"]) >= since
    ]
    lines.append(f"        alerts sent by the monitoring_alerts sensor: {len(sent)}")
    for alert in sent[-3:]:
        lines.append(f"          {alert.get('severity')} {alert.get('title')}")
    tick = runs.tick_after(f"retrain_{spec.name}", launched=launched, finished=monitored_at, timeout_s=SENSOR_WAIT_S)
    if tick is None or tick["status"] == "FAILURE":
        why = "no tick" if tick is None else (tick["error"] or {}).get("message", "failed")
        lines.append(f"        retrain sensor: {why} within {SENSOR_WAIT_S}s (is it on? see `make ui`, Automation)")
        failed.append(f"retrain_{spec.name}")
        return lines, failed
    if not tick["runIds"]:
        # A retrain within the cool-down of the last one (a second demo) is the sensor doing its job.
        lines.append(f"        retrain sensor: no retrain ({tick['skipReason']})")
        return lines, failed
    retrain = runs.instance.get_run_by_id(tick["runIds"][0])
    lines.append(
        f"        retrain sensor fired on {retrain.tags.get('keel/trigger')}: {train_job_name(spec)} run "
        f"{retrain.run_id[:8]} ..."
    )
    print("        retraining: ", end="", flush=True)
    trained = runs.wait(retrain.run_id)
    if not trained.success:
        failed.append(train_job_name(spec))
        return lines, failed
    challenger = trained.metadata(f"models/{spec.name}_challenger")
    decided = trained.metadata(f"models/{spec.name}_champion")
    lines.append(
        f"        new challenger v{challenger['version']}: hold-out {spec.metric} "
        f"{challenger['metrics'].get(spec.metric, float('nan')):.3f} (trained on labels up to now)"
    )
    lines.append(f"        promoted to champion: {decided['promoted']} ({decided['reason']})")
    lines.append(f"        (loop took {time.perf_counter() - t:.0f}s)")
    return lines, failed


def _drift_lines(lake: Lakehouse, spec, drift_day: dt.date) -> list[str]:
    """How many windows before and after the drift were judged drifted, and the top features."""
    from keel.monitoring.drift import DRIFT_TABLE

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


def _read_alerts(settings: Settings) -> list[dict]:
    path = settings.alert_file
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
