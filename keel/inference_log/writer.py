"""The inference log: what the serving process answered, one row per model scored per request.

Serving builds an ``InferenceRecord`` per answer (and one per challenger scored in shadow)
and hands it to ``InferenceLogWriter.log``, which only appends to a bounded in-memory
buffer: it never blocks on I/O and never raises. A background thread writes the buffer in
batches to a sink, retrying a failed batch with capped backoff, and ``close`` drains what is
left on a graceful shutdown. The sink is the Kafka topic ``keel.inference_log`` when
KEEL_KAFKA_BOOTSTRAP is set, else JSONL files under ``KEEL_HOME/inference_log/day=YYYY-MM-DD/``.

Both sinks are at-least-once (a retried batch may land twice); ``keel.inference_log.loader``
reads whole days back into ``monitoring.inference_log`` and removes exact copies.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    from keel.config import Settings

log = logging.getLogger(__name__)

TABLE = "monitoring.inference_log"
TOPIC = "keel.inference_log"
SOURCE = "inference_log"  # the quarantine table's ``source`` for unreadable records
ALIASES = ("champion", "challenger")
FOLDER = "inference_log"
# How late a record may reach Kafka after its own ts; a day's read spans this much either side.
KAFKA_LATENESS = dt.timedelta(hours=1)
TOPIC_PARTITIONS = 3
DAY = dt.timedelta(days=1)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MS = dt.timedelta(milliseconds=1)


class InferenceLogError(RuntimeError):
    """The inference log cannot be written or loaded; the message says why and the fix."""


# Records ------------------------------------------------------------------------------------


def make_log_id(request_id: str, model: str, alias: str, shadow: bool) -> str:
    """What identifies a row: a request scored by one model in one role."""
    return f"{request_id}:{model}:{alias}{':shadow' if shadow else ''}"


@dataclass(frozen=True, slots=True, kw_only=True)
class InferenceRecord:
    """One model's answer to one request, as serving saw it.

    ``features`` holds the model's input in the model's feature order; the writer reads it on
    its own thread later, so pass a dict nobody changes afterwards. ``shadow`` is True for a
    challenger scored alongside the champion whose answer was not returned; ``degraded`` is
    True when defaults replaced features because the online store was unreachable.
    """

    request_id: str
    ts: dt.datetime
    model: str
    version: int
    alias: str
    shadow: bool = False
    entity_id: str
    features: Mapping[str, float | int | str | bool | None]
    prediction: float
    latency_ms: float
    degraded: bool = False
    missing_features: Sequence[str] = ()

    @property
    def log_id(self) -> str:
        return make_log_id(self.request_id, self.model, self.alias, self.shadow)


class EncodedRecord(NamedTuple):
    """A record as the sinks write it: its UTC day, ts in epoch ms, key and JSON value."""

    day: dt.date
    ts_ms: int
    key: bytes
    value: bytes


def encode(record: InferenceRecord | Mapping[str, Any]) -> EncodedRecord:
    """The record as one line of JSON; a naive ts is taken as UTC, NaN becomes null.

    A mapping with ``InferenceRecord``'s field names stands for the record it describes.
    """
    if not isinstance(record, InferenceRecord):
        record = InferenceRecord(**record)
    ts = record.ts.replace(tzinfo=dt.UTC) if record.ts.tzinfo is None else record.ts.astimezone(dt.UTC)
    entity = str(record.entity_id)
    body = {
        "log_id": record.log_id,
        "request_id": str(record.request_id),
        "ts": ts.isoformat(),
        "model": record.model,
        "version": int(record.version),
        "alias": record.alias,
        "shadow": bool(record.shadow),
        "entity_id": entity,
        "features": dict(record.features),
        "prediction": float(record.prediction),
        "latency_ms": float(record.latency_ms),
        "degraded": bool(record.degraded),
        "missing_features": list(record.missing_features),
    }
    try:
        text = json.dumps(body, allow_nan=False, separators=(",", ":"), default=_plain)
    except ValueError:
        text = json.dumps(_finite(body), allow_nan=False, separators=(",", ":"), default=_plain)
    return EncodedRecord(ts.date(), (ts - _EPOCH) // _MS, entity.encode(), text.encode())


def _plain(value):
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    return str(value)


def _finite(value):
    if hasattr(value, "item") and not isinstance(value, dict | list):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


# Sinks --------------------------------------------------------------------------------------


class Sink(Protocol):
    """Where batches go. ``write`` returns once the batch is durable, or raises."""

    def write(self, batch: Sequence[EncodedRecord]) -> None: ...

    def close(self) -> None: ...


def log_root(settings: Settings) -> Path:
    return settings.home / FOLDER


def day_folder(root: Path, day: dt.date) -> Path:
    return root / f"day={day.isoformat()}"


class FileSink:
    """JSONL files under ``root/day=YYYY-MM-DD/``, one per batch and day.

    A file is written under a hidden temporary name, synced and renamed, so a reader sees
    whole files only. Names are ``<host>-<pid>-<start>-<seq>.jsonl``: the writer's start time
    (µs, hex) keeps a restarted process that gets the same pid (pid 1 in a container) from
    reusing a name.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._pid: int | None = None
        self._prefix = ""
        self._seq = 0

    def __repr__(self) -> str:
        return f"FileSink({str(self.root)!r})"

    def _name(self) -> str:
        if self._pid != os.getpid():  # first write, or a forked child
            self._pid = os.getpid()
            host = re.sub(r"[^\w.\-]", "_", socket.gethostname()) or "host"
            self._prefix = f"{host}-{self._pid}-{time.time_ns() // 1000:x}"
            self._seq = 0
        self._seq += 1
        return f"{self._prefix}-{self._seq:06d}.jsonl"

    def write(self, batch: Sequence[EncodedRecord]) -> None:
        by_day: dict[dt.date, list[bytes]] = {}
        for record in batch:
            by_day.setdefault(record.day, []).append(record.value)
        ready: list[tuple[Path, Path]] = []
        try:
            for day, values in sorted(by_day.items()):
                folder = day_folder(self.root, day)
                folder.mkdir(parents=True, exist_ok=True)
                final = folder / self._name()
                tmp = folder / f".{final.name}.tmp"
                with open(tmp, "wb") as fh:
                    fh.write(b"\n".join(values) + b"\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                ready.append((tmp, final))
            for tmp, final in ready:
                os.replace(tmp, final)
        finally:
            for tmp, _ in ready:
                tmp.unlink(missing_ok=True)

    def close(self) -> None:
        pass


class KafkaSink:
    """A Kafka topic, JSON values keyed by entity id, stamped with the record's ts.

    A batch counts as written once the brokers acknowledged every record (``acks=all``).
    The producer connects on the first write, so a broker that is down when serving starts
    only delays the log. A missing topic is created with ``partitions`` partitions.
    """

    def __init__(
        self, bootstrap: str, topic: str = TOPIC, *, timeout_s: float = 30.0, partitions: int = TOPIC_PARTITIONS
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.timeout_s = timeout_s
        self.partitions = partitions
        self._producer = None
        self._topic_ready = False

    def __repr__(self) -> str:
        return f"KafkaSink({self.bootstrap!r}, {self.topic!r})"

    def _connect(self):
        timeout_ms = int(self.timeout_s * 1000)
        if self._producer is None:
            from kafka import KafkaProducer

            linger_ms, request_ms = 5, min(timeout_ms, 30_000)
            self._producer = KafkaProducer(
                bootstrap_servers=self.bootstrap,
                acks="all",
                linger_ms=linger_ms,
                bootstrap_timeout_ms=timeout_ms,
                max_block_ms=timeout_ms,
                request_timeout_ms=request_ms,
                # kafka-python requires delivery >= linger + request; a flush waits timeout_s at most anyway.
                delivery_timeout_ms=max(timeout_ms, linger_ms + request_ms),
                client_id="keel-inference-log",
            )
        if not self._topic_ready:
            from keel.devservers import create_topics

            # After the producer: it fails within timeout_s on a broker that is down, the admin client only in 30 s.
            if create_topics(self.bootstrap, {self.topic: self.partitions}, self.timeout_s):
                log.info("created topic %s with %d partitions", self.topic, self.partitions)
            self._topic_ready = True
        return self._producer

    def write(self, batch: Sequence[EncodedRecord]) -> None:
        producer = self._connect()
        futures = [producer.send(self.topic, key=r.key, value=r.value, timestamp_ms=r.ts_ms) for r in batch]
        producer.flush(timeout=self.timeout_s)
        failed = [f for f in futures if not f.succeeded()]
        if failed:
            raise InferenceLogError(
                f"Kafka at {self.bootstrap!r} acknowledged {len(batch) - len(failed)} of {len(batch)} records "
                f"to topic {self.topic!r}: {failed[0].exception!r}"
            )

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=self.timeout_s)
            self._producer = None


# Writer -------------------------------------------------------------------------------------


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
