"""Prometheus metrics of monitoring: the latest drift, quality and performance results, for scraping.

Monitoring runs as batch assets, so its results live in the lakehouse; this exporter reads
the latest window of ``monitoring.drift``, ``monitoring.performance`` and
``monitoring.quality``, the newest row of each watched table and the registry's aliases,
and exposes them as gauges (names in ``METRICS``; deploy/prometheus alerts on them). Reads
are cached for ``refresh_s`` so a scrape costs nothing most of the time, and a failing read
is reported (``keel_monitoring_up 0``) instead of breaking the scrape.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Iterable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from keel.config import Settings
from keel.lakehouse.tables import Lakehouse, day_filter
from keel.monitoring.data_quality import QUALITY_TABLE, QualityTarget
from keel.monitoring.drift import DRIFT_TABLE
from keel.monitoring.performance import PERFORMANCE_TABLE

log = logging.getLogger(__name__)

METRICS = {
    "keel_drift_score": (
        "model, version, feature, statistic",
        "Drift statistic of a feature in the model's latest window",
    ),
    "keel_drift_detected": ("model, feature", "1 when the feature drifted in the model's latest window"),
    "keel_drift_share": ("model", "Share of the model's features drifted in its latest window"),
    "keel_dataset_drift": ("model", "1 when the latest window's drifted share reached the dataset threshold"),
    "keel_prediction_mean": ("model, version", "Mean score of the model's answers in its latest window"),
    "keel_feature_null_rate": ("table, column", "NULL share of a column on the table's latest profiled day"),
    "keel_table_freshness_seconds": ("table", "Seconds since the table's newest row"),
    "keel_model_age_seconds": ("model, alias", "Seconds since the version holding the alias was registered"),
    "keel_model_metric": ("model, version, metric", "Live metric on labelled predictions, latest judged window"),
    "keel_model_training_metric": ("model, version, metric", "The same metric on the version's training hold-out"),
    "keel_monitoring_updated_timestamp_seconds": ("model", "When the model's drift monitoring last wrote results"),
    "keel_monitoring_up": ("", "1 when the last read of the monitoring tables succeeded"),
}
STATISTICS = ("psi", "ks", "ks_pvalue", "wasserstein_norm", "js", "chi2_pvalue")
ALIASES = ("champion", "challenger")
FRESHNESS_DAYS = 3


class MonitoringCollector(Collector):
    """Gauges read from the lakehouse and registry, refreshed at most every ``refresh_s``."""

    def __init__(
        self,
        lake: Lakehouse,
        settings: Settings,
        models: Sequence[str],
        tables: Sequence[QualityTarget],
        *,
        refresh_s: float = 60.0,
    ) -> None:
        self.lake = lake
        self.settings = settings
        self.models = list(models)
        self.tables = list(tables)
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._families: list[GaugeMetricFamily] = []
        self._read_at = float("-inf")
        self._up = 0.0

    def collect(self) -> Iterable[GaugeMetricFamily]:
        with self._lock:
            if time.monotonic() - self._read_at >= self.refresh_s:
                try:
                    self._families = self.read()
                    self._up = 1.0
                except Exception as exc:  # noqa: BLE001 - a scrape reports the failure, it does not fail
                    log.warning("monitoring metrics: reading the monitoring tables failed: %s", exc)
                    self._up = 0.0
                self._read_at = time.monotonic()
            families = list(self._families)
        up = GaugeMetricFamily("keel_monitoring_up", METRICS["keel_monitoring_up"][1])
        up.add_metric([], self._up)
        return [*families, up]

    def read(self, now: dt.datetime | None = None) -> list[GaugeMetricFamily]:
        now = now or dt.datetime.now(dt.UTC)
        g = {name: _family(name) for name in METRICS if name != "keel_monitoring_up"}
        drift = self._latest(DRIFT_TABLE)
        for model in self.models:
            rows = _latest_window(drift, model)
            for r in rows:
                version = str(r["version"])
                if r["target"] == "feature":
                    for stat in STATISTICS:
                        if r[stat] is not None:
                            g["keel_drift_score"].add_metric([model, version, r["name"], stat], r[stat])
                    g["keel_drift_detected"].add_metric([model, r["name"]], 1.0 if r["level"] == "drift" else 0.0)
                elif r["target"] == "prediction" and r["current_mean"] is not None:
                    g["keel_prediction_mean"].add_metric([model, version], r["current_mean"])
                elif r["target"] == "dataset":
                    g["keel_drift_share"].add_metric([model], r["value"] or 0.0)
                    g["keel_dataset_drift"].add_metric([model], 1.0 if r["level"] == "drift" else 0.0)
            updated = _max_of(drift, model, "computed_at")
            if updated is not None:
                g["keel_monitoring_updated_timestamp_seconds"].add_metric([model], updated.timestamp())
        performance = self._latest(PERFORMANCE_TABLE)
        for model in self.models:
            judged = _rows(performance, model)
            judged_starts = [r["window_start"] for r in judged if r["level"] != "unknown" and r["level"] != "info"]
            if judged_starts:
                last = max(judged_starts)
                for r in judged:
                    if r["window_start"] == last:
                        labels = [model, str(r["version"]), r["metric"]]
                        if r["value"] is not None:
                            g["keel_model_metric"].add_metric(labels, r["value"])
                        if r["training_value"] is not None:
                            g["keel_model_training_metric"].add_metric(labels, r["training_value"])
        quality = self._latest(QUALITY_TABLE)
        if quality is not None and quality.num_rows:
            nulls = quality.filter(pc.equal(quality.column("check_name"), "nulls")).to_pylist()
            latest = {}
            for r in nulls:
                key = (r["table_name"], r["column_name"])
                if key not in latest or r["window_start"] > latest[key]["window_start"]:
                    latest[key] = r
            for (table, column), r in sorted(latest.items()):
                if r["value"] is not None:
                    g["keel_feature_null_rate"].add_metric([table, column], r["value"])
        for target in self.tables:
            newest = self._newest_row(target, now)
            if newest is not None:
                g["keel_table_freshness_seconds"].add_metric([target.table], max(0.0, (now - newest).total_seconds()))
        for model, alias, created in self._aliases():
            g["keel_model_age_seconds"].add_metric([model, alias], max(0.0, (now - created).total_seconds()))
        return list(g.values())

    def _latest(self, table: str) -> pa.Table | None:
        """The table's rows of the last few days, where the latest window of every model lies."""
        if not self.lake.exists(table):
            return None
        days = [dt.datetime.now(dt.UTC).date() - dt.timedelta(days=i) for i in range(0, 62)]
        return self.lake.read(table, row_filter=day_filter("window_start", days))

    def _newest_row(self, target: QualityTarget, now: dt.datetime) -> dt.datetime | None:
        if not self.lake.exists(target.table):
            return None
        days = [now.date() - dt.timedelta(days=i) for i in range(FRESHNESS_DAYS)]
        data = self.lake.read(target.table, row_filter=day_filter(target.day_column, days), columns=[target.day_column])
        if not data.num_rows:  # stale: the newest row is older than the recent days, read the column through
            data = self.lake.read(target.table, columns=[target.day_column])
        newest = pc.max(data.column(target.day_column)).as_py() if data.num_rows else None
        return newest if newest is None or newest.tzinfo else newest.replace(tzinfo=dt.UTC)

    def _aliases(self) -> list[tuple[str, str, dt.datetime]]:
        from keel.models.registry_client import alias_version, mlflow_client

        out = []
        for model in self.models:
            client = mlflow_client(self.settings)
            for alias in ALIASES:
                mv = alias_version(client, model, alias)
                if mv is not None:
                    out.append((model, alias, dt.datetime.fromtimestamp(mv.creation_timestamp / 1000, dt.UTC)))
        return out


def _family(name: str) -> GaugeMetricFamily:
    labels, text = METRICS[name]
    return GaugeMetricFamily(name, text, labels=[label.strip() for label in labels.split(",") if label.strip()])


def _rows(table: pa.Table | None, model: str) -> list[dict]:
    if table is None or table.num_rows == 0:
        return []
    return table.filter(pc.equal(table.column("model"), model)).to_pylist()


def _latest_window(table: pa.Table | None, model: str) -> list[dict]:
    rows = _rows(table, model)
    if not rows:
        return []
    last = max(r["window_start"] for r in rows)
    return [r for r in rows if r["window_start"] == last]


def _max_of(table: pa.Table | None, model: str, column: str):
    rows = _rows(table, model)
    return max((r[column] for r in rows if r[column] is not None), default=None)


def exposition(collector: MonitoringCollector) -> str:
    """The metrics in Prometheus' text format, read now (for ``--once`` and a textfile collector)."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()
