"""The inference log: what the serving process answered, one row per model scored per request.

Serving builds an ``InferenceRecord`` per answer (and one per challenger scored in shadow)
and hands it to ``InferenceLogWriter.log``, which only appends to a bounded in-memory
buffer: it never blocks on I/O and never raises. A background thread writes the buffer in
batches to a sink (``keel.inference_log.sinks``), retrying a failed batch with capped
backoff, and ``close`` drains what is left on a graceful shutdown. The sink is the Kafka topic ``keel.inference_log`` when
KEEL_KAFKA_BOOTSTRAP is set, else JSONL files under ``KEEL_HOME/inference_log/day=YYYY-MM-DD/``.

Both sinks are at-least-once (a retried batch may land twice); ``keel.inference_log.loader``
reads whole days back into ``monitoring.inference_log`` and removes exact copies.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from keel.inference_log.records import TOPIC, EncodedRecord, InferenceRecord, encode
from keel.inference_log.sinks import FileSink, KafkaSink, Sink, log_root

if TYPE_CHECKING:
    from keel.config import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LogCounters:
    """``logged``: accepted by ``log``; ``written``: acknowledged by the sink; ``dropped``: never
    written (refused by a full buffer or a closed writer, or still failing when ``close`` gave up);
    ``rejected``: not encodable as JSON; ``failed_flushes``: sink writes that raised; ``pending``:
    accepted and not settled yet."""

    logged: int
    written: int
    dropped: int
    rejected: int
    failed_flushes: int
    pending: int


class InferenceLogWriter:
    """Batches records to a sink from a background thread, off the request path.

    ``log`` is O(1) and thread-safe: one lock around a deque append. The thread writes every
    ``flush_interval_s`` or as soon as ``batch_size`` records wait. A failed write keeps its
    batch and retries after a backoff doubling from ``retry_initial_s`` to ``retry_max_s``;
    meanwhile at most ``max_buffered`` records wait and further ones are counted as dropped.
    Create the writer in each serving worker (a thread does not survive a fork) and call
    ``close`` on shutdown: it writes everything accepted, giving up on a sink still failing
    after ``close_timeout_s``.
    """

    def __init__(
        self,
        sink: Sink,
        *,
        batch_size: int = 500,
        flush_interval_s: float = 1.0,
        max_buffered: int = 100_000,
        retry_initial_s: float = 0.1,
        retry_max_s: float = 30.0,
        close_timeout_s: float = 30.0,
    ) -> None:
        for name, value in (
            ("batch_size", batch_size),
            ("flush_interval_s", flush_interval_s),
            ("max_buffered", max_buffered),
            ("retry_initial_s", retry_initial_s),
            ("retry_max_s", retry_max_s),
        ):
            if not value > 0:
                raise ValueError(f"inference log writer: {name}={value!r} must be > 0")
        self.sink = sink
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.max_buffered = max_buffered
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.close_timeout_s = close_timeout_s
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)
        self._buffer: collections.deque = collections.deque()
        self._in_flight = 0
        self._logged = self._written = self._refused = self._lost = self._rejected = self._failed = 0
        self._closing = False
        self._deadline: float | None = None
        self._wake = threading.Event()
        self._hurry = threading.Event()
        self._thread = threading.Thread(target=self._run, name="keel-inference-log", daemon=True)
        self._thread.start()

    @classmethod
    def from_settings(cls, settings: Settings, *, topic: str = TOPIC, **options) -> InferenceLogWriter:
        """Kafka when ``settings.kafka_bootstrap`` is set, else files under ``settings.home``."""
        sink = KafkaSink(settings.kafka_bootstrap, topic) if settings.kafka_bootstrap else FileSink(log_root(settings))
        return cls(sink, **options)

    def log(self, record: InferenceRecord | Mapping[str, Any]) -> bool:
        """Queue ``record`` (or a mapping of its fields, checked later on the writer's thread);
        False when it was dropped (buffer full, or the writer closed)."""
        try:
            with self._lock:
                if self._closing or len(self._buffer) + self._in_flight >= self.max_buffered:
                    self._refused += 1
                    return False
                self._buffer.append(record)
                self._logged += 1
                full = len(self._buffer) == self.batch_size
            if full:
                self._wake.set()
            return True
        except Exception:  # the request must be answered whatever happens here
            return False

    @property
    def counters(self) -> LogCounters:
        with self._lock:
            return LogCounters(
                logged=self._logged,
                written=self._written,
                dropped=self._refused + self._lost,
                rejected=self._rejected,
                failed_flushes=self._failed,
                pending=self._logged - self._written - self._lost - self._rejected,
            )

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every record logged before the call is written (or given up); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            target = self._logged
            self._wake.set()
            while self._written + self._lost + self._rejected < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._settled.wait(left)
        return True

    def close(self, timeout_s: float | None = None) -> LogCounters:
        """Stop accepting records, write those waiting and stop the thread; returns the final counters."""
        timeout = self.close_timeout_s if timeout_s is None else timeout_s
        with self._lock:
            self._closing = True
            if self._deadline is None:
                self._deadline = time.monotonic() + timeout
            deadline = self._deadline
        self._wake.set()
        self._hurry.set()
        # A write already under way may take up to the sink's own timeout past the deadline.
        self._thread.join(max(0.0, deadline - time.monotonic()) + 60.0)
        if self._thread.is_alive():
            log.error("inference log: writer thread still busy in %r at close; %s", self.sink, self.counters)
        else:
            try:
                self.sink.close()
            except Exception:
                log.exception("inference log: closing %r failed", self.sink)
        return self.counters

    def __enter__(self) -> InferenceLogWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            with self._lock:
                taken, self._buffer = self._buffer, collections.deque()
                self._in_flight = len(taken)
                closing = self._closing
            records = list(taken)
            for start in range(0, len(records), self.batch_size):
                chunk = records[start : start + self.batch_size]
                encoded = self._encode(chunk)
                if encoded:
                    self._deliver(encoded)
                with self._lock:
                    self._in_flight -= len(chunk)
                    self._settled.notify_all()
            if closing:
                return

    def _encode(self, chunk: list) -> list[EncodedRecord]:
        out, failed = [], []
        for record in chunk:
            try:
                out.append(encode(record))
            except Exception as exc:
                failed.append((record, exc))
        if failed:
            with self._lock:
                self._rejected += len(failed)
            record, exc = failed[0]
            log.error(
                "inference log: %d record(s) cannot be written as JSON and are not logged; the first, %r: %s",
                len(failed),
                record,
                exc,
            )
        return out

    def _deliver(self, batch: list[EncodedRecord]) -> None:
        delay = self.retry_initial_s
        while True:
            with self._lock:
                deadline = self._deadline
            if deadline is not None and time.monotonic() >= deadline:
                with self._lock:
                    self._lost += len(batch)
                log.error(
                    "inference log: %d records lost: %r still failing when close() gave up", len(batch), self.sink
                )
                return
            try:
                self.sink.write(batch)
            except Exception as exc:
                with self._lock:
                    self._failed += 1
                    deadline = self._deadline
                log.warning("inference log: writing %d records to %r failed (%s); retrying", len(batch), self.sink, exc)
                wait = delay if deadline is None else min(delay, max(0.0, deadline - time.monotonic()))
                if self._hurry.wait(wait):
                    self._hurry.clear()  # close() cuts one backoff short, not every later one
                delay = min(delay * 2, self.retry_max_s)
                continue
            with self._lock:
                self._written += len(batch)
            return
