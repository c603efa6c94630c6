"""Declarations: entities and event sources.

A project declares these in its own module (``pipelines`` by default); the engine, the
Dagster layer and the CLI all read the same objects. Declarations are validated when they
are built, so a mistake fails at import with a message naming the thing and the fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pyarrow as pa

COLUMN_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "int64": pa.int64(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "timestamp": pa.timestamp("us", tz="UTC"),
    "date": pa.date32(),
}

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class DeclarationError(ValueError):
    """A declaration in the project module is invalid."""


def _check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise DeclarationError(
            f"{kind} name {name!r} is not a valid identifier "
            "(use lower_snake_case starting with a letter, e.g. 'user_txn')"
        )


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

    def __post_init__(self) -> None:
        _check_name("column", self.name)
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
        _check_name("entity", self.name)
        if not self.join_keys:
            raise DeclarationError(
                f"entity {self.name!r}: needs at least one join key, e.g. join_keys={{'user_id': 'string'}}"
            )
        for key, typ in self.join_keys.items():
            _check_name(f"entity {self.name!r} join key", key)
            if typ not in ("string", "int64"):
                raise DeclarationError(
                    f"entity {self.name!r}: join key {key!r} has type {typ!r} (use 'string' or 'int64')"
                )

    def __hash__(self) -> int:
        return hash(self.name)


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

    def __post_init__(self) -> None:
        _check_name("event source", self.name)
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
