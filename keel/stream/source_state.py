"""One event source's part of the stream state: its buffered events, latest times and lifetime states.

``SourceState`` keeps a columnar log of the source's recent events (keys as entity ids shared by
every source, ``where`` predicates evaluated once by DuckDB on arrival, strings as codes), each
entity's buffer of rows into that log in (time, event id) order, each entity's latest event
time, and the running state of each lifetime feature (``keel.stream.lifetime``). How these
make the stream's values equal the offline ones: ``keel.stream.state``.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from keel.dsl import COLUMN_TYPES, EventSource, Feature
from keel.stream.lifetime import Lifetime
from keel.stream.windows import EMPTY, Events, Runs

_US = 1_000_000
_NO_EVENT = np.iinfo(np.int64).min
_NEVER = np.iinfo(np.int64).max
# The log is compacted once it holds more evicted rows than this and than live ones.
COMPACT_MIN = 1 << 16


class StreamStateError(ValueError):
    """Events or groups the stream state cannot take; the message says why and what to do."""


class SourceState:
    """One source's log of buffered events, per-entity buffers and latest times, and lifetime states."""

    def __init__(self, source: EventSource, feats: list[Feature], entities: Entities):
        self.source = source
        self.entities = entities
        self.schema = pa.schema([f.with_nullable(True) for f in source.arrow_schema()])
        self.columns = list(dict.fromkeys(f.column for f in feats if f.column))
        self.types = {c: source.column(c).type for c in self.columns}
        self.wheres = list(dict.fromkeys(f.where for f in feats if f.where))
        windowed = [f for f in feats if f.window_s is not None]
        self.window_us = max(f.window_s for f in windowed) * _US if windowed else None
        self.window_columns = list(dict.fromkeys(f.column for f in windowed if f.column))
        self.window_wheres = list(dict.fromkeys(f.where for f in windowed if f.where))
        self.has_ids = source.event_id is not None and any(f.agg in ("first", "last") for f in feats)
        self.lifetime: dict[tuple, Lifetime] = {}
        for feat in feats:
            if feat.window_s is None:
                key = (feat.agg, feat.column, feat.where)
                self.lifetime.setdefault(key, Lifetime(feat, self.types.get(feat.column), self.has_ids))
        self.vocabs: dict[str, list[str]] = {c: [] for c in self.window_columns if self.types[c] == "string"}
        self.codes: dict[str, dict[str, int]] = {c: {} for c in self.vocabs}
        self.log = {("ts",): EMPTY.copy()}
        if self.has_ids:
            self.log[("id",)] = np.zeros(0, object)
        for c in self.window_columns:
            self.log[("value", c)] = np.zeros(0, np.float64 if self.types[c] == "float64" else np.int64)
            self.log[("valid", c)] = np.zeros(0, bool)
        for w in self.window_wheres:
            self.log[("where", w)] = np.zeros(0, bool)
        self.rows = self.dead = 0
        self.buffers: list[np.ndarray | None] = []
        self.oldest = EMPTY.copy()  # time of each entity's first buffered event (_NEVER: none)
        self.latest = EMPTY.copy()
        self.pending: list[pa.Table] = []
        self.touched: set[int] = set()

    def validate(self, events) -> pa.Table:
        """The events with the source's columns and declared types, or an error naming what is wrong."""
        name = self.source.name
        if isinstance(events, pa.RecordBatch):
            events = pa.Table.from_batches([events])
        if not isinstance(events, pa.Table):
            raise StreamStateError(
                f"events for source {name!r} are a {type(events).__name__}, not a pyarrow Table; "
                "build one with pa.Table.from_pylist(rows, schema=source.arrow_schema())"
            )
        missing = [f.name for f in self.schema if f.name not in events.column_names]
        if missing:
            raise StreamStateError(
                f"events for source {name!r} lack column(s) {', '.join(missing)} "
                f"(have: {', '.join(events.column_names) or 'none'}); send every column of source.arrow_schema()"
            )
        columns = []
        for field in self.schema:
            col = events.column(field.name)
            if col.type != field.type:
                try:
                    col = col.cast(field.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise StreamStateError(
                        f"events for source {name!r}: column {field.name!r} is {col.type}, which does not cast "
                        f"to the declared {field.type} ({str(exc).splitlines()[0]}); send the declared type"
                    ) from None
            columns.append(col)
        table = pa.Table.from_arrays(columns, schema=self.schema)
        for column in [*self.source.key_columns, self.source.timestamp]:
            nulls = table.column(column).null_count
            if nulls:
                raise StreamStateError(
                    f"events for source {name!r}: {nulls} row(s) have a NULL {column!r}; "
                    "validate events first (such events belong in the dead-letter table)"
                )
        return table

    # Ingest --------------------------------------------------------------------------------

    def ingest(self, table: pa.Table, touch: bool, con: duckdb.DuckDBPyConnection) -> None:
        """Validated events into latest times, lifetime states and buffers (``touch``: report their entities)."""
        if not table.num_rows:
            return
        ids = self.entities.ids(table, self.source.key_columns)
        ts = to_micros(table.column(self.source.timestamp))
        event_ids = table.column(self.source.event_id).to_numpy(zero_copy_only=False) if self.has_ids else None
        order = _order(ids, ts, event_ids)
        ids, ts = ids[order], ts[order]
        if event_ids is not None:
            event_ids = event_ids[order]
        columns, vocabs = {}, {}
        for c in self.columns:
            values, valid, vocabs[c] = _encode(table.column(c), self.types[c])
            columns[c] = (values[order], valid[order])
        wheres = {w: mask[order] for w, mask in self._where_masks(con, table).items()}
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        ends = np.r_[starts[1:], len(ids)]
        ents = ids[starts]
        self._grow(self.entities.count)
        self.latest[ents] = np.maximum(self.latest[ents], ts[ends - 1])
        if self.lifetime:
            events = Events(Runs(ts, ends - starts), columns, wheres, self.types, vocabs, self.has_ids, event_ids)
            for state in self.lifetime.values():
                state.grow(self.entities.count)
                state.fold(ents, events)
        if self.window_us is not None:
            log = {("ts",): ts}
            if self.has_ids:
                log[("id",)] = event_ids
            for c in self.window_columns:
                values, valid = columns[c]
                if c in self.vocabs:
                    values = self._global_codes(c, vocabs[c])[values] if vocabs[c] else values
                log[("value", c)], log[("valid", c)] = values, valid
            for w in self.window_wheres:
                log[("where", w)] = wheres[w]
            self._buffer(ents, starts, ends, self._append(log))
        if touch:
            self.touched.update(ents.tolist())

    def _where_masks(self, con: duckdb.DuckDBPyConnection, table: pa.Table) -> dict[str, np.ndarray]:
        if not self.wheres:
            return {}
        exprs = ", ".join(f'coalesce(CAST(({w}) AS BOOLEAN), false) AS "w{i}"' for i, w in enumerate(self.wheres))
        source_events = table  # noqa: F841 - DuckDB reads it by name (a replacement scan)
        try:
            got = con.execute(f"SELECT {exprs} FROM source_events").fetchnumpy()
        except duckdb.Error as exc:
            raise StreamStateError(
                f"source {self.source.name!r}: a where predicate does not evaluate on these events "
                f"({str(exc).splitlines()[0]}); check the events' values and the predicates "
                f"({'; '.join(self.wheres)})"
            ) from None
        return {w: np.asarray(got[f"w{i}"], bool) for i, w in enumerate(self.wheres)}

    def _global_codes(self, column: str, words: list[str]) -> np.ndarray:
        codes, vocab = self.codes[column], self.vocabs[column]
        out = np.empty(len(words), np.int64)
        for i, word in enumerate(words):
            code = codes.get(word)
            if code is None:
                code = codes[word] = len(vocab)
                vocab.append(word)
            out[i] = code
        return out

    def _append(self, columns: dict) -> np.ndarray:
        """Append rows to the log (capacity doubles); their row numbers."""
        k = len(columns[("ts",)])
        need = self.rows + k
        for key, values in columns.items():
            current = self.log[key]
            if len(current) < need:
                grown = np.empty(max(need, 2 * len(current), 1024), current.dtype)
                grown[: self.rows] = current[: self.rows]
                self.log[key] = current = grown
            current[self.rows : need] = values
        rows = np.arange(self.rows, need)
        self.rows = need
        return rows

    def _buffer(self, ents: np.ndarray, starts: np.ndarray, ends: np.ndarray, rows: np.ndarray) -> None:
        """Each entity's new rows (already in order) into its buffer: appended, or merged if any is late."""
        ts, ids = self.log[("ts",)], self.log.get(("id",))
        late, heads, tails = [], [], []
        for u, a, b in zip(ents.tolist(), starts.tolist(), ends.tolist(), strict=True):
            new, old = rows[a:b], self.buffers[u]
            if old is None:
                self.buffers[u] = new
                continue
            first, last = new[0], old[-1]
            if ts[first] > ts[last] or (ts[first] == ts[last] and (ids is None or ids[first] > ids[last])):
                self.buffers[u] = np.concatenate((old, new))
            else:
                # Only the buffer's tail from the first late event's time on needs merging.
                cut = int(np.searchsorted(ts[old], ts[first], "left"))
                late.append(u)
                heads.append(old[:cut])
                tails.append(np.concatenate((old[cut:], new)))
        if late:
            lengths = [len(t) for t in tails]
            merged = np.concatenate(tails)
            owners = np.repeat(np.array(late), lengths)
            merged = merged[_order(owners, ts[merged], None if ids is None else ids[merged])]
            for u, head, tail in zip(late, heads, np.split(merged, np.cumsum(lengths)[:-1]), strict=True):
                self.buffers[u] = np.concatenate((head, tail))
        self.oldest[ents] = ts[[self.buffers[u][0] for u in ents.tolist()]]

    def _grow(self, size: int) -> None:
        """Room for entity ids below ``size`` (capacity doubles, so new entities cost amortised O(1))."""
        if size > len(self.latest):
            extra = max(size, 2 * len(self.latest), 64) - len(self.latest)
            self.buffers += [None] * extra
            self.oldest = np.r_[self.oldest, np.full(extra, _NEVER)]
            self.latest = np.r_[self.latest, np.full(extra, _NO_EVENT)]

    # Reading and evicting ----------------------------------------------------------------------

    def latest_of(self, eids: np.ndarray) -> np.ndarray:
        self._grow(self.entities.count)
        return self.latest[eids]

    def window_events(self, eids: np.ndarray, t: np.ndarray) -> Events:
        """The probes' entities' buffered events end to end, one run per probe."""
        self._grow(self.entities.count)
        buffers = [EMPTY if self.buffers[u] is None else self.buffers[u] for u in eids.tolist()]
        lengths = np.fromiter(map(len, buffers), np.int64, len(buffers))
        rows = np.concatenate(buffers) if buffers else EMPTY
        log = self.log
        columns = {c: (log[("value", c)][rows], log[("valid", c)][rows]) for c in self.window_columns}
        wheres = {w: log[("where", w)][rows] for w in self.window_wheres}
        return Events(Runs(log[("ts",)][rows], lengths, t), columns, wheres, self.types, self.vocabs, self.has_ids)

    def evict(self, horizon_us: int) -> int:
        """Drop events at or before max(horizon, entity's latest) - the longest window; how many."""
        if self.window_us is None or not len(self.oldest):
            return 0
        cut = np.maximum(self.latest, horizon_us) - self.window_us
        ts, dropped = self.log[("ts",)], 0
        for u in np.flatnonzero(self.oldest <= cut).tolist():
            buffer = self.buffers[u]
            k = int(np.searchsorted(ts[buffer], cut[u], "right"))
            dropped += k
            self.buffers[u] = buffer[k:] if k < len(buffer) else None
            self.oldest[u] = ts[buffer[k]] if k < len(buffer) else _NEVER
        self.dead += dropped
        if self.dead > max(self.rows - self.dead, COMPACT_MIN):
            self._compact()
        return dropped

    def _compact(self) -> None:
        """Rewrite the log with only the rows buffers hold, and the vocabularies with only the words they use."""
        live = np.zeros(self.rows, bool)
        for buffer in self.buffers:
            if buffer is not None:
                live[buffer] = True
        renumber = np.cumsum(live) - 1
        self.log = {key: values[: self.rows][live] for key, values in self.log.items()}
        self.buffers = [None if b is None else renumber[b] for b in self.buffers]
        self.rows, self.dead = int(live.sum()), 0
        for c, vocab in self.vocabs.items():
            values, valid = self.log[("value", c)], self.log[("valid", c)]
            used = np.unique(values[valid])
            recode = np.zeros(max(len(vocab), 1), np.int64)
            recode[used] = np.arange(len(used))
            self.log[("value", c)] = recode[values]
            self.vocabs[c] = [vocab[i] for i in used.tolist()]
            self.codes[c] = {word: i for i, word in enumerate(self.vocabs[c])}


class Entities:
    """Entity keys as dense ids shared by every source: one id per key value (or tuple of key values)."""

    def __init__(self):
        self.index: dict = {}
        self.keys: list = []

    @property
    def count(self) -> int:
        return len(self.keys)

    def ids(self, table: pa.Table, key_columns: list[str]) -> np.ndarray:
        parts = [table.column(k).combine_chunks().dictionary_encode() for k in key_columns]
        if len(parts) == 1:
            keys = parts[0].dictionary.to_pylist()
            inverse = parts[0].indices.to_numpy(zero_copy_only=False)
        else:
            codes = np.stack([p.indices.to_numpy(zero_copy_only=False) for p in parts], 1)
            unique, inverse = np.unique(codes, axis=0, return_inverse=True)
            words = [p.dictionary.to_pylist() for p in parts]
            keys = [tuple(w[c] for w, c in zip(words, row, strict=True)) for row in unique.tolist()]
        out = np.empty(len(keys), np.int64)
        for i, key in enumerate(keys):
            eid = self.index.get(key)
            if eid is None:
                eid = self.index[key] = len(self.keys)
                self.keys.append(key)
            out[i] = eid
        return out[inverse.reshape(-1)]

    def columns(self, eids: np.ndarray, join_keys: dict[str, str]) -> list[pa.Array]:
        keys = [self.keys[i] for i in eids.tolist()]
        if len(join_keys) == 1:
            return [pa.array(keys, COLUMN_TYPES[next(iter(join_keys.values()))])]
        return [pa.array([k[j] for k in keys], COLUMN_TYPES[typ]) for j, typ in enumerate(join_keys.values())]


def _order(owners: np.ndarray, ts: np.ndarray, event_ids: np.ndarray | None) -> np.ndarray:
    """The permutation sorting rows by (entity, time, event id); stable, so without ids arrival order stays.

    Event ids (strings) are only compared among rows that tie on (entity, time).
    """
    order = np.lexsort((ts, owners))
    if event_ids is None or len(order) < 2:
        return order
    o, t = owners[order], ts[order]
    same = (o[1:] == o[:-1]) & (t[1:] == t[:-1])
    if not same.any():
        return order
    tied = np.zeros(len(order), bool)
    tied[1:] |= same
    tied[:-1] |= same
    at = np.flatnonzero(tied)
    keys = pa.table({"e": o[at], "t": t[at], "i": pa.array(event_ids[order[at]], pa.string())})
    by_id = pc.sort_indices(keys, sort_keys=[("e", "ascending"), ("t", "ascending"), ("i", "ascending")])
    order[at] = order[at][by_id.to_numpy()]
    return order


def _encode(column: pa.ChunkedArray, typ: str) -> tuple[np.ndarray, np.ndarray, list | None]:
    """A column as numbers (string codes into the returned words, microseconds, days, 0/1) and its validity."""
    arr = column.combine_chunks()
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    if typ == "string":
        encoded = arr.dictionary_encode()
        codes = pc.fill_null(encoded.indices, 0).to_numpy(zero_copy_only=False).astype(np.int64)
        return codes, valid, encoded.dictionary.to_pylist()
    storage = {"timestamp": pa.int64(), "date": pa.int32(), "bool": pa.int64()}.get(typ)
    if storage is not None:
        arr = arr.cast(storage)
    values = pc.fill_null(arr, pa.scalar(0, arr.type)).to_numpy(zero_copy_only=False)
    return values.astype(np.float64 if typ == "float64" else np.int64, copy=False), valid, None


def to_micros(column: pa.ChunkedArray) -> np.ndarray:
    """A timestamp column as int64 microseconds since the epoch (UTC)."""
    return column.cast(COLUMN_TYPES["timestamp"]).cast(pa.int64()).to_numpy().astype(np.int64, copy=False)
