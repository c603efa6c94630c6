"""Where the inference log writer's batches go: JSONL files under ``KEEL_HOME/inference_log/``,
or the Kafka topic ``keel.inference_log`` when KEEL_KAFKA_BOOTSTRAP is set.

Both sinks are at-least-once (a retried batch may land twice); ``keel.inference_log.loader``
reads whole days back and removes exact copies.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from keel.inference_log.records import TOPIC, EncodedRecord, InferenceLogError

if TYPE_CHECKING:
    from keel.config import Settings

log = logging.getLogger(__name__)

FOLDER = "inference_log"
TOPIC_PARTITIONS = 3


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
