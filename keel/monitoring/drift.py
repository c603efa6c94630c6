"""Drift of a model's live traffic against its training reference, one window at a time.

For a window ``[start, end)`` (a UTC day or hour), every version of the model that answered
in it (the inference log's non-shadow rows) is compared with the reference sample it logged
at training (``keel.models.reference``):

- features: the logged feature vectors, sampled with the monitor's seed past ``sample_rows``,
  against all reference rows, by ``keel.monitoring.statistics.compare``;
- the prediction: live scores against the hold-out rows' scores;
- the label: labels timed in the window (they arrive later, so a window is judged again when
  its monitoring reruns) against the training labels.

Each target gets every statistic of its kind and a level (``ok``, ``warn``, ``drift``,
``unknown``) from the monitor's threshold; the dataset drifts when the (importance-weighted)
share of drifted features reaches ``drift_share``. A window with fewer than ``min_rows``
rows is reported and not judged. ``drift_rows`` flattens reports into ``monitoring.drift``,
one row per (window, version, target), with the plot data for the HTML report.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.expressions import And, EqualTo, GreaterThanOrEqual, LessThan

from keel.inference_log.records import TABLE as LOG_TABLE
from keel.lakehouse.tables import Lakehouse
from keel.models.reference import HOLDOUT, LABEL, PREDICTION, SPLIT
from keel.monitoring import statistics as drift_stats
from keel.monitoring.declarations import WINDOW_FIELDS, MonitorSpec, Threshold
from keel.monitoring.statistics import CategoricalDrift, NumericDrift

DRIFT_TABLE = "monitoring.drift"
STAT_COLUMNS = ("psi", "ks", "ks_pvalue", "wasserstein_norm", "js", "chi2_pvalue")
LEVELS = ("ok", "warn", "drift", "unknown")
SCHEMA = pa.schema(
    [
        *WINDOW_FIELDS,
        # feature | prediction | label | dataset (the window's verdict)
        pa.field("target", pa.string(), nullable=False),
        pa.field("name", pa.string(), nullable=False),
        pa.field("kind", pa.string()),
        pa.field("statistic", pa.string()),
        pa.field("value", pa.float64()),
        pa.field("threshold", pa.float64()),
        pa.field("warn", pa.float64()),
        pa.field("level", pa.string(), nullable=False),
        *(pa.field(name, pa.float64()) for name in STAT_COLUMNS),
        pa.field("importance", pa.float64()),
        pa.field("reference_rows", pa.int64()),
        pa.field("current_rows", pa.int64()),
        pa.field("sample_rows", pa.int64()),
        pa.field("reference_null_rate", pa.float64()),
        pa.field("current_null_rate", pa.float64()),
        pa.field("current_mean", pa.float64()),
        pa.field("new_categories", pa.string()),  # JSON list
        pa.field("plot", pa.string()),  # JSON: histogram edges or categories, with both sides' shares
        pa.field("run_id", pa.string()),
        pa.field("computed_at", pa.timestamp("us", tz="UTC")),
    ]
)


class DriftError(ValueError):
    """Drift cannot be computed for a window; the message names the model, window and fix."""


@dataclass(frozen=True)
class TargetDrift:
    """One compared column: its statistics, the statistic judged and the verdict."""

    target: str  # feature | prediction | label
    name: str
    kind: str  # numeric | categorical
    threshold: Threshold
    stats: NumericDrift | CategoricalDrift
    importance: float | None = None
    current_mean: float | None = None  # of the compared current values, for a numeric target

    @property
    def value(self) -> float | None:
        return _number(getattr(self.stats, self.threshold.statistic))

    @property
    def level(self) -> str:
        return self.threshold.level(self.value)

    def statistics(self) -> dict[str, float | None]:
        return {name: _number(getattr(self.stats, name, None)) for name in STAT_COLUMNS}


@dataclass
class DriftReport:
    """The comparison of one version's traffic in one window with its reference."""

    model: str
    version: int
    start: dt.datetime
    end: dt.datetime
    rows: int  # answers in the window
    sample_rows: int  # of which compared
    reference_rows: int
    min_rows: int
    drift_share_threshold: float
    weighted: bool
    features: list[TargetDrift] = field(default_factory=list)
    prediction: TargetDrift | None = None
    label: TargetDrift | None = None
    label_rows: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def judged(self) -> bool:
        return self.rows >= self.min_rows

    @property
    def drifted(self) -> list[TargetDrift]:
        return [f for f in self.features if f.level == "drift"]

    @property
    def warned(self) -> list[TargetDrift]:
        return [f for f in self.features if f.level == "warn"]

    @property
    def drift_share(self) -> float:
        """Share of the comparable features that drifted, weighted by importance when asked."""
        known = [f for f in self.features if f.level != "unknown"]
        if not known:
            return 0.0
        if self.weighted and any(f.importance for f in known):
            total = sum(f.importance or 0.0 for f in known)
            return sum(f.importance or 0.0 for f in known if f.level == "drift") / total if total else 0.0
        return sum(f.level == "drift" for f in known) / len(known)

    @property
    def dataset_drift(self) -> bool:
        return self.judged and self.drift_share >= self.drift_share_threshold

    @property
    def level(self) -> str:
        """The window's verdict: drift (dataset drift), warn (some feature or the prediction moved), ok."""
        if not self.judged:
            return "unknown"
        if self.dataset_drift:
            return "drift"
        if self.drifted or self.warned or (self.prediction and self.prediction.level in ("warn", "drift")):
            return "warn"
        return "ok"


# Computing -------------------------------------------------------------------------------


ReferenceLoader = Callable[[int], tuple[pa.Table, dict[str, float]]]


def window_drift(
    monitor: MonitorSpec,
    start: dt.datetime,
    end: dt.datetime,
    log: pa.Table,
    reference: ReferenceLoader,
    *,
    labels: pa.Table | None = None,
) -> list[DriftReport]:
    """One report per version of the model that answered in ``[start, end)``, by version.

    ``log`` holds the window's answers (``read_window``); ``reference(version)`` gives the
    version's reference sample and feature importances; ``labels`` holds the label source's
    rows timed in the window (None: not compared).
    """
    reports = []
    for version in sorted(set(log.column("version").to_pylist())):
        rows = log.filter(pc.equal(log.column("version"), version))
        sample, importances = reference(int(version))
        reports.append(compare_window(monitor, int(version), start, end, rows, sample, importances, labels))
    return reports


def read_window(
    lake: Lakehouse,
    model: str,
    start: dt.datetime,
    end: dt.datetime,
    columns: Sequence[str] = ("ts", "version", "features", "prediction"),
) -> pa.Table:
    """The model's answers (not shadow scores) logged in ``[start, end)``."""
    if not lake.exists(LOG_TABLE):
        raise DriftError(
            f"model {model!r}: there is no {LOG_TABLE} table yet; load the inference log first "
            "(the load_inference_log job) once the serving process has answered"
        )
    where = And(
        GreaterThanOrEqual("ts", start.isoformat()),
        And(LessThan("ts", end.isoformat()), EqualTo("model", model)),
    )
    log = lake.read(LOG_TABLE, row_filter=where, columns=[*columns, "shadow"])
    return log.filter(pc.invert(log.column("shadow"))).select(list(columns))


def compare_window(
    monitor: MonitorSpec,
    version: int,
    start: dt.datetime,
    end: dt.datetime,
    log: pa.Table,
    sample: pa.Table,
    importances: dict[str, float],
    labels: pa.Table | None = None,
) -> DriftReport:
    """Compare one version's logged rows in a window with its reference sample."""
    spec = monitor.model
    features = [c for c in sample.column_names if not c.startswith("__")]
    kinds = {name: kind for name in features if (kind := column_kind(sample.schema.field(name).type))}
    report = DriftReport(
        model=spec.name,
        version=version,
        start=start,
        end=end,
        rows=log.num_rows,
        sample_rows=log.num_rows,
        reference_rows=sample.num_rows,
        min_rows=monitor.min_rows,
        drift_share_threshold=monitor.drift_share,
        weighted=monitor.weighted,
    )
    skipped = sorted(set(features) - set(kinds))
    if skipped:
        report.notes.append(f"not compared (neither numeric nor categorical): {', '.join(skipped)}")
    picked = drift_stats.sample_indices(log.num_rows, monitor.sample_rows, monitor.seed)
    if picked is not None:
        log = log.take(pa.array(picked))
        report.sample_rows = log.num_rows
    current = parse_features(log.column("features"), kinds)
    reference = pa.table({name: _as_compared(sample.column(name), kind) for name, kind in kinds.items()})
    for name, stats in drift_stats.compare(reference, current, kinds).items():
        threshold = monitor.threshold_for(name, kinds[name])
        mean = _mean(current.column(name)) if kinds[name] == "numeric" else None
        report.features.append(TargetDrift("feature", name, kinds[name], threshold, stats, importances.get(name), mean))

    holdout = sample.filter(pc.equal(sample.column(SPLIT), HOLDOUT)).column(PREDICTION)
    report.prediction = TargetDrift(
        "prediction",
        "prediction",
        "numeric",
        monitor.prediction,
        drift_stats.numeric_drift(holdout.to_numpy(), log.column("prediction").to_numpy()),
        current_mean=_mean(log.column("prediction")),
    )
    if labels is not None and labels.num_rows and spec.label in labels.column_names:
        threshold = monitor.label_threshold()
        report.label_rows = labels.num_rows
        ref, cur = sample.column(LABEL), labels.column(spec.label)
        if threshold.kind == "categorical":
            stats = drift_stats.categorical_drift(_as_compared(ref, "categorical"), _as_compared(cur, "categorical"))
        else:
            stats = drift_stats.numeric_drift(
                pc.cast(ref, pa.float64()).to_numpy(zero_copy_only=False),
                pc.cast(cur, pa.float64()).to_numpy(zero_copy_only=False),
            )
        report.label = TargetDrift("label", spec.label, threshold.kind, threshold, stats)
    return report


def column_kind(kind: pa.DataType) -> str | None:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        return "numeric"
    if pa.types.is_timestamp(kind):
        return "numeric"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_boolean(kind):
        return "categorical"
    return None


def parse_features(features: pa.ChunkedArray | pa.Array, kinds: dict[str, str]) -> pa.Table:
    """The logged JSON feature vectors as one typed column per feature, in one DuckDB pass.

    Numbers become float64 (a value that is not a number, NULL); everything else its JSON text,
    so a logged ``true`` compares with a reference ``true``.
    """
    con = duckdb.connect()
    try:
        con.register("log", pa.table({"features": features}))
        exprs = []
        for i, (name, kind) in enumerate(kinds.items()):
            path = "'$.\"" + name.replace('"', '\\"').replace("'", "''") + "\"'"
            if kind == "numeric":
                exprs.append(f"TRY_CAST(json_extract(features, {path}) AS DOUBLE) AS c{i}")
            else:
                exprs.append(f"json_extract_string(features, {path}) AS c{i}")
        if not exprs:
            return pa.table({})
        out = con.sql(f"SELECT {', '.join(exprs)} FROM log").to_arrow_table()
    finally:
        con.close()
    return out.rename_columns(list(kinds))


def _as_compared(column: pa.ChunkedArray, kind: str) -> pa.ChunkedArray:
    """The reference column in the form the logged values are parsed into."""
    if kind == "categorical":
        if pa.types.is_dictionary(column.type):
            column = column.cast(column.type.value_type)
        return column if pa.types.is_string(column.type) else pc.cast(column, pa.string())
    if pa.types.is_timestamp(column.type):
        return pc.divide(pc.cast(pc.cast(column, pa.timestamp("us", tz="UTC")), pa.int64()).cast(pa.float64()), 1e6)
    return pc.cast(column, pa.float64())


# Writing ---------------------------------------------------------------------------------


def drift_rows(reports: Sequence[DriftReport], run_id: str, computed_at: dt.datetime | None = None) -> pa.Table:
    """``monitoring.drift`` rows: one per target of each report, and one ``dataset`` row."""
    computed_at = computed_at or dt.datetime.now(dt.UTC)
    rows = []
    for r in reports:
        base = {
            "window_start": r.start,
            "window_end": r.end,
            "model": r.model,
            "version": r.version,
            "reference_rows": r.reference_rows,
            "current_rows": r.rows,
            "sample_rows": r.sample_rows,
            "run_id": run_id,
            "computed_at": computed_at,
        }
        for t in [*r.features, r.prediction, r.label]:
            if t is None:
                continue
            stats = t.stats
            rows.append(
                {
                    **base,
                    "target": t.target,
                    "name": t.name,
                    "kind": t.kind,
                    "statistic": t.threshold.statistic,
                    "value": t.value,
                    "threshold": float(t.threshold.threshold),
                    "warn": None if t.threshold.warn is None else float(t.threshold.warn),
                    "level": t.level if r.judged else "unknown",
                    **t.statistics(),
                    "importance": t.importance,
                    "current_rows": r.label_rows if t.target == "label" else r.rows,
                    "reference_null_rate": _number(stats.reference_null_rate),
                    "current_null_rate": _number(stats.current_null_rate),
                    "current_mean": t.current_mean,
                    "new_categories": json.dumps(list(getattr(stats, "new_categories", ()))),
                    "plot": json.dumps(plot_data(stats)),
                }
            )
        rows.append(
            {
                **base,
                "target": "dataset",
                "name": "share_drifted",
                "statistic": "share_drifted" + ("_weighted" if r.weighted else ""),
                "value": r.drift_share,
                "threshold": r.drift_share_threshold,
                "level": r.level,
                "new_categories": "[]",
                "plot": json.dumps({"notes": r.notes}),
            }
        )
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def plot_data(stats: NumericDrift | CategoricalDrift) -> dict:
    if isinstance(stats, NumericDrift):
        return {
            "edges": _floats(stats.plot_edges),
            "reference": _floats(stats.plot_reference),
            "current": _floats(stats.plot_current),
        }
    return {
        "categories": list(stats.categories),
        "reference": [int(c) for c in stats.reference_counts],
        "current": [int(c) for c in stats.current_counts],
    }


def _mean(column: pa.ChunkedArray) -> float | None:
    value = pc.mean(pc.cast(column, pa.float64())).as_py()
    return _number(value)


def _floats(values) -> list[float | None]:
    return [_number(v) for v in values]


def _number(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value
