"""Prometheus metrics of the serving process.

Latency histograms are labelled by model, version and alias, so p50/p95/p99 per version
come from ``histogram_quantile`` over their buckets; the buckets are fine below 10 ms,
where the target lies. With several uvicorn workers, ``PROMETHEUS_MULTIPROC_DIR`` (set by
``keel serve``) makes ``/metrics`` add up every worker.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "keel_serving_requests",
            "Prediction requests by outcome: ok, rejected (4xx) or error (5xx)",
            ["model", "version", "alias", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "keel_serving_request_seconds",
            "Time to answer a prediction request (hydrate + predict)",
            ["model", "version", "alias"],
            buckets=BUCKETS,
            registry=r,
        )
        self.online_latency = Histogram(
            "keel_serving_online_seconds",
            "Time of the online-store read of a request",
            ["model"],
            buckets=BUCKETS,
            registry=r,
        )
        self.missing = Counter(
            "keel_serving_missing_features",
            "Feature values replaced by their default",
            ["model", "feature"],
            registry=r,
        )
        self.degraded = Counter(
            "keel_serving_degraded_responses",
            "Responses answered with defaults (online store down)",
            ["model"],
            registry=r,
        )
        self.shadow = Counter(
            "keel_serving_shadow_predictions", "Challenger predictions made in shadow", ["model", "version"], registry=r
        )
        self.canary_share = Gauge(
            "keel_serving_canary_share",
            "Configured share of entities routed to the challenger",
            ["model"],
            registry=r,
            multiprocess_mode="max",
        )
        self.served_version = Gauge(
            "keel_serving_model_version",
            "Version served per alias",
            ["model", "alias"],
            registry=r,
            multiprocess_mode="max",
        )
        self.breaker_open = Gauge(
            "keel_serving_breaker_open",
            "1 while the online-store circuit breaker is open",
            registry=r,
            multiprocess_mode="max",
        )
        # What the HorizontalPodAutoscaler of deploy/kubernetes/serving.yaml scales on, beside CPU.
        self.in_flight = Gauge(
            "keel_serving_requests_in_flight",
            "HTTP requests being read or answered right now (summed over the workers)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.swaps = Counter("keel_serving_model_swaps", "Versions swapped in after a promotion", ["model"], registry=r)

        self._children: dict = {}

    def answered(self, model: str, version: int, alias: str):
        """The latency histogram and the 'ok' counter of one served version (looked up once)."""
        key = (model, version, alias)
        children = self._children.get(key)
        if children is None:
            labels = (model, str(version), alias)
            children = self._children[key] = (
                self.latency.labels(*labels),
                self.requests.labels(*labels, "ok"),
                self.online_latency.labels(model),
            )
        return children

    def refused(self, model: str, status: int) -> None:
        """Count an answer other than 200: ``rejected`` for the client's fault (4xx), ``error`` for ours (5xx).

        ``model`` is the name as served or ``unknown``: names from request paths would let any
        client add series without bound. Such answers have no version or alias.
        """
        self.requests.labels(model, "", "", "rejected" if status < 500 else "error").inc()

    def render(self) -> bytes:
        folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if folder:
            combined = CollectorRegistry()
            multiprocess.MultiProcessCollector(combined, path=folder)
            return generate_latest(combined)
        return generate_latest(self.registry)
