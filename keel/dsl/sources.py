"""Declarations of the data that arrives: entities, event sources and their columns."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import pyarrow as pa

from keel.dsl.primitives import COLUMN_TYPES, DeclarationError, check_name, window_seconds


@dataclass(frozen=True)
class Column:
    """One payload column of an event source, with the range its values must stay in."""

    name: str
    type: str
    nullable: bool = True
    min: float | None = None
    max: float | None = None
    allowed: tuple[str, ...] | None = None
    description: str = ""
    # NaN and +-infinity are quarantined (reason non_finite) unless the column says they mean something.
    allow_non_finite: bool = False

    def __post_init__(self) -> None:
        check_name("column", self.name)
        if self.type not in COLUMN_TYPES:
            raise DeclarationError(
                f"column {self.name!r}: type {self.type!r} is not supported (use one of {', '.join(COLUMN_TYPES)})"
            )
        if self.allowed is not None and self.type != "string":
            raise DeclarationError(
                f"column {self.name!r}: 'allowed' values only apply to string columns, not {self.type!r}"
            )
        if (self.min is not None or self.max is not None) and self.type not in ("int64", "float64"):
            raise DeclarationError(f"column {self.name!r}: min/max only apply to numeric columns, not {self.type!r}")
        if self.allow_non_finite and self.type != "float64":
            raise DeclarationError(
                f"column {self.name!r}: allow_non_finite applies to float64 columns only, not {self.type!r} (remove it)"
            )

    @property
    def arrow_type(self) -> pa.DataType:
        return COLUMN_TYPES[self.type]


@dataclass(frozen=True)
class Entity:
    """A thing features describe, identified by one or more join keys (name -> type)."""

    name: str
    join_keys: dict[str, str]
    description: str = ""

    def __post_init__(self) -> None:
        check_name("entity", self.name)
        if not self.join_keys:
            raise DeclarationError(
                f"entity {self.name!r}: needs at least one join key, e.g. join_keys={{'user_id': 'string'}}"
            )
        for key, typ in self.join_keys.items():
            check_name(f"entity {self.name!r} join key", key)
            if typ not in ("string", "int64"):
                raise DeclarationError(
                    f"entity {self.name!r}: join key {key!r} has type {typ!r} (use 'string' or 'int64')"
                )

    def __hash__(self) -> int:
        return hash(self.name)


# What an event id arriving again with other values does (EventSource.on_duplicate).
ON_DUPLICATE = ("replace", "quarantine")


@dataclass(frozen=True)
class EventSource:
    """A stream of events about an entity, landed into one raw Iceberg table.

    Every event carries the entity's join keys, a UTC timestamp and, where the producer
    assigns one, a unique event id; the remaining columns are the payload.
    """

    name: str
    entity: Entity
    columns: tuple[Column, ...]
    timestamp: str = "event_ts"
    event_id: str | None = "event_id"
    kafka_topic: str | None = None
    description: str = ""
    owner: str = ""
    namespace: str = "raw"
    # How far an event's timestamp may lie after the moment it is ingested.
    max_future_skew_s: int = 3600
    tags: dict[str, str] = field(default_factory=dict)
    # An event id arriving again with other values or another timestamp: "replace" takes it as a
    # correction (the old row leaves its day in the same commit), "quarantine" refuses it as a
    # duplicate. Arriving again unchanged, it is counted and changes nothing either way.
    on_duplicate: str = "replace"
    # How far before and after an ingest's events an earlier copy of an id is looked for ("365d"):
    # a copy beyond it is not found. None looks through the whole table, which an ingest then
    # scans (ids and timestamps only).
    duplicates_within: str | None = None
    # Events timed before this day are quarantined (bad_timestamp): a year-1 or 1970 timestamp is
    # a producer's placeholder, not an event, and would open a partition decades before the rest.
    earliest: dt.date = dt.date(2000, 1, 1)

    def __post_init__(self) -> None:
        check_name("event source", self.name)
        object.__setattr__(self, "columns", tuple(self.columns))
        names = [c.name for c in self.columns]
        reserved = set(self.entity.join_keys) | {self.timestamp} | ({self.event_id} if self.event_id else set())
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise DeclarationError(f"event source {self.name!r}: column {name!r} is declared twice")
            if name in reserved:
                raise DeclarationError(
                    f"event source {self.name!r}: column {name!r} is a key, timestamp or event id; "
                    "those are added from the entity and source and must not be listed in columns"
                )
            seen.add(name)

        if self.on_duplicate not in ON_DUPLICATE:
            raise DeclarationError(
                f"event source {self.name!r}: on_duplicate {self.on_duplicate!r} is not known "
                f"(use one of {', '.join(ON_DUPLICATE)})"
            )
        if self.duplicates_within is not None:
            try:
                seconds = window_seconds(self.duplicates_within)
            except ValueError:
                seconds = None
            if seconds is None:
                raise DeclarationError(
                    f"event source {self.name!r}: duplicates_within {self.duplicates_within!r} is not a duration "
                    "(use e.g. '30d' or '365d', or leave it None to look through the whole table)"
                )
        if not isinstance(self.earliest, dt.date) or isinstance(self.earliest, dt.datetime):
            raise DeclarationError(
                f"event source {self.name!r}: earliest {self.earliest!r} is not a date "
                "(use e.g. earliest=datetime.date(2000, 1, 1))"
            )

    def __hash__(self) -> int:
        return hash(self.name)

    @property
    def table_name(self) -> str:
        """The raw table's identifier in the catalog, e.g. 'raw.transactions'."""
        return f"{self.namespace}.{self.name}"

    @property
    def key_columns(self) -> list[str]:
        return list(self.entity.join_keys)

    def all_columns(self) -> list[Column]:
        """Every column of the raw table in order: event id, keys, timestamp, payload."""
        cols: list[Column] = []
        if self.event_id:
            cols.append(Column(self.event_id, "string", nullable=False))
        cols += [Column(k, t, nullable=False) for k, t in self.entity.join_keys.items()]
        cols.append(Column(self.timestamp, "timestamp", nullable=False))
        cols += list(self.columns)
        return cols

    def arrow_schema(self) -> pa.Schema:
        return pa.schema([pa.field(c.name, c.arrow_type, nullable=c.nullable) for c in self.all_columns()])

    def column(self, name: str) -> Column:
        for col in self.all_columns():
            if col.name == name:
                return col
        raise KeyError(f"event source {self.name!r} has no column {name!r}")
