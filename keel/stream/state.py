"""Online feature values kept fresh from a stream of events, equal to what keel.features.point_in_time computes.

``StreamFeatures(groups)`` answers, after each micro-batch of events, "every feature of each
entity that just had an event, as of its latest event" -- the row the stream worker writes to
the online store. Per event source it keeps:

- each entity's latest event time (the probe time, and the TTL test), never evicted;
- a buffer of each entity's recent events: row numbers into a columnar log of the source (keys
  dictionary-encoded, ``where`` predicates evaluated once by DuckDB on arrival, strings as
  codes), in (time, event id) order; a late event is merged into its place;
- a running state per lifetime aggregation (``keel.stream.windows.Lifetime``), folded in on
  arrival, whatever the order.

``add`` queues validated events; ``updates`` ingests the queue, then computes each group's
features for the entities touched since the last call, all of them at once: their buffered
events are laid end to end and every aggregation is a few whole-array NumPy passes
(``keel.stream.windows``); derived features are one DuckDB query per group.

Why each row equals ``keel.features.point_in_time.point_in_time`` at (entity, t = its latest event):

- A probe is never before any event of its entity (t is the latest over the group's sources,
  and latest times only grow), so ``(t - w, t]`` is a suffix of the entity's buffer and
  lifetime is everything. The kernels apply the offline contract to it: half-open windows,
  ``where`` NULL as FALSE, NULL values skipped, ``count`` vs ``count(column)``, sample stddev,
  ties ordered by event id (or, without ids, by the value), with the same double-double
  arithmetic, so floats agree to rounding.
- ``evict(now)`` drops an entity's event only when it lies at or before
  ``max(now - lateness, entity's latest) - longest window``: no later probe's window reaches it,
  provided events arrive no later than ``lateness`` (default one day) behind ``now``. An event
  later than that still counts in lifetime features and, where its entity's buffer still
  covers its windows, everywhere else; values of an entity whose probe time falls before
  ``now - lateness`` may miss evicted events.
- TTL compares t with the entity's latest event in the group's source; an entity never seen
  is missing. Masking (NULL, counts 0) comes before derived features, which DuckDB evaluates
  from the same SQL as keel.features.point_in_time: in declaration order within a group, and for a group
  reading upstream groups, over ``upstream_group.feature`` of each upstream computed at the
  same probes.

Costs: ingest is vectorised per batch, with one Python step per touched entity (appending its
rows to its buffer); ``updates`` reads the touched entities' buffers, not the whole state.
Memory: events within the longest window plus the lateness allowance, a few numbers per
entity, and the values of lifetime ``count_distinct``. One thread owns an instance.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from keel.dsl import COLUMN_TYPES, DUCKDB_TYPES, Derived, EventSource, Feature, FeatureGroup, window_seconds
from keel.features.training_sets import sources_of
from keel.stream.windows import EMPTY, Events, Lifetime, Runs, to_arrow, window_feature

LATENESS = dt.timedelta(days=1)
_US = 1_000_000
_NO_EVENT = np.iinfo(np.int64).min
_NEVER = np.iinfo(np.int64).max
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# The log is compacted once it holds more evicted rows than this and than live ones.
_COMPACT_MIN = 1 << 16


class StreamStateError(ValueError):
    """Events or groups the stream state cannot take; the message says why and what to do."""


class StreamFeatures:
    """Online groups' features, incrementally, for the entities each micro-batch touches.

    ``groups``: resolved FeatureGroup objects (source groups and groups reading upstream
    groups); upstream groups not listed are computed internally but not returned.
    ``lateness``: how far behind ``now`` (see ``evict``) an event may still arrive and be exact.
    """

    def __init__(self, groups: Iterable[FeatureGroup], *, lateness: dt.timedelta = LATENESS):
        self.groups = tuple(groups)
        if not isinstance(lateness, dt.timedelta) or lateness < dt.timedelta(0):
            raise StreamStateError(f"lateness={lateness!r} is not a duration (use e.g. datetime.timedelta(days=1))")
        self.lateness = lateness
        closure = _closure(self.groups)
        self._group = {g.name: g for g in closure}
        self._needs = sources_of(closure)
        self._entities = _Entities()
        self._floors: dict[int, int] = {}  # entity id -> earliest moment (us) ``updates`` reports it as of
        feats: dict[str, list[Feature]] = {name: [] for name in self._needs}
        for group in closure:
            if group.source is not None:
                feats[group.source.name] += [f for f in group.features if isinstance(f, Feature)]
        self._sources = {
            name: _SourceState(source, feats[name], self._entities) for name, (source, _) in self._needs.items()
        }
        self._under = {g.name: _source_groups(g) for g in closure}
        self._reads = {g.name: sorted({s.source.name for s in self._under[g.name]}) for g in closure}
        self._con = duckdb.connect()
        self._con.execute("SET TimeZone = 'UTC'")
        self._con.execute("SET threads = 1")  # statements here are small; the worker scales by processes
        self._con.execute("SET preserve_insertion_order = true")  # results are read back in probe order

    # Inputs ------------------------------------------------------------------------------

    @property
    def sources(self) -> dict[str, EventSource]:
        """Every source whose events the groups read (through upstream groups too)."""
        return {name: state.source for name, state in self._sources.items()}

    def lookback(self, source_name: str) -> dt.timedelta | None:
        """How much of the source's history ``warm`` needs (None: all of it), as keel.store reads it."""
        return self._needs[self._state(source_name).source.name][1]

    def warm(self, source_name: str, events: pa.Table) -> None:
        """Load history (raw table rows of the source); entities warmed are not reported by ``updates``."""
        state = self._state(source_name)
        state.ingest(state.validate(events), touch=False, con=self._con)

    def touch(self, source_name: str, keys: pa.Table, not_before: pa.Array | None = None) -> None:
        """Report these entities (the source's key columns) in the next ``updates``: their values
        changed under them (a corrected event, rebuilt into the state by ``warm``).

        ``not_before`` (timestamps, one per row) is the earliest moment to report each one as of:
        a correction that moved an entity's latest event earlier is still reported as of the
        moment the online store last heard of it, which never takes an older value.
        """
        state = self._state(source_name)
        eids = state.entities.ids(keys, state.source.key_columns)
        state.touched.update(eids.tolist())
        if not_before is not None:
            for eid, at in zip(eids.tolist(), _micros(pa.chunked_array([not_before])).tolist(), strict=True):
                self._floors[eid] = max(at, self._floors.get(eid, at))

    def add(self, source_name: str, events: pa.Table) -> None:
        """Queue new events (the source's columns), in any order, late ones too; their entities are touched."""
        state = self._state(source_name)
        state.pending.append(state.validate(events))

    def evict(self, now: dt.datetime) -> int:
        """Drop buffered events no window can need for probes at or after ``now - lateness``; returns how many."""
        if not isinstance(now, dt.datetime) or now.tzinfo is None:
            raise StreamStateError(
                f"evict(now={now!r}): give a timezone-aware datetime, e.g. datetime.datetime.now(datetime.UTC)"
            )
        horizon = _micros_of(now) - self.lateness // dt.timedelta(microseconds=1)
        return sum(state.evict(horizon) for state in self._sources.values())

    @property
    def buffered(self) -> dict[str, int]:
        """Events held in buffers per source (what ``evict`` bounds)."""
        return {name: state.rows - state.dead for name, state in self._sources.items()}

    # Values --------------------------------------------------------------------------------

    def updates(self) -> dict[str, pa.Table]:
        """Per listed group with entities touched since the last call: one row per such entity.

        Columns are ``group.arrow_schema()``: keys, ``feature_ts`` (the entity's latest event
        among the group's sources, the moment the values hold for) and the features.
        """
        for state in self._sources.values():
            if state.pending:
                batch, state.pending = pa.concat_tables(state.pending), []
                state.ingest(batch, touch=True, con=self._con)
        touched = {name: state.touched for name, state in self._sources.items()}
        for state in self._sources.values():
            state.touched = set()
        probes = {}
        for group in self.groups:
            ents = set().union(*(touched[name] for name in self._reads[group.name]))
            if ents:
                eids = np.fromiter(sorted(ents), np.int64, len(ents))
                t = np.max([self._sources[name].latest_of(eids) for name in self._reads[group.name]], axis=0)
                if self._floors:
                    floor = np.fromiter(
                        (self._floors.get(e, t_) for e, t_ in zip(eids.tolist(), t.tolist(), strict=True)),
                        np.int64,
                        len(eids),
                    )
                    t = np.maximum(t, floor)
                probes[group.name] = (eids, t)
        self._floors = {}
        tables = self._source_group_values(probes)
        memo: dict = {}
        return {
            g.name: self._rows(g, *probes[g.name], self._values(g, g.name, tables, memo))
            for g in self.groups
            if g.name in probes
        }

    def _source_group_values(self, probes: dict) -> dict:
        """Each source group's features at every probe any listed group needs, each (entity, t) once."""
        requests: dict[str, list] = {}
        for consumer, (eids, t) in probes.items():
            for group in self._under[consumer]:
                requests.setdefault(group.name, []).append((consumer, eids, t))
        tables = {}
        for name, wanted in requests.items():
            group = self._group[name]
            if len(wanted) == 1:
                consumer, eids, t = wanted[0]
                tables[(name, consumer)] = self._source_group(group, eids, t)
                continue
            pairs = np.stack([np.concatenate([w[1] for w in wanted]), np.concatenate([w[2] for w in wanted])], 1)
            unique, inverse = np.unique(pairs, axis=0, return_inverse=True)
            inverse = inverse.reshape(-1)
            table = self._source_group(group, np.ascontiguousarray(unique[:, 0]), np.ascontiguousarray(unique[:, 1]))
            offset = 0
            for consumer, eids, _ in wanted:
                tables[(name, consumer)] = table.take(pa.array(inverse[offset : offset + len(eids)]))
                offset += len(eids)
        return tables

    def _source_group(self, group: FeatureGroup, eids: np.ndarray, t: np.ndarray) -> pa.Table:
        """A source group's features (declaration order) at probes (entity ids, t >= their latest event)."""
        state = self._sources[group.source.name]
        own = [f for f in group.features if isinstance(f, Feature)]
        events = state.window_events(eids, t) if any(f.window_s is not None for f in own) else None
        columns = {}
        for feat in own:
            typ = group.feature_type(feat)
            try:
                if feat.window_s is None:
                    columns[feat.name] = state.lifetime[(feat.agg, feat.column, feat.where)].values(eids, typ)
                else:
                    columns[feat.name] = window_feature(events, feat, typ)
            except ValueError as exc:
                raise StreamStateError(f"feature group {group.name!r}: {exc}") from None
        if group.ttl is not None:
            alive = state.latest_of(eids) >= t - window_seconds(group.ttl) * _US
            if not alive.all():
                for feat in own:
                    values = columns[feat.name]
                    if feat.agg in ("count", "count_distinct"):
                        columns[feat.name] = pa.array(np.where(alive, values.to_numpy(), 0), pa.int64())
                    else:
                        columns[feat.name] = pc.if_else(pa.array(alive), values, pa.nulls(len(values), values.type))
        derived = [f for f in group.features if isinstance(f, Derived)]
        if not derived:
            return pa.table(columns)
        # Each derived feature over the ones before it, the relation aliased as the group (so
        # expressions may also say group.feature): keel.features.point_in_time's projections, as one statement.
        query = "feature_values"
        for feat in derived:
            query = f'(SELECT *, CAST(({feat.expr}) AS {DUCKDB_TYPES[feat.type]}) AS "{feat.name}" FROM {query} AS "{group.name}")'
        names = ", ".join(f'"{f.name}"' for f in derived)
        columns.update(self._derived(group, derived, f"SELECT {names} FROM {query} AS _v", pa.table(columns)))
        return pa.table({f.name: columns[f.name] for f in group.features})

    def _values(self, group: FeatureGroup, consumer: str, tables: dict, memo: dict) -> pa.Table:
        """``group``'s features at ``consumer``'s probes, in probe order."""
        key = (group.name, consumer)
        if key not in memo:
            if group.source is not None:
                memo[key] = tables[key]
            else:
                # Each upstream group's features as a relation aliased by its name, rows side by side
                # (every part is at the same probes, in the same order): keel.features.point_in_time's join on the probe.
                columns, sides = {}, []
                for i, up in enumerate(group.upstream):
                    part = self._values(up, consumer, tables, memo)
                    names = []
                    for name in part.column_names:
                        columns[f"u{i}_{name}"] = part.column(name)
                        names.append(f'"u{i}_{name}" AS "{name}"')
                    sides.append(f'(SELECT {", ".join(names)} FROM feature_values) AS "{up.name}"')
                exprs = ", ".join(f'CAST(({f.expr}) AS {DUCKDB_TYPES[f.type]}) AS "{f.name}"' for f in group.features)
                sql = f"SELECT {exprs} FROM {' POSITIONAL JOIN '.join(sides)}"
                memo[key] = pa.table(self._derived(group, group.features, sql, pa.table(columns)))
        return memo[key]

    def _derived(self, group: FeatureGroup, feats, sql: str, feature_values: pa.Table) -> dict[str, pa.Array]:
        """Run ``sql``, which reads ``feature_values`` by name, and return its ``feats`` columns in row order.

        DuckDB keeps insertion order without ORDER BY. A NumPy result skips the relation layer
        and its Arrow conversion, most of what a statement this small costs.
        """
        try:
            got = self._con.execute(sql).fetchnumpy()
        except duckdb.Error as exc:
            raise _derived_error(group, exc) from None
        return {f.name: _from_numpy(got[f.name], f.type) for f in feats}

    def _rows(self, group: FeatureGroup, eids: np.ndarray, t: np.ndarray, values: pa.Table) -> pa.Table:
        schema = group.arrow_schema()
        arrays = self._entities.columns(eids, group.entity.join_keys)
        arrays.append(pa.array(t, pa.int64()).cast(COLUMN_TYPES["timestamp"]))
        for field in list(schema)[len(arrays) :]:
            arrays.append(values.column(field.name).combine_chunks().cast(field.type))
        return pa.Table.from_arrays(arrays, schema=schema)

    def _state(self, source_name: str) -> _SourceState:
        state = self._sources.get(source_name)
        if state is None:
            known = ", ".join(self._sources) or "none"
            raise StreamStateError(
                f"source {source_name!r} is not read by the groups {', '.join(g.name for g in self.groups) or '(none)'} "
                f"(sources read: {known}); send only events of those (see .sources)"
            )
        return state


class _SourceState:
    """One source's log of buffered events, per-entity buffers and latest times, and lifetime states."""

    def __init__(self, source: EventSource, feats: list[Feature], entities: _Entities):
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
        ts = _micros(table.column(self.source.timestamp))
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
        if self.dead > max(self.rows - self.dead, _COMPACT_MIN):
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


class _Entities:
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


# Helpers ---------------------------------------------------------------------------------


def _closure(groups: tuple[FeatureGroup, ...]) -> list[FeatureGroup]:
    """The groups and every group they read, upstream first."""
    out: dict[str, FeatureGroup] = {}

    def visit(group) -> None:
        if not isinstance(group, FeatureGroup):
            raise StreamStateError(
                f"{group!r} is not a FeatureGroup; pass resolved groups "
                "(e.g. [g for g in load_project(...).feature_groups if g.online])"
            )
        if group.name in out:
            return
        for up in group.upstream:
            if not isinstance(up, FeatureGroup):
                raise StreamStateError(
                    f"feature group {group.name!r}: upstream {up!r} is a name, not a group; "
                    "load the project (keel.project) so upstream names resolve to FeatureGroup objects"
                )
            visit(up)
        out[group.name] = group

    for group in groups:
        visit(group)
    return list(out.values())


def _source_groups(group: FeatureGroup) -> list[FeatureGroup]:
    """The groups with a source that ``group`` is computed from (itself, if it has one)."""
    if group.source is not None:
        return [group]
    found = {g.name: g for up in group.upstream for g in _source_groups(up)}
    return list(found.values())


def _derived_error(group: FeatureGroup, exc: duckdb.Error) -> StreamStateError:
    return StreamStateError(
        f"feature group {group.name!r}: derived features do not evaluate ({str(exc).splitlines()[0]}); "
        "name the group's own features, or upstream features as group.feature"
    )


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


def _from_numpy(values: np.ndarray, typ: str) -> pa.Array:
    """A DuckDB NumPy result column (masked where NULL; timestamps and dates as datetime64[us]) as Arrow ``typ``."""
    data, null = np.ma.getdata(values), np.ma.getmaskarray(values)
    if typ == "string":
        return pa.array(np.where(null, None, data), pa.string())
    if typ in ("timestamp", "date"):
        micros = data.astype("datetime64[us]").view(np.int64)
        data = micros // (86_400 * _US) if typ == "date" else micros
    return to_arrow(data, null, typ, None)


def _micros(column: pa.ChunkedArray) -> np.ndarray:
    return column.cast(COLUMN_TYPES["timestamp"]).cast(pa.int64()).to_numpy().astype(np.int64, copy=False)


def _micros_of(moment: dt.datetime) -> int:
    return (moment - _EPOCH) // dt.timedelta(microseconds=1)
