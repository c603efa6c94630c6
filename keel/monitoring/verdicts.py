"""The monitoring checks' verdicts: from a run's reports, whether each check passes, how bad a
failure is, its message and its figures.

``drift_verdicts`` judges the ``drift``, ``prediction_drift`` and ``label_drift`` checks on the
version that answered most in the run's latest window (``DriftRun.judged``);
``performance_verdict`` judges ``performance`` on the latest window with enough labels. A
``Verdict`` is plain data: the Dagster assets attach it to the check as it is, adding only the
tables they draw.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from keel.monitoring.declarations import MonitorSpec
from keel.monitoring.drift import DriftReport, TargetDrift
from keel.monitoring.report import most_drifted, times_threshold
from keel.monitoring.run import DriftRun, PerformanceRun

ERROR, WARN = "error", "warn"
# Drifted features the drift check's message names; past that, "and N more" (the metadata has all).
NAMED_IN_MESSAGE = 10


@dataclass(frozen=True)
class Verdict:
    """One check's result. ``severity`` is ``ERROR`` or ``WARN`` (a passing check keeps the
    default ERROR, as Dagster's own results do); ``metadata`` holds numbers, strings and lists."""

    check: str
    passed: bool
    description: str
    severity: str = ERROR
    metadata: dict = field(default_factory=dict)


def drift_verdicts(run: DriftRun, monitor: MonitorSpec) -> list[Verdict]:
    """The ``drift``, ``prediction_drift`` and ``label_drift`` verdicts of a drift run."""
    main = run.judged()
    return [
        feature_verdict(main, monitor),
        target_verdict("prediction_drift", main, main.prediction if main else None, ERROR),
        target_verdict("label_drift", main, main.label if main else None, WARN),
    ]


def feature_verdict(r: DriftReport | None, monitor: MonitorSpec) -> Verdict:
    if r is None:
        return Verdict("drift", passed=True, description="no traffic in the windows run")
    drifted = most_drifted(r.drifted)
    meta = {
        "window": r.start.isoformat(),
        "version": r.version,
        "rows": r.rows,
        "sample_rows": r.sample_rows,
        "drift_share": float(r.drift_share),
        "drift_share_threshold": float(monitor.drift_share),
        "drifted": [_drifted_entry(t) for t in drifted],
        "warned": [t.name for t in most_drifted(r.warned)],
    }
    if not r.judged:
        why = f"not judged: {r.rows} answers in {r.start:%Y-%m-%d %H:%M}, fewer than min_rows={r.min_rows}"
        return Verdict("drift", passed=True, description=why, metadata=meta)
    level = r.level
    described = (
        f"{len(drifted)} of {len(r.features)} features drifted ({r.drift_share:.0%}) in {r.start:%Y-%m-%d %H:%M}"
        + _named(drifted)
    )
    return Verdict(
        "drift",
        passed=level == "ok",
        severity=ERROR if level == "drift" else WARN,
        description=("dataset drift: " if level == "drift" else "") + described,
        metadata=meta,
    )


def _named(drifted: list[TargetDrift]) -> str:
    """The drifted features for the message, furthest past their threshold first (`most_drifted`)."""
    if not drifted:
        return ""
    shown = drifted[:NAMED_IN_MESSAGE]
    named = ", ".join(
        f"{t.name} ({t.threshold.statistic} {_fmt(t.value)}, {_past(_times_threshold(t))})" for t in shown
    )
    more = len(drifted) - len(shown)
    rest = f", and {more} more (all in the metadata's 'drifted')" if more else ""
    return f"; most drifted first: {named}{rest}"


def _drifted_entry(t: TargetDrift) -> dict:
    times = _times_threshold(t)
    return {
        "feature": t.name,
        "kind": t.kind,
        "statistic": t.threshold.statistic,
        "value": t.value,
        "threshold": float(t.threshold.threshold),
        # JSON has no infinity: a p-value of 0 is past any threshold, shown as null.
        "times_threshold": round(times, 4) if times is not None and times != float("inf") else None,
    }


def _times_threshold(t: TargetDrift) -> float | None:
    return times_threshold(t.threshold.statistic, t.value, t.threshold.threshold)


def _past(times: float | None) -> str:
    if times is None:
        return "not judged"
    return "far past its threshold" if times == float("inf") else f"{times:.3g}x its threshold"


def target_verdict(name: str, r: DriftReport | None, t: TargetDrift | None, severity: str) -> Verdict:
    """The prediction's or the labels' drift; ``severity`` is how bad a drift of it is."""
    if r is None or t is None:
        why = "no traffic in the windows run" if r is None else "no labels in the window yet"
        return Verdict(name, passed=True, description=why)
    level = t.level if r.judged else "unknown"
    meta = {"window": r.start.isoformat(), "version": r.version, **_stat_meta(t)}
    text = f"{t.threshold.statistic}={_fmt(t.value)} (threshold {t.threshold.threshold:g}) in {r.start:%Y-%m-%d %H:%M}"
    return Verdict(
        name,
        passed=level in ("ok", "unknown"),
        severity=severity if level == "drift" else WARN,
        description=f"{level}: {text}",
        metadata=meta,
    )


def performance_verdict(run: PerformanceRun, monitor: MonitorSpec) -> Verdict:
    """The ``performance`` verdict: the live metric's drop from training on the latest judged window."""
    judged = run.latest_judged()
    if not judged:
        labelled = sum(r.labelled for r in run.reports)
        return Verdict(
            "performance",
            passed=True,
            description=f"not judged yet: {labelled} labelled predictions (needs {monitor.min_labels} in a window)",
        )
    r = max(judged, key=lambda r: r.labelled)
    text = (
        f"live {r.metric} {r.live.get(r.metric, float('nan')):.4f} against {r.training.get(r.metric, float('nan')):.4f} "
        f"in training (drop {r.drop:+.4f}, tolerance {r.tolerance:g}) on {r.labelled} labelled predictions of "
        f"{r.start:%Y-%m-%d %H:%M}"
    )
    return Verdict(
        "performance",
        passed=r.level == "ok",
        severity=ERROR if r.level == "drop" else WARN,
        description=text,
        metadata={
            "window": r.start.isoformat(),
            "version": r.version,
            "labelled": r.labelled,
            "drop": float(r.drop),
            **{f"live_{k}": float(v) for k, v in r.live.items() if v == v},
        },
    )


def _stat_meta(t: TargetDrift) -> dict:
    return {k: float(v) for k, v in t.statistics().items() if v is not None}


def _fmt(value) -> str:
    return "" if value is None or value != value else f"{value:.4g}"
