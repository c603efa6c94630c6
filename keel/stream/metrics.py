"""The stream worker's Prometheus metrics (served on ``StreamConfig.metrics_port``).

``keel_stream_events_total{source,outcome}``, ``keel_stream_consumer_lag{topic,partition}``,
``keel_stream_event_to_online_seconds{source}`` (event timestamp to online write done),
``keel_stream_batch_write_seconds{source}`` and ``keel_stream_rows_written_total{source}``.
Dashboards and alerts read these names (deploy/); tests/deploy checks them against this file.
"""

from __future__ import annotations

from keel.stream.worker_config import StreamError

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
WRITE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class StreamMetrics:
    """The worker's Prometheus metrics, in a registry of its own (so several workers can share a process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.events = Counter(
            "keel_stream_events",
            "Events consumed, valid, and dead-lettered (quarantined) by the stream worker",
            ["source", "outcome"],
            registry=self.registry,
        )
        self.lag = Gauge(
            "keel_stream_consumer_lag",
            "Messages behind the partition's end (high watermark minus position)",
            ["topic", "partition"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "keel_stream_event_to_online_seconds",
            "From an event's timestamp to its features written to the online store",
            ["source"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.write = Histogram(
            "keel_stream_batch_write_seconds",
            "Duration of one micro-batch append (quarantine + raw table) to Iceberg",
            ["source"],
            buckets=WRITE_BUCKETS,
            registry=self.registry,
        )
        self.rows = Counter(
            "keel_stream_rows_written", "Rows appended to the raw tables", ["source"], registry=self.registry
        )

    def serve(self, port: int):
        from prometheus_client import start_http_server

        try:
            return start_http_server(port, addr="0.0.0.0", registry=self.registry)
        except OSError as exc:
            raise StreamError(
                f"metrics: cannot listen on port {port} ({exc}); pass --metrics-port with a free port, or 0 for none"
            ) from None
