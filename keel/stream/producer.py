"""Demo events in real time: the declared sources' events, produced to their Kafka topics.

Each event is a JSON object with the source's event id, entity keys, timestamp (ISO 8601
UTC with microseconds, the moment it is produced) and payload columns, with values drawn
from what the source declares: allowed strings, numbers inside their min/max (skewed low,
as amounts and durations are), a few refunds and NULLs. Entities are named as the demo
generator names them (``u00042`` for a user), and the message key is the entity id, so
one entity's events stay in order on one partition. ``bad_every=K`` makes every K-th event
malformed (not JSON, a missing key, a wrong type, a bad timestamp, in turn) for demos of
the dead-letter path.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from keel.dsl import Column, EventSource

log = logging.getLogger(__name__)

# Share of a batch made of NULLs in nullable columns, and of true values in bool columns.
NULL_SHARE = 0.02
TRUE_SHARE = 0.05
# Strings without an allowed set (session ids) stay the same for an entity for this long.
SESSION_SECONDS = 1800
BAD_KINDS = ("malformed_record", "missing_key", "wrong_type", "bad_timestamp")
DEFAULT_PARTITIONS = 3


class ProducerError(RuntimeError):
    """Events cannot be produced; the message says why and the fix."""


@dataclass
class ProduceReport:
    events: dict[str, int] = field(default_factory=dict)
    bad: int = 0
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.events.values())

    def summary(self) -> str:
        per = ", ".join(f"{name} {n:,}" for name, n in sorted(self.events.items()))
        rate = self.total / self.seconds if self.seconds else 0.0
        return f"produced {self.total:,} events in {self.seconds:.1f}s ({rate:,.0f}/s): {per}; {self.bad:,} malformed"


def entity_ids(source: EventSource, n: int) -> list[str] | np.ndarray:
    """The demo's entity ids: ``u00000`` .. for string keys (first letter of the entity), 0.. for integers."""
    key_type = next(iter(source.entity.join_keys.values()))
    if key_type == "int64":
        return np.arange(n)
    width = max(5, len(str(n - 1)))
    return [f"{source.entity.name[0]}{i:0{width}d}" for i in range(n)]


class EventMaker:
    """Builds batches of one source's events as (key, value) bytes; values drawn with numpy."""

    def __init__(self, source: EventSource, users: int, rng: np.random.Generator, run: str) -> None:
        if len(source.entity.join_keys) != 1:
            raise ProducerError(
                f"event source {source.name!r}: the demo producer handles entities with one join key, "
                f"not {list(source.entity.join_keys)}"
            )
        self.source = source
        self.rng = rng
        self.key = source.key_columns[0]
        self.ids = entity_ids(source, users)
        self.prefix = f"{source.name[0]}-{run}-"
        self.count = 0

    def _values(self, col: Column, n: int, entities: Sequence, now: dt.datetime) -> list:
        rng = self.rng
        if col.type == "string" and col.allowed:
            values = np.asarray(col.allowed, dtype=object)[rng.integers(0, len(col.allowed), n)]
        elif col.type == "string":
            bucket = int(now.timestamp()) // SESSION_SECONDS
            stem = col.name.split("_")[0]
            values = np.asarray([f"{stem}-{e}-{bucket}" for e in entities], dtype=object)
        elif col.type == "int64" and col.min is not None and col.max is not None:
            values = rng.integers(int(col.min), int(col.max) + 1, n).tolist()
        elif col.type in ("int64", "float64"):
            lo = col.min if col.min is not None else 0.0
            hi = col.max if col.max is not None else lo + 1000.0
            # Log-normal around 1/500 of the range: most amounts small, a few large, none outside.
            share = np.minimum(1.0, np.exp(rng.normal(np.log(0.002), 1.2, n)))
            values = lo + (hi - lo) * share
            values = (np.round(values).astype(np.int64) if col.type == "int64" else np.round(values, 2)).tolist()
        elif col.type == "bool":
            values = (rng.random(n) < TRUE_SHARE).tolist()
        elif col.type == "timestamp":
            values = [iso(now)] * n
        else:
            values = [now.date().isoformat()] * n
        values = list(values)
        if col.nullable:
            for i in np.flatnonzero(rng.random(n) < NULL_SHARE):
                values[i] = None
        return values

    def batch(self, n: int, now: dt.datetime) -> list[tuple[bytes, dict]]:
        """``n`` events at ``now``: (message key, event object)."""
        entities = [self.ids[i] for i in self.rng.integers(0, len(self.ids), n)]
        columns = {c.name: self._values(c, n, entities, now) for c in self.source.columns}
        stamp = iso(now)
        out = []
        for i, entity in enumerate(entities):
            event = {}
            if self.source.event_id:
                event[self.source.event_id] = f"{self.prefix}{self.count + i}"
            event[self.key] = entity
            event[self.source.timestamp] = stamp
            for name, values in columns.items():
                event[name] = values[i]
            out.append((str(entity).encode(), event))
        self.count += n
        return out


def iso(moment: dt.datetime) -> str:
    """ISO 8601 in UTC with microseconds, e.g. ``2026-01-31T12:00:00.000000Z``."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def spoil(event: dict, kind: str, source: EventSource) -> bytes:
    """A malformed rendering of ``event``: ``kind`` is one of BAD_KINDS."""
    if kind == "malformed_record":
        return b'{"not json": '
    bad = dict(event)
    if kind == "missing_key":
        bad.pop(source.key_columns[0], None)
    elif kind == "bad_timestamp":
        bad[source.timestamp] = "yesterday at noon"
    else:
        typed = [c for c in source.columns if c.type in ("int64", "float64", "bool", "timestamp", "date")]
        if typed:
            bad[typed[0].name] = f"not {typed[0].type}"
        else:
            bad[source.timestamp] = "not a timestamp"
    return json.dumps(bad).encode()


class EventProducer:
    """Produces the sources' events to their topics at a steady rate, timestamps = now."""

    def __init__(
        self,
        bootstrap: str,
        sources: Sequence[EventSource],
        *,
        users: int = 1000,
        seed: int | None = None,
        bad_every: int | None = None,
        mix: dict[str, float] | None = None,
        partitions: int = DEFAULT_PARTITIONS,
        producer_options: dict | None = None,
    ) -> None:
        sources = [s for s in sources if s.kafka_topic]
        if not sources:
            raise ProducerError("no event source declares a kafka_topic; set kafka_topic='...' on the sources")
        if users < 1:
            raise ProducerError(f"users={users} must be at least 1")
        if bad_every is not None and bad_every < 1:
            raise ProducerError(f"bad_every={bad_every} must be at least 1 (or omitted for no malformed events)")
        mix = mix or {s.name: 1.0 for s in sources}
        unknown = sorted(set(mix) - {s.name for s in sources})
        if unknown or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
            raise ProducerError(
                f"mix {mix}: give non-negative weights for sources with topics ({', '.join(s.name for s in sources)})"
            )
        self.sources = [s for s in sources if mix.get(s.name, 0) > 0]
        weights = np.array([mix[s.name] for s in self.sources], float)
        self.shares = weights / weights.sum()
        self.rng = np.random.default_rng(seed)
        run = uuid.uuid4().hex[:8]
        self.makers = [EventMaker(s, users, self.rng, run) for s in self.sources]
        self.bad_every = bad_every
        self.produced = 0
        from kafka import KafkaProducer
        from kafka.errors import KafkaError

        from keel.devservers import create_topics

        try:
            created = create_topics(bootstrap, {s.kafka_topic: partitions for s in self.sources})
            if created:
                log.info("created topics %s with %d partitions", ", ".join(created), partitions)
            options = {"linger_ms": 5, **(producer_options or {})}
            self.producer = KafkaProducer(bootstrap_servers=bootstrap, **options)
        except KafkaError as exc:
            raise ProducerError(
                f"cannot reach Kafka at KEEL_KAFKA_BOOTSTRAP={bootstrap!r}: {exc} (is the broker running there?)"
            ) from None

    def produce(self, n: int, now: dt.datetime | None = None, report: ProduceReport | None = None) -> ProduceReport:
        """Send ``n`` events stamped ``now`` (default: the current time)."""
        now = now or dt.datetime.now(dt.UTC)
        report = report or ProduceReport()
        counts = self.rng.multinomial(n, self.shares)
        for maker, count in zip(self.makers, counts, strict=True):
            if not count:
                continue
            source = maker.source
            for key, event in maker.batch(int(count), now):
                self.produced += 1
                if self.bad_every and self.produced % self.bad_every == 0:
                    kind = BAD_KINDS[(self.produced // self.bad_every - 1) % len(BAD_KINDS)]
                    value = spoil(event, kind, source)
                    report.bad += 1
                else:
                    value = json.dumps(event).encode()
                self.producer.send(source.kafka_topic, key=key, value=value)
            report.events[source.name] = report.events.get(source.name, 0) + int(count)
        return report

    def run(
        self,
        rate: float,
        seconds: float | None = None,
        *,
        stop: threading.Event | None = None,
        progress: Callable[[ProduceReport], None] | None = None,
        progress_every: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> ProduceReport:
        """Produce ``rate`` events a second for ``seconds`` (until ``stop`` is set when None),
        pacing by ``clock`` and ``sleep``."""
        if rate <= 0:
            raise ProducerError(f"rate={rate} must be a positive number of events per second")
        report = ProduceReport()
        start = clock()
        next_progress = start + progress_every
        sent = 0
        while not (stop is not None and stop.is_set()):
            elapsed = clock() - start
            if seconds is not None and elapsed >= seconds:
                break
            due = int(rate * elapsed) + 1 - sent
            if due <= 0:
                sleep(min(0.005, 1.0 / rate))
                continue
            # A slow moment (GC, a full send buffer) is caught up in steps, not one huge batch.
            due = min(due, max(1, int(rate / 20)))
            self.produce(due, report=report)
            sent += due
            if progress is not None and clock() >= next_progress:
                report.seconds = clock() - start
                progress(report)
                next_progress += progress_every
        self.producer.flush()
        report.seconds = clock() - start
        return report

    def close(self) -> None:
        self.producer.flush()
        self.producer.close()

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
