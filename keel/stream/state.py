"""Online feature values kept fresh from a stream of events, equal to what keel.features.point_in_time computes.

``StreamFeatures(groups)`` answers, after each micro-batch of events, "every feature of each
entity that just had an event, as of its latest event" -- the row the stream worker writes to
the online store. Per event source it keeps (``keel.stream.source_state``):

- each entity's latest event time (the probe time, and the TTL test), never evicted;
- a buffer of each entity's recent events: row numbers into a columnar log of the source (keys
  dictionary-encoded, ``where`` predicates evaluated once by DuckDB on arrival, strings as
  codes), in (time, event id) order; a late event is merged into its place;
- a running state per lifetime aggregation (``keel.stream.lifetime.Lifetime``), folded in on
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
from keel.features.shards import sources_of
from keel.stream.source_state import Entities, SourceState, StreamStateError, to_micros
from keel.stream.windows import to_arrow, window_feature

LATENESS = dt.timedelta(days=1)
_US = 1_000_000
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


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
        self._entities = Entities()
        self._floors: dict[int, int] = {}  # entity id -> earliest moment (us) ``updates`` reports it as of
        feats: dict[str, list[Feature]] = {name: [] for name in self._needs}
        for group in closure:
            if group.source is not None:
                feats[group.source.name] += [f for f in group.features if isinstance(f, Feature)]
        self._sources = {
            name: SourceState(source, feats[name], self._entities) for name, (source, _) in self._needs.items()
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
            for eid, at in zip(eids.tolist(), to_micros(pa.chunked_array([not_before])).tolist(), strict=True):
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

    def _state(self, source_name: str) -> SourceState:
        state = self._sources.get(source_name)
        if state is None:
            known = ", ".join(self._sources) or "none"
            raise StreamStateError(
                f"source {source_name!r} is not read by the groups {', '.join(g.name for g in self.groups) or '(none)'} "
                f"(sources read: {known}); send only events of those (see .sources)"
            )
        return state


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


def _from_numpy(values: np.ndarray, typ: str) -> pa.Array:
    """A DuckDB NumPy result column (masked where NULL; timestamps and dates as datetime64[us]) as Arrow ``typ``."""
    data, null = np.ma.getdata(values), np.ma.getmaskarray(values)
    if typ == "string":
        return pa.array(np.where(null, None, data), pa.string())
    if typ in ("timestamp", "date"):
        micros = data.astype("datetime64[us]").view(np.int64)
        data = micros // (86_400 * _US) if typ == "date" else micros
    return to_arrow(data, null, typ, None)


def _micros_of(moment: dt.datetime) -> int:
    return (moment - _EPOCH) // dt.timedelta(microseconds=1)
