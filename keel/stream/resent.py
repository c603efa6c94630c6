"""Events sent again: which event ids the stream worker saw lately, and how a poll's repeated ids are settled.

An event id repeated in a poll, an earlier poll or the raw table's recent history is settled as
a batch ingest settles it against the table (``keel.ingest.resent``): arriving unchanged it is
dropped and counted; with other values it is a correction (``on_duplicate="replace"``) or is
dead-lettered as a duplicate pointing at the first copy. The worker remembers the last
``StreamConfig.dedup_events`` ids; an id older than that is not recognised.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import OrderedDict
from dataclasses import dataclass, field

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from keel.dsl import EventSource
from keel.stream.kafka_io import OFFSET, PARTITION, digest_sql, location, quarantine_rows


@dataclass(frozen=True)
class Settled:
    """A poll's valid events of one topic, their repeated ids settled (``RecentIds.settle``)."""

    fresh: pa.Table  # to append (corrections included)
    refused: pa.Table | None = None  # quarantine rows of duplicates refused
    unchanged: int = 0  # re-sent as they were: dropped
    corrections: dict[str, int] = field(default_factory=dict)  # event id -> replaced copy's timestamp (us)


def row_digests(source: EventSource, events: pa.Table) -> np.ndarray:
    """Each event's ``digest_sql``, as the stream's validation computes it for the events it checks."""
    con = duckdb.connect()
    try:
        con.register("events", events.select([c.name for c in source.all_columns()]))
        return con.sql(f"SELECT {digest_sql(source)} AS d FROM events").to_arrow_table()["d"].to_numpy()
    finally:
        con.close()


def utc_day(ts_us: int) -> str:
    """The UTC date of a timestamp in microseconds, as YYYY-MM-DD."""
    return (dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=ts_us)).date().isoformat()


@dataclass(frozen=True)
class Seen:
    """Where an event id came from (a table, or a Kafka partition and the row's offset), its
    timestamp (us) and a digest of its values."""

    origin: str
    row: int | None
    ts_us: int
    digest: int

    @property
    def where(self) -> str:
        return self.origin if self.row is None else f"{self.origin} row {self.row}"


class RecentIds:
    """Event ids seen lately, bounded to ``capacity`` (oldest forgotten first): what the worker
    can tell a re-sent event by. An id older than that is not recognised."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.seen: OrderedDict[str, Seen] = OrderedDict()

    def add(self, source: EventSource, events: pa.Table, where: str) -> None:
        ids = events[source.event_id].to_pylist()
        ts = pc.cast(events[source.timestamp], pa.int64()).to_pylist()
        for event_id, t, digest in zip(ids, ts, row_digests(source, events).tolist(), strict=True):
            self.seen[event_id] = Seen(where, None, t, digest)
        self.trim()

    def trim(self) -> None:
        while len(self.seen) > self.capacity:
            self.seen.popitem(last=False)

    def __contains__(self, event_id: str) -> bool:
        return event_id in self.seen

    def settle(self, source: EventSource, good: pa.Table, digests: np.ndarray, run_id: str) -> Settled:
        """Settle events whose id came earlier (in this poll, an earlier one, or the raw table's
        recent history) as a batch ingest settles them against the table (keel.ingest.resent): arriving
        unchanged they are dropped and counted; with other values they are corrections
        (``on_duplicate="replace"``) or are dead-lettered as duplicates pointing at the first."""
        if not source.event_id or good.num_rows == 0:
            return Settled(good)
        ids = good[source.event_id].to_pylist()
        ts = pc.cast(good[source.timestamp], pa.int64()).to_pylist()
        topic = source.kafka_topic
        partitions, offsets = good[PARTITION].to_pylist(), good[OFFSET].to_pylist()
        origins = {p: location(topic, p) for p in set(partitions)}
        seen = self.seen
        keep = np.ones(len(ids), bool)
        unchanged, corrections, refused_at = 0, {}, {}
        for k, (event_id, t, digest) in enumerate(zip(ids, ts, digests.tolist(), strict=True)):
            before = seen.get(event_id)
            here = Seen(origins[partitions[k]], offsets[k], t, digest)
            if before is None:
                seen[event_id] = here
            elif before.digest == digest and before.ts_us == t:
                keep[k] = False
                unchanged += 1
            elif source.on_duplicate == "replace":
                corrections[event_id] = corrections.get(event_id, before.ts_us)
                seen[event_id] = here
            else:
                keep[k] = False
                refused_at[k] = before
        self.trim()
        fresh = good if keep.all() else good.filter(pa.array(keep))
        if not refused_at:
            return Settled(fresh, None, unchanged, corrections)
        rows = sorted(refused_at)
        dupes = good.take(pa.array(rows))
        names = [c.name for c in source.all_columns()]
        records = [json.dumps({k: _text(v) for k, v in row.items()}) for row in dupes.select(names).to_pylist()]
        reasons = [
            f"{source.event_id} {json.dumps(ids[k])} arrived earlier with other values at {refused_at[k].where}, "
            f"{utc_day(refused_at[k].ts_us)} (on_duplicate='quarantine'; declare on_duplicate='replace' to take "
            "re-sent events as corrections)"
            for k in rows
        ]
        bad = pa.table(
            {
                "file": [location(topic, p) for p in dupes[PARTITION].to_pylist()],
                "row_number": dupes[OFFSET],
                "reason_code": ["duplicate_event_id"] * dupes.num_rows,
                "reason": reasons,
                "record": records,
            }
        )
        refused = quarantine_rows(source.name, bad, run_id, dt.datetime.now(dt.UTC))
        return Settled(fresh, refused, unchanged, corrections)


def _text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return str(value).lower() if isinstance(value, bool) else str(value)
