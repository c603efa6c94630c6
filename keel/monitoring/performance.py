"""Live model performance: logged predictions joined to the labels that arrived later.

A prediction made at ``t`` for an entity is judged by the first label of that entity timed
in ``[t, t + label_window]``: the outcome that followed the prediction, never one known
before it (a label timed before ``t`` could have been a feature). Predictions whose label
has not arrived yet are counted and left out. Each window's metrics (classification: the
model's metrics plus precision and recall at 0.5, Brier score, expected calibration error and
a reliability table; regression: RMSE, MAE, R²) are compared with the same metrics on the
version's training hold-out (its reference sample's hold-out rows, so both sides are
computed the same way): the model's own metric dropping by more than ``tolerance`` is an
ERROR, by more than half of it a WARN.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from keel.models.reference import HOLDOUT, LABEL, PREDICTION, SPLIT
from keel.models.spec import METRICS
from keel.models.training import label_values, score
from keel.monitoring.declarations import WINDOW_FIELDS, MonitorSpec

PERFORMANCE_TABLE = "monitoring.performance"
CALIBRATION_BINS = 10
SCHEMA = pa.schema(
    [
        *WINDOW_FIELDS,
        pa.field("metric", pa.string(), nullable=False),
        pa.field("value", pa.float64()),
        pa.field("training_value", pa.float64()),
        pa.field("level", pa.string(), nullable=False),  # ok | warn | drop | unknown, on the model's metric
        pa.field("predictions", pa.int64(), nullable=False),
        pa.field("labelled", pa.int64(), nullable=False),
        pa.field("calibration", pa.string()),  # JSON reliability table, on the ECE row
        pa.field("run_id", pa.string()),
        pa.field("computed_at", pa.timestamp("us", tz="UTC")),
    ]
)


@dataclass
class PerformanceReport:
    model: str
    version: int
    metric: str  # the model's declared metric, the one judged
    start: dt.datetime
    end: dt.datetime
    predictions: int
    labelled: int
    min_labels: int
    tolerance: float
    higher_is_better: bool
    live: dict[str, float] = field(default_factory=dict)
    training: dict[str, float] = field(default_factory=dict)
    calibration: list[dict] = field(default_factory=list)

    @property
    def drop(self) -> float | None:
        """How much worse the live metric is than training (positive: worse)."""
        live, train = self.live.get(self.metric), self.training.get(self.metric)
        if not _finite(live) or not _finite(train):
            return None
        return (train - live) if self.higher_is_better else (live - train)

    @property
    def level(self) -> str:
        drop = self.drop
        if self.labelled < self.min_labels or drop is None:
            return "unknown"
        if drop > self.tolerance:
            return "drop"
        if drop > self.tolerance / 2:
            return "warn"
        return "ok"


def labelled_predictions(
    log: pa.Table, labels: pa.Table, key_columns: Sequence[str], label: str, label_ts: str, window: dt.timedelta
) -> pa.Table:
    """``log`` (entity_id, ts, version, prediction) with ``label`` from the first label row of the
    entity timed in ``[ts, ts + window]`` (NULL until it arrives)."""
    seconds = window.total_seconds()
    keys = sorted(key_columns)
    entity = (
        f'CAST("{keys[0]}" AS VARCHAR)'
        if len(keys) == 1
        else "concat_ws('|', " + ", ".join(f'CAST("{k}" AS VARCHAR)' for k in keys) + ")"
    )
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    try:
        con.register("log", log.select(["entity_id", "ts", "version", "prediction"]))
        con.register("labels", labels)
        return con.sql(
            f"""
            WITH l AS (
                SELECT {entity} AS entity_id, "{label_ts}" AS label_ts, "{label}" AS label
                FROM labels WHERE "{label}" IS NOT NULL
            )
            SELECT p.entity_id, p.ts, p.version, p.prediction,
                   CASE WHEN l.label_ts <= p.ts + to_seconds({seconds}) THEN l.label END AS label
            FROM log p ASOF LEFT JOIN l ON p.entity_id = l.entity_id AND p.ts <= l.label_ts
            ORDER BY p.ts, p.entity_id
            """
        ).to_arrow_table()
    finally:
        con.close()


def window_performance(
    monitor: MonitorSpec,
    start: dt.datetime,
    end: dt.datetime,
    log: pa.Table,
    labels: pa.Table,
    reference: dict[int, pa.Table],
) -> list[PerformanceReport]:
    """One report per version that answered in the window (``log``: its entity_id, ts, version
    and prediction); ``reference`` maps version -> sample."""
    spec = monitor.model
    if log.num_rows == 0:
        return []
    joined = labelled_predictions(
        log,
        labels,
        spec.labels.key_columns,
        spec.label,
        spec.labels.timestamp,
        monitor.label_window_delta,
    )
    reports = []
    for version in sorted(set(joined.column("version").to_pylist())):
        rows = joined.filter(pc.equal(joined.column("version"), version))
        known = rows.filter(pc.is_valid(rows.column("label")))
        sample = reference[int(version)]
        holdout = sample.filter(pc.equal(sample.column(SPLIT), HOLDOUT))
        report = PerformanceReport(
            model=spec.name,
            version=int(version),
            metric=spec.metric,
            start=start,
            end=end,
            predictions=rows.num_rows,
            labelled=known.num_rows,
            min_labels=monitor.min_labels,
            tolerance=monitor.tolerance,
            higher_is_better=METRICS[spec.metric].higher_is_better,
        )
        report.training, _ = metrics_of(spec, holdout.column(LABEL), holdout.column(PREDICTION))
        if known.num_rows:
            report.live, report.calibration = metrics_of(spec, known.column("label"), known.column("prediction"))
        reports.append(report)
    return reports


def metrics_of(spec, labels: pa.ChunkedArray, predictions: pa.ChunkedArray) -> tuple[dict[str, float], list[dict]]:
    """The task's metrics of scores against outcomes, and a reliability table for a classifier."""
    y = label_values(spec, labels)
    p = pc.cast(predictions, pa.float64()).to_numpy(zero_copy_only=False)
    out = score(spec, y, p)
    if spec.task == "regression":
        return out, []
    decided = p >= 0.5
    out["precision"] = float((decided & (y == 1)).sum() / decided.sum()) if decided.any() else float("nan")
    out["recall"] = float((decided & (y == 1)).sum() / (y == 1).sum()) if (y == 1).any() else float("nan")
    out["brier"] = float(np.mean((p - y) ** 2))
    out["positive_rate"] = float(y.mean())
    out["mean_prediction"] = float(p.mean())
    table = reliability(y, p)
    out["ece"] = float(sum(b["count"] * abs(b["mean_prediction"] - b["observed_rate"]) for b in table) / len(y))
    return out, table


def reliability(y: np.ndarray, p: np.ndarray, bins: int = CALIBRATION_BINS) -> list[dict]:
    """Equal-width probability bins: rows, mean predicted probability and observed positive rate."""
    which = np.minimum((np.clip(p, 0.0, 1.0) * bins).astype(np.int64), bins - 1)
    counts = np.bincount(which, minlength=bins)
    sums = np.bincount(which, weights=p, minlength=bins)
    positives = np.bincount(which, weights=y.astype(np.float64), minlength=bins)
    return [
        {
            "bin": f"[{i / bins:.1f}, {(i + 1) / bins:.1f}{']' if i == bins - 1 else ')'}",
            "count": int(counts[i]),
            "mean_prediction": float(sums[i] / counts[i]),
            "observed_rate": float(positives[i] / counts[i]),
        }
        for i in range(bins)
        if counts[i]
    ]


def performance_rows(reports: Sequence[PerformanceReport], run_id: str) -> pa.Table:
    now = dt.datetime.now(dt.UTC)
    rows = []
    for r in reports:
        for metric in sorted(set(r.training) | set(r.live)):
            rows.append(
                {
                    "window_start": r.start,
                    "window_end": r.end,
                    "model": r.model,
                    "version": r.version,
                    "metric": metric,
                    "value": _clean(r.live.get(metric)),
                    "training_value": _clean(r.training.get(metric)),
                    "level": r.level if metric == r.metric else "info",
                    "predictions": r.predictions,
                    "labelled": r.labelled,
                    "calibration": json.dumps(r.calibration) if metric == "ece" else None,
                    "run_id": run_id,
                    "computed_at": now,
                }
            )
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def _clean(value) -> float | None:
    return float(value) if _finite(value) else None
