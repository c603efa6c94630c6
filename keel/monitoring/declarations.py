"""Monitoring declarations: how a model's live traffic is compared with its training data.

A ``MonitorSpec`` names a declared model and says how its drift, performance and data
quality are judged; a model without one is monitored with the defaults. Drift compares the
inference log of a window (a UTC day, or an hour with ``partitions="hourly"``) with the
reference sample its version logged at training time (``keel.models.reference``):

- each numeric feature by its ``numeric`` threshold (PSI by default), each categorical
  feature by its ``categorical`` threshold (Jensen-Shannon distance by default), a feature
  listed in ``features`` by its own;
- the dataset drifts when the share of drifted features reaches ``drift_share`` (weighted by
  the version's feature importances when ``weighted``);
- the prediction by ``prediction`` and the label, once labels arrive, by ``label``.

A statistic at or above its ``threshold`` is drift (an ERROR); at or above ``warn`` it is a
warning. For p-values (``ks_pvalue``, ``chi2_pvalue``) the comparison is reversed: a value
at or below the threshold is drift.
"""

from __future__ import annotations

import datetime as dt
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import pyarrow as pa
from pyiceberg.expressions import And, EqualTo, GreaterThanOrEqual, LessThan

from keel.dsl import window_seconds
from keel.lakehouse.tables import Lakehouse, replace_rows
from keel.models.spec import ModelSpec

STATISTICS = {
    # name -> (feature kind, True when larger means more drift)
    "psi": ("numeric", True),
    "ks": ("numeric", True),
    "ks_pvalue": ("numeric", False),
    "wasserstein_norm": ("numeric", True),
    "js": ("categorical", True),
    "chi2_pvalue": ("categorical", False),
}
PARTITIONS = ("daily", "hourly")
# The columns every per-model monitoring table starts with: which window, model and version.
WINDOW_FIELDS = (
    pa.field("window_start", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("window_end", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("version", pa.int64(), nullable=False),
)


class MonitorError(ValueError):
    """A monitoring declaration is invalid; the message names the model, the value and the fix."""


@dataclass(frozen=True)
class Threshold:
    """Drift when ``statistic`` reaches ``threshold``; a warning when it reaches ``warn``."""

    statistic: str
    threshold: float
    warn: float | None = None

    def __post_init__(self) -> None:
        if self.statistic not in STATISTICS:
            raise MonitorError(
                f"threshold: statistic {self.statistic!r} is not known (use one of {', '.join(STATISTICS)})"
            )
        for name in ("threshold", "warn"):
            value = getattr(self, name)
            if value is None and name == "warn":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise MonitorError(f"threshold {self.statistic}: {name}={value!r} must be a number >= 0")
        if self.warn is not None:
            looser = self.warn <= self.threshold if self.larger_is_worse else self.warn >= self.threshold
            if not looser:
                raise MonitorError(
                    f"threshold {self.statistic}: warn={self.warn!r} must come before threshold={self.threshold!r} "
                    f"({'smaller' if self.larger_is_worse else 'larger'}), so a warning precedes drift"
                )

    @property
    def kind(self) -> str:
        return STATISTICS[self.statistic][0]

    @property
    def larger_is_worse(self) -> bool:
        return STATISTICS[self.statistic][1]

    def level(self, value: float | None) -> str:
        """``drift``, ``warn``, ``ok``, or ``unknown`` when the statistic could not be computed."""
        if value is None or value != value:
            return "unknown"
        if self._reached(value, self.threshold):
            return "drift"
        if self.warn is not None and self._reached(value, self.warn):
            return "warn"
        return "ok"

    def _reached(self, value: float, bound: float) -> bool:
        return value >= bound if self.larger_is_worse else value <= bound


@dataclass(frozen=True)
class MonitorSpec:
    """How one model is monitored; every field has a default a small team can start with."""

    model: ModelSpec
    partitions: str = "daily"
    numeric: Threshold = field(default_factory=lambda: Threshold("psi", 0.2, warn=0.1))
    categorical: Threshold = field(default_factory=lambda: Threshold("js", 0.1, warn=0.05))
    features: Mapping[str, Threshold] = field(default_factory=dict)
    prediction: Threshold = field(default_factory=lambda: Threshold("psi", 0.2, warn=0.1))
    label: Threshold | None = None  # default: psi for a regression label, js for a class label
    drift_share: float = 0.5
    weighted: bool = False
    # A window with fewer rows than this is reported, not judged: a few requests say nothing.
    min_rows: int = 100
    # Larger windows are sampled uniformly with a fixed seed; the sample size is reported.
    sample_rows: int = 100_000
    seed: int = 0
    # Performance: a live metric this far below the training hold-out's is an ERROR, half as far a WARN.
    tolerance: float = 0.05
    # A prediction at t is judged by the first label of its entity timed in [t, t + label_window].
    label_window: str = "7d"
    # How long after its time a label lands; the daily schedule judges a window again once they have.
    label_delay: str = "0d"
    min_labels: int = 50

    def __post_init__(self) -> None:
        where = f"monitor of model {getattr(self.model, 'name', self.model)!r}"
        if not isinstance(self.model, ModelSpec):
            raise MonitorError(f"{where}: model {self.model!r} is not a keel.models.spec.ModelSpec")
        if self.partitions not in PARTITIONS:
            raise MonitorError(f"{where}: partitions {self.partitions!r} is not known (use 'daily' or 'hourly')")
        for name, kind in (("numeric", "numeric"), ("categorical", "categorical")):
            threshold = getattr(self, name)
            if not isinstance(threshold, Threshold) or threshold.kind != kind:
                raise MonitorError(
                    f"{where}: {name}={threshold!r} must be a Threshold on a {kind} statistic "
                    f"({', '.join(s for s, (k, _) in STATISTICS.items() if k == kind)})"
                )
        for name, threshold in dict(self.features).items():
            if not isinstance(threshold, Threshold):
                raise MonitorError(f"{where}: features[{name!r}]={threshold!r} is not a Threshold")
        if not isinstance(self.prediction, Threshold) or self.prediction.kind != "numeric":
            raise MonitorError(f"{where}: prediction={self.prediction!r} must be a Threshold on a numeric statistic")
        if not 0 < self.drift_share <= 1:
            raise MonitorError(f"{where}: drift_share={self.drift_share!r} must be in (0, 1], e.g. 0.5")
        for name in ("min_rows", "sample_rows", "min_labels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MonitorError(f"{where}: {name}={value!r} must be a positive integer")
        if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, int | float) or not self.tolerance >= 0:
            raise MonitorError(f"{where}: tolerance={self.tolerance!r} must be a number >= 0, e.g. 0.05")
        for name in ("label_window", "label_delay"):
            duration(getattr(self, name), f"{where}: {name}")

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def label_window_delta(self) -> dt.timedelta:
        return duration(self.label_window, "label_window")

    @property
    def label_delay_delta(self) -> dt.timedelta:
        return duration(self.label_delay, "label_delay")

    def threshold_for(self, feature: str, kind: str) -> Threshold:
        """The feature's own threshold, else the default for its kind."""
        own = self.features.get(feature)
        if own is not None:
            if own.kind != kind:
                raise MonitorError(
                    f"monitor of model {self.name!r}: feature {feature!r} is {kind}, but its threshold uses "
                    f"{own.statistic!r}, a {own.kind} statistic"
                )
            return own
        return self.numeric if kind == "numeric" else self.categorical

    def label_threshold(self) -> Threshold:
        if self.label is not None:
            return self.label
        return Threshold("psi", 0.2, warn=0.1) if self.model.task == "regression" else Threshold("js", 0.1, warn=0.05)


def duration(value: str, where: str) -> dt.timedelta:
    """A duration such as '7d' or '36h'; '0d' is allowed here (no delay)."""
    if isinstance(value, str) and value.strip() in ("0", "0d", "0h", "0m"):
        return dt.timedelta(0)
    try:
        seconds = window_seconds(value)
    except (ValueError, TypeError):
        seconds = None
    if seconds is None:
        raise MonitorError(f"{where} {value!r} is not a duration (use e.g. '7d', '36h', or '0d' for none)")
    return dt.timedelta(seconds=seconds)


def monitors_for(models: tuple[ModelSpec, ...] | list[ModelSpec], declared=()) -> list[MonitorSpec]:
    """One MonitorSpec per model: the declared one, else the defaults."""
    by_name = {m.name: m for m in declared}
    known = {m.name for m in models}
    stray = sorted(set(by_name) - known)
    if stray:
        raise MonitorError(f"monitors declared for unknown model(s) {stray} (declared models: {sorted(known)})")
    return [by_name.get(m.name) or MonitorSpec(m) for m in models]


def load_monitors(module: str, models: Mapping[str, ModelSpec]) -> list[MonitorSpec]:
    """``<module>.monitoring.MONITORS`` completed with defaults for the models it leaves out."""
    try:
        mod = importlib.import_module(f"{module}.monitoring")
    except ModuleNotFoundError as exc:
        if exc.name and f"{module}.monitoring".startswith(exc.name):
            return monitors_for(list(models.values()))
        raise
    declared = getattr(mod, "MONITORS", ())
    if not all(isinstance(m, MonitorSpec) for m in declared):
        raise MonitorError(
            f"module '{module}.monitoring': MONITORS must be a tuple of keel.monitoring.declarations.MonitorSpec"
        )
    return monitors_for(list(models.values()), declared)


def replace_window(
    lake: Lakehouse,
    table_name: str,
    schema: pa.Schema,
    model: str,
    start: dt.datetime,
    end: dt.datetime,
    rows: pa.Table,
    run_id: str,
) -> int:
    """Replace a model's rows of ``[start, end)`` in a monitoring table with ``rows``, in one
    snapshot: a rerun of a window replaces its results, never adds to them."""
    table = lake.ensure_table(table_name, schema, month_column="window_start", identity_column="model")
    where = And(
        GreaterThanOrEqual("window_start", start.isoformat()),
        And(LessThan("window_start", end.isoformat()), EqualTo("model", model)),
    )
    last = (end - dt.timedelta(microseconds=1)).date()
    days = [start.date() + dt.timedelta(days=i) for i in range((last - start.date()).days + 1)]
    source = f"{table_name.split('.')[-1]}:{model}"
    replace_rows(table, rows, where, lake.snapshot_properties(source, days, run_id))
    return lake.head(table_name)
