"""Training sets: point-in-time feature values for a spine of (entity, time) rows, read from the lakehouse.

``OfflineStore.get_training_set(spine, features=[...])`` (and so ``FeatureStore``'s) returns one row per
spine row, in spine order, each feature's value exactly as computable at the row's
timestamp (the contract of ``keel.features.point_in_time``). Only the raw partitions the windows and TTLs
need are read, and the snapshot ids read are recorded so ``as_of=`` reproduces the set.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from keel.compute import Compute, ShardReport
from keel.config import Settings
from keel.dsl import COLUMN_TYPES, DeclarationError, FeatureGroup
from keel.features.shards import EventRead, event_read, sources_of, training_values
from keel.lakehouse.tables import Lakehouse
from keel.project import Project, load_project

SPINE_FORMATS = (".parquet", ".csv", ".jsonl", ".json")


class TrainingSetError(ValueError):
    """The spine or the feature list cannot make a training set; the message says how to fix it."""


@dataclass
class TrainingSet:
    """The rows, and what they were computed from (enough to compute them again)."""

    table: pa.Table
    features: list[str]
    snapshots: dict[str, int | None] = field(default_factory=dict)
    groups: dict[str, dict] = field(default_factory=dict)
    shards: ShardReport | None = None

    def coverage(self) -> dict[str, float]:
        """Share of rows with a non-NULL value, per feature."""
        n = self.table.num_rows
        return {f: (n - self.table.column(f).null_count) / n if n else 0.0 for f in self.features}

    def metadata(self) -> dict:
        return {"features": self.features, "snapshots": self.snapshots, "groups": self.groups}

    def digest(self) -> str:
        """A SHA-256 of the rows' values, column names and types, independent of how the
        table is chunked: two sets with the same digest hold the same rows in the same order."""
        return table_digest(self.table)


def table_digest(table: pa.Table) -> str:
    import pandas as pd

    digest = hashlib.sha256()
    for name, column in zip(table.column_names, table.columns, strict=True):
        digest.update(f"{name}:{column.type}\n".encode())
        digest.update(pc.is_null(column).to_numpy(zero_copy_only=False).tobytes())
        values = pd.util.hash_pandas_object(column.to_pandas(), index=False)
        digest.update(values.to_numpy().tobytes())
    return digest.hexdigest()


def read_spine(spine, timestamp: str, key_types: Mapping[str, str] | None = None) -> pa.Table:
    """A spine given as pandas, Arrow or a file path, as an Arrow table with a UTC timestamp.

    ``key_types`` (entity key -> declared type) keeps a CSV's keys as declared ("007" stays a string).
    """
    if isinstance(spine, str | Path):
        path = Path(spine)
        if not path.exists():
            raise TrainingSetError(f"spine file {str(path)!r} does not exist")
        suffix = path.suffix.lower()
        if suffix not in SPINE_FORMATS:
            raise TrainingSetError(f"spine file {str(path)!r}: use one of {', '.join(SPINE_FORMATS)}")
        rel = duckdb.sql(
            f"SELECT * FROM read_parquet('{path}')"
            if suffix == ".parquet"
            else f"SELECT * FROM read_csv('{path}', header=true, types={_duck_types(key_types)})"
            if suffix == ".csv"
            else f"SELECT * FROM read_json('{path}', format='newline_delimited')"
        )
        table = rel.to_arrow_table()
    elif isinstance(spine, pa.Table):
        table = spine
    elif hasattr(spine, "iloc"):
        # DuckDB reads pandas without the zone-dropping conversion pyarrow's from_pandas warns about.
        con = duckdb.connect()
        con.execute("SET TimeZone = 'UTC'")
        table = con.from_df(spine).to_arrow_table()
        con.close()
    elif hasattr(spine, "to_arrow"):
        table = spine.to_arrow()
    else:
        raise TrainingSetError(
            f"spine of type {type(spine).__name__} is not a table (give pandas, Arrow or a file path)"
        )
    if timestamp not in table.column_names:
        raise TrainingSetError(
            f"spine has no timestamp column {timestamp!r} (columns: {', '.join(table.column_names)}); "
            "pass timestamp=<column>"
        )
    ts = table.column(timestamp)
    if pa.types.is_string(ts.type) or pa.types.is_large_string(ts.type):
        con = duckdb.connect()
        con.execute("SET TimeZone = 'UTC'")
        con.register("spine_ts", pa.table({"t": ts}))
        ts = con.sql("SELECT TRY_CAST(t AS TIMESTAMPTZ) AS t FROM spine_ts").to_arrow_table().column("t")
        con.close()
    if pa.types.is_date(ts.type):
        ts = pc.cast(ts, pa.timestamp("us"))
    if not pa.types.is_timestamp(ts.type):
        raise TrainingSetError(f"spine column {timestamp!r} is {ts.type}, not a timestamp")
    if ts.type.tz is None:
        ts = pc.assume_timezone(ts, "UTC")
    ts = pc.cast(ts, pa.timestamp("us", tz="UTC"))
    if ts.null_count:
        raise TrainingSetError(f"spine column {timestamp!r} has {ts.null_count} NULL or unparsable timestamps")
    return table.set_column(table.schema.get_field_index(timestamp), timestamp, ts)


def _duck_types(key_types: Mapping[str, str] | None) -> str:
    duck = {"string": "VARCHAR", "int64": "BIGINT"}
    return "{" + ", ".join(f"'{k}': '{duck[t]}'" for k, t in (key_types or {}).items()) + "}"


class OfflineStore:
    """Training sets and feature tables of one project over one lakehouse."""

    def __init__(self, lake: Lakehouse, project: Project, *, settings: Settings | None = None) -> None:
        self.lake = lake
        self.project = project
        self.settings = settings
        self.compute = Compute(settings.compute if settings else None)
        self.shards = settings.shards if settings else None
        self.max_memory = settings.max_memory if settings else None

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        return cls(Lakehouse.from_settings(settings), load_project(settings.project), settings=settings)

    @classmethod
    def from_env(cls) -> Self:
        return cls.from_settings(Settings.from_env())

    # Feature names -------------------------------------------------------------------

    def resolve(self, features: Sequence[str]) -> list[tuple[FeatureGroup, str]]:
        """``group.feature`` or an unambiguous bare ``feature`` -> (group, feature name)."""
        if isinstance(features, str):
            features = [f.strip() for f in features.split(",") if f.strip()]
        if not features:
            raise TrainingSetError("no features requested (give e.g. features=['user_transactions.txn_count_7d'])")
        out, seen = [], set()
        for ref in features:
            if "." in ref:
                group_name, name = ref.split(".", 1)
                try:
                    group = self.project.group(group_name)
                    group.feature(name)
                except DeclarationError as exc:
                    raise TrainingSetError(str(exc)) from None
            else:
                owners = [g for g in self.project.feature_groups if any(f.name == ref for f in g.features)]
                if not owners:
                    raise TrainingSetError(
                        f"feature {ref!r} is not declared in any feature group (`keel features list` shows them)"
                    )
                if len(owners) > 1:
                    raise TrainingSetError(
                        f"feature {ref!r} is in several groups ({', '.join(g.name for g in owners)}); "
                        "write it as group.feature"
                    )
                group, name = owners[0], ref
            if name in seen:
                raise TrainingSetError(
                    f"feature name {name!r} is requested twice; each output column needs a unique name"
                )
            seen.add(name)
            out.append((group, name))
        return out

    # Training sets -------------------------------------------------------------------

    def get_training_set(
        self,
        spine,
        features: Sequence[str],
        *,
        timestamp: str = "event_ts",
        as_of: Mapping[str, int] | TrainingSet | None = None,
        shards: int | None = None,
    ) -> TrainingSet:
        """Each spine row with every feature's value as computable at the row's timestamp.

        ``as_of``: the ``snapshots`` of an earlier training set (or the set itself); the raw
        tables are then read at those snapshots, so the same spine gives the same rows.
        ``shards``: entity shards to compute in (``keel.features.shards``; default: the store's
        ``KEEL_SHARDS``, else as many as the memory budget needs); the rows are the same either way.
        """
        wanted = self.resolve(features)
        groups = list(dict.fromkeys(g for g, _ in wanted))
        table = read_spine(spine, timestamp, groups[0].entity.join_keys)
        keys = groups[0].key_columns
        for group in groups:
            if group.key_columns != keys:
                raise TrainingSetError(
                    f"features of entity {groups[0].entity.name!r} and {group.entity.name!r} cannot share one spine; "
                    "build one training set per entity"
                )
        missing = [k for k in keys if k not in table.column_names]
        if missing:
            raise TrainingSetError(
                f"spine lacks the entity key column(s) {', '.join(missing)} of {groups[0].entity.name!r} "
                f"(columns: {', '.join(table.column_names)})"
            )
        pinned = dict(as_of.snapshots if isinstance(as_of, TrainingSet) else as_of or {})
        probes = pa.table(
            {
                **{k: pc.cast(table.column(k), COLUMN_TYPES[groups[0].entity.join_keys[k]]) for k in keys},
                "_t": table.column(timestamp),
                "_probe": pa.array(range(table.num_rows), pa.int64()),
            }
        )
        reads, snapshots = self.event_reads(groups, probes.column("_t"), pinned)
        values, report = training_values(self, wanted, probes, reads, shards)
        out = table
        for name in [n for _, n in wanted]:
            if name in out.column_names:
                raise TrainingSetError(f"spine already has a column {name!r}; rename it or the feature")
            out = out.append_column(name, values.column(name))
        return TrainingSet(
            table=out,
            features=[n for _, n in wanted],
            snapshots=snapshots,
            groups={g.name: {"version": g.version, "fingerprint": g.fingerprint()} for g in groups},
            shards=report,
        )

    def event_reads(
        self, groups: list[FeatureGroup], times: pa.ChunkedArray, pinned: dict
    ) -> tuple[list[EventRead], dict[str, int | None]]:
        """What each needed source must be read at (only the partitions needed), and the snapshots."""
        first, last = pc.min(times).as_py(), pc.max(times).as_py()
        reads, snapshots = [], {}
        for name, (source, need) in sources_of(groups).items():
            table_name = source.table_name
            if not self.lake.exists(table_name):
                raise TrainingSetError(
                    f"source table {table_name!r} does not exist yet; ingest it first (keel ingest FILE --source {name})"
                )
            if pinned and table_name not in pinned:
                raise TrainingSetError(f"as_of has no snapshot for {table_name!r} (it has: {', '.join(pinned)})")
            snapshot = pinned.get(table_name) if pinned else self.lake.head(table_name)
            reads.append(event_read(source, snapshot, None if need is None else first - need, last))
            snapshots[table_name] = snapshot
        return reads, snapshots
