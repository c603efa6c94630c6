"""Monitoring runs: drift and performance of a model over a range of windows, written to the lakehouse.

What the Dagster assets and the CLI call. References (each version's sample and feature
importances) come from the registry once per version and run; labels are read once for
the whole range; each window's results replace that window's earlier ones.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa
from pyiceberg.expressions import And, GreaterThanOrEqual, LessThan

from keel.config import Settings
from keel.lakehouse.tables import Lakehouse
from keel.models.reference import load_importances, load_reference
from keel.monitoring import drift, performance
from keel.monitoring.declarations import MonitorSpec, replace_window
from keel.monitoring.drift import DriftReport
from keel.monitoring.performance import PerformanceReport

HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)


class References:
    """Each version's reference sample and importances, fetched from MLflow once."""

    def __init__(self, settings: Settings, model: str) -> None:
        self.settings = settings
        self.model = model
        self._cache: dict[int, tuple[pa.Table, dict[str, float]]] = {}

    def __call__(self, version: int) -> tuple[pa.Table, dict[str, float]]:
        if version not in self._cache:
            from keel.models.registry import get_version

            info = get_version(self.settings, self.model, version)
            sample = load_reference(self.settings, self.model, version, info.run_id)
            self._cache[version] = (sample, load_importances(self.settings, info.run_id))
        return self._cache[version]

    def sample(self, version: int) -> pa.Table:
        return self(version)[0]


def windows(start: dt.datetime, end: dt.datetime, partitions: str) -> list[tuple[dt.datetime, dt.datetime]]:
    """The day or hour windows that tile ``[start, end)``."""
    step = HOUR if partitions == "hourly" else DAY
    out, t = [], start
    while t < end:
        out.append((t, min(t + step, end)))
        t += step
    return out


def read_labels(lake: Lakehouse, monitor: MonitorSpec, start: dt.datetime, end: dt.datetime) -> pa.Table | None:
    """The label source's rows timed in ``[start, end)`` (None when the table does not exist yet)."""
    source = monitor.model.labels
    if not lake.exists(source.table_name):
        return None
    where = And(GreaterThanOrEqual(source.timestamp, start.isoformat()), LessThan(source.timestamp, end.isoformat()))
    return lake.read(
        source.table_name, row_filter=where, columns=[*source.key_columns, source.timestamp, monitor.model.label]
    )


@dataclass
class DriftRun:
    reports: list[DriftReport] = field(default_factory=list)
    snapshot_id: int | None = None
    rows_written: int = 0

    def latest(self) -> list[DriftReport]:
        """The reports of the last window that had traffic."""
        if not self.reports:
            return []
        last = max(r.start for r in self.reports)
        return [r for r in self.reports if r.start == last]

    def judged(self) -> DriftReport | None:
        """The report the checks judge: of the latest window's versions, the one that answered most."""
        latest = self.latest()
        return max(latest, key=lambda r: r.rows) if latest else None


def run_drift(
    lake: Lakehouse,
    settings: Settings,
    monitor: MonitorSpec,
    start: dt.datetime,
    end: dt.datetime,
    run_id: str,
    *,
    references: References | None = None,
) -> DriftRun:
    """Drift of every window of ``[start, end)``; each window's rows replace its earlier ones."""
    references = references or References(settings, monitor.name)
    labels = read_labels(lake, monitor, start, end)
    log = drift.read_window(lake, monitor.name, start, end)
    out = DriftRun()
    for w_start, w_end in windows(start, end, monitor.partitions):
        in_window = None if labels is None else _between(labels, monitor.model.labels.timestamp, w_start, w_end)
        answers = _between(log, "ts", w_start, w_end)
        out.reports += drift.window_drift(monitor, w_start, w_end, answers, references, labels=in_window)
    # One snapshot for the whole range: a run's results appear together or not at all.
    rows = drift.drift_rows(out.reports, run_id)
    out.snapshot_id = replace_window(lake, drift.DRIFT_TABLE, drift.SCHEMA, monitor.name, start, end, rows, run_id)
    out.rows_written = rows.num_rows
    return out


@dataclass
class PerformanceRun:
    reports: list[PerformanceReport] = field(default_factory=list)
    snapshot_id: int | None = None

    def latest_judged(self) -> list[PerformanceReport]:
        """The reports of the last window with enough labels to judge (labels arrive late)."""
        judged = [r for r in self.reports if r.level != "unknown"]
        if not judged:
            return []
        last = max(r.start for r in judged)
        return [r for r in judged if r.start == last]


def run_performance(
    lake: Lakehouse,
    settings: Settings,
    monitor: MonitorSpec,
    start: dt.datetime,
    end: dt.datetime,
    run_id: str,
    *,
    references: References | None = None,
) -> PerformanceRun:
    """Live metrics of every window of ``[start, end)`` with the labels known now."""
    references = references or References(settings, monitor.name)
    # A prediction's label may be timed up to label_window after the window's end.
    labels = read_labels(lake, monitor, start, end + monitor.label_window_delta)
    out = PerformanceRun()
    if labels is None:
        return out
    log = drift.read_window(lake, monitor.name, start, end, columns=("entity_id", "ts", "version", "prediction"))
    for w_start, w_end in windows(start, end, monitor.partitions):
        answers = _between(log, "ts", w_start, w_end)
        refs = {int(v): references.sample(int(v)) for v in set(answers.column("version").to_pylist())}
        out.reports += performance.window_performance(monitor, w_start, w_end, answers, labels, refs)
    rows = performance.performance_rows(out.reports, run_id)
    out.snapshot_id = replace_window(
        lake, performance.PERFORMANCE_TABLE, performance.SCHEMA, monitor.name, start, end, rows, run_id
    )
    return out


def _between(table: pa.Table, column: str, start: dt.datetime, end: dt.datetime) -> pa.Table:
    import pyarrow.compute as pc

    ts = table.column(column)
    kind = ts.type
    mask = pc.and_(pc.greater_equal(ts, pa.scalar(start, kind)), pc.less(ts, pa.scalar(end, kind)))
    return table.filter(mask)


def drift_history(lake: Lakehouse, model: str, *, days: int = 60, until: dt.datetime | None = None) -> pa.Table:
    """``monitoring.drift`` rows of a model over the last ``days`` days up to ``until``."""
    until = until or dt.datetime.now(dt.UTC)
    if not lake.exists(drift.DRIFT_TABLE):
        return drift.SCHEMA.empty_table()
    from pyiceberg.expressions import EqualTo

    where = And(
        And(
            GreaterThanOrEqual("window_start", (until - dt.timedelta(days=days)).isoformat()),
            LessThan("window_start", until.isoformat()),
        ),
        EqualTo("model", model),
    )
    return lake.read(drift.DRIFT_TABLE, row_filter=where)


def run_windows(reports: Sequence[DriftReport]) -> list[tuple[dt.datetime, str]]:
    return sorted({(r.start, r.level) for r in reports})
