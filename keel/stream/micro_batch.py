"""A topic's micro-batch: what it holds until it is appended, and its append to Iceberg exactly once.

The worker's writer thread appends each batch with the partitions' next offsets in the same
Iceberg commit (``keel.stream.kafka_io.append_exactly_once``), its dead letters first; a
corrected event's old copy leaves the raw table in that commit.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from keel.dsl import EventSource
from keel.lakehouse.tables import Lakehouse
from keel.stream.kafka_io import OFFSET, PARTITION, AppendResult, append_exactly_once, write_dead_letters
from keel.stream.resent import utc_day


@dataclass
class Pending:
    """What one topic's micro-batch holds until it is appended."""

    good: list[pa.Table] = field(default_factory=list)
    bad: list[pa.Table] = field(default_factory=list)
    rows: int = 0
    next_offsets: dict[int, int] = field(default_factory=dict)
    first_offsets: dict[int, int] = field(default_factory=dict)
    # Corrected events (on_duplicate="replace"): event id -> the microsecond timestamp of the copy they replace.
    corrections: dict[str, int] = field(default_factory=dict)

    def empty(self) -> bool:
        return not self.next_offsets


def append_pending(
    lake: Lakehouse, source: EventSource, pending: Pending, run_id: str
) -> tuple[AppendResult, pa.Table | None]:
    """Append one topic's batch with its offsets in the same Iceberg commit (dead letters first).

    Returns the append's result and the keys of the entities corrections changed, with
    ``_replaced_ts`` the timestamp of the copy each replaced (None: no corrections)."""
    if pending.bad:
        bad = pa.concat_tables(pending.bad)
        spans = {p: (pending.first_offsets[p], pending.next_offsets[p] - 1) for p in pending.next_offsets}
        write_dead_letters(lake, source, bad, spans, run_id)
    good = pa.concat_tables(pending.good) if pending.good else _empty(source)
    removals = corrected = None
    if pending.corrections:
        good = _last_of_each(good, source.event_id, set(pending.corrections))
        removals = {}
        for event_id, ts_us in sorted(pending.corrections.items()):
            removals.setdefault(dt.date.fromisoformat(utc_day(ts_us)), []).append(event_id)
        fixed = good.filter(pc.is_in(good[source.event_id], pa.array(list(pending.corrections))))
        replaced_at = [pending.corrections[i] for i in fixed[source.event_id].to_pylist()]
        corrected = fixed.select(source.key_columns).append_column(
            "_replaced_ts", pc.cast(pa.array(replaced_at, pa.int64()), pa.timestamp("us", tz="UTC"))
        )
    result = append_exactly_once(lake, source, good, pending.next_offsets, run_id, removals=removals)
    return result, corrected


def _last_of_each(events: pa.Table, column: str, ids: set[str]) -> pa.Table:
    """``events`` with only the last occurrence (in arrival order) of each of ``ids``: a correction
    whose earlier copy is still in the same micro-batch replaces it there."""
    keep = np.ones(events.num_rows, bool)
    met: set[str] = set()
    values = events[column].to_pylist()
    for k in range(len(values) - 1, -1, -1):
        if values[k] in ids:
            if values[k] in met:
                keep[k] = False
            met.add(values[k])
    return events if keep.all() else events.filter(pa.array(keep))


def _empty(source: EventSource) -> pa.Table:
    table = source.arrow_schema().empty_table()
    return table.append_column(PARTITION, pa.array([], pa.int32())).append_column(OFFSET, pa.array([], pa.int64()))
