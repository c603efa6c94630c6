"""The online store's interface: each entity's latest feature values, read in one round trip.

One record per (feature group, group version, entity) holds the group's features and the
value's timestamp ``feature_ts``: the moment the values are as of (a day's end for a synced
table row, the event time for a value the stream worker wrote). Two backends, one contract:
Redis (``keel.online.redis_backend``, production: one server or a Redis Cluster) and SQLite
(``keel.online.sqlite_backend``, the embedded default). Either way an older value never
overwrites a newer one, whoever writes (the sync, stream workers, both at once), and a read of
many groups and entities is one round trip (on a cluster, one per node, all sent at once).

A value is *expired* once ``feature_ts + ttl`` (the group's TTL) has passed: it is read as
NULL with the status ``expired`` and its age. The record itself is dropped ``retention``
(default: one more TTL) after it expires, or after it was written if it came in expired (Redis
key expiry, on the wall clock); the entity then reads as ``missing``.

Values are stored as text: integers and timestamps (microseconds) in decimal, floats by
``repr`` (round-trips exactly), booleans as ``1``/``0``, dates as days since 1970-01-01.
"""

from __future__ import annotations

import datetime as dt
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from keel.config import Settings
from keel.dsl import FeatureGroup, window_seconds

TS_FIELD = "_ts"
KEY_SEPARATOR = "\x1f"
WRITE_BATCH = 200
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_EPOCH_DATE = dt.date(1970, 1, 1)

PRESENT, NULL, MISSING, EXPIRED = "present", "null", "missing", "expired"


class OnlineStoreError(RuntimeError):
    """The online store cannot do what was asked; the message says why and what to do."""


@dataclass(frozen=True)
class Record:
    """One group's stored values for one entity: ``ts`` in epoch microseconds, values in the order asked."""

    ts: int
    values: list


def entity_key(keys: Sequence) -> str:
    """The text form of an entity's join key values (one value, or several joined)."""
    return keys[0] if len(keys) == 1 and isinstance(keys[0], str) else KEY_SEPARATOR.join(map(str, keys))


def record_name(group: FeatureGroup) -> str:
    """What the group's records are filed under: its name and version, so versions never mix."""
    return f"{group.name}:v{group.version}"


def ttl_us(group: FeatureGroup) -> int | None:
    seconds = window_seconds(group.ttl) if group.ttl else None
    return None if seconds is None else seconds * 1_000_000


def to_us(value: dt.datetime) -> int:
    if value.tzinfo is None:
        raise OnlineStoreError(f"timestamp {value!r} has no time zone; give an aware datetime (UTC)")
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(us: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(microseconds=us)


# Encoding ----------------------------------------------------------------------------------


def _encode_column(column: pa.ChunkedArray, typ: str) -> list:
    """A column's values as stored text (None stays None), converted a whole column at a time."""
    if typ in ("timestamp", "date"):
        column = pc.cast(column, pa.timestamp("us", tz="UTC") if typ == "timestamp" else pa.date32())
        column = pc.cast(column, pa.int64() if typ == "timestamp" else pa.int32())
    values = column.to_pylist()
    if typ == "float64":
        convert = float.__repr__
    elif typ == "bool":
        return [None if v is None else "1" if v else "0" for v in values]
    elif typ == "string":
        return values
    else:
        convert = str
    return [None if v is None else convert(v) for v in values]


def _decode_bool(raw) -> bool:
    return raw in (b"1", "1")


def _decode_str(raw) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _decode_ts(raw) -> dt.datetime:
    return from_us(int(raw))


def _decode_date(raw) -> dt.date:
    return _EPOCH_DATE + dt.timedelta(days=int(raw))


DECODERS = {
    "int64": int,
    "float64": float,
    "bool": _decode_bool,
    "string": _decode_str,
    "timestamp": _decode_ts,
    "date": _decode_date,
}


@dataclass(frozen=True)
class Read:
    """Some features of one group, prepared once: record name, field names (as sent) and decoders."""

    record: str
    features: tuple[str, ...]
    fields: tuple[bytes, ...]  # _ts first
    decoders: tuple

    @staticmethod
    def of(group: FeatureGroup, features: Sequence[str]) -> Read:
        return Read(
            record_name(group),
            tuple(features),
            (TS_FIELD.encode(), *(f.encode() for f in features)),
            tuple(DECODERS[group.feature_type(group.feature(name))] for name in features),
        )

    def decode(self, raw: Sequence) -> list:
        return [None if v is None else d(v) for d, v in zip(self.decoders, raw, strict=True)]


# The store ---------------------------------------------------------------------------------


class OnlineStore(ABC):
    """Latest feature values per (group, entity); ``from_settings`` picks the backend."""

    def __init__(self, retention: dt.timedelta | None = None) -> None:
        # How long a record outlives its expiry, so a read can still say "expired"; None: one TTL.
        self.retention = retention

    @staticmethod
    def from_settings(settings: Settings, **kwargs) -> OnlineStore:
        if settings.redis_url:
            cluster = settings.redis_url.split("://", 1)[0].lower().endswith("+cluster")
            return BACKENDS["redis-cluster" if cluster else "redis"](settings.redis_url, **kwargs)
        return BACKENDS["sqlite"](settings.home / "online.db", **kwargs)

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the values live, for messages (no password)."""

    # writes

    def write(self, group: FeatureGroup, rows: pa.Table, *, now: dt.datetime | None = None) -> int:
        """Store each row's values unless a newer value is stored; returns the records written.

        ``rows`` has the group's key columns, ``feature_ts`` and its features (``group.arrow_schema()``;
        other columns are ignored). A row expired for longer than the retention at ``now`` is skipped.
        """
        missing = [c for c in [*group.key_columns, "feature_ts"] if c not in rows.column_names]
        if missing:
            raise OnlineStoreError(
                f"rows for feature group {group.name!r} lack column(s) {', '.join(missing)} "
                f"(has: {', '.join(rows.column_names)}); give the group's table rows (keys, feature_ts, features)"
            )
        if rows.num_rows == 0:
            return 0
        features = [f.name for f in group.features if f.name in rows.column_names]
        key_cols = [rows.column(k) for k in group.key_columns]
        stamps = pc.cast(pc.cast(rows.column("feature_ts"), pa.timestamp("us", tz="UTC")), pa.int64())
        bad = [i for i, c in enumerate([*key_cols, stamps]) if c.null_count]
        if bad:
            raise OnlineStoreError(
                f"feature group {group.name!r}: {rows.num_rows} row(s) with a NULL key or feature_ts "
                f"({', '.join([*group.key_columns, 'feature_ts'][i] for i in bad)}); every row needs both"
            )
        keys = [entity_key(k) for k in zip(*(c.to_pylist() for c in key_cols), strict=True)]
        columns = [_encode_column(rows.column(f), group.feature_type(group.feature(f))) for f in features]
        ttl = ttl_us(group)
        retention = (
            None if ttl is None else ttl if self.retention is None else int(self.retention.total_seconds() * 1e6)
        )
        wall_us = wall_clock_us()
        now_us = to_us(now) if now is not None else wall_us
        records = []
        for key, ts, values in zip(keys, stamps.to_pylist(), zip(*columns, strict=True), strict=True):
            drop_at = None
            if ttl is not None:
                if ts + ttl + retention <= now_us:
                    continue
                # Physical removal runs on the wall clock: `retention` after expiry, or after now.
                drop_at = max(ts + ttl, wall_us) + retention
            records.append((key, ts, drop_at, values))
        written = 0
        for start in range(0, len(records), WRITE_BATCH):
            written += self._write(group, features, records[start : start + WRITE_BATCH])
        return written

    @abstractmethod
    def _write(self, group: FeatureGroup, features: list[str], records: list) -> int:
        """Write (entity key, ts us, drop-at us or None, encoded values) where ts >= the stored ts."""

    # reads

    def read(
        self, requests: Sequence[tuple[FeatureGroup, Sequence[str]]], keys: Sequence[str]
    ) -> list[list[Record | None]]:
        """For each (group, features) request, each entity's record (None: not stored), one round trip."""
        reads = [Read.of(g, f) for g, f in requests]
        raw = self._read(reads, keys)
        return [
            [None if rec is None else Record(rec[0], read.decode(rec[1])) for rec in records]
            for read, records in zip(reads, raw, strict=True)
        ]

    @abstractmethod
    def _read(self, reads: list[Read], keys: Sequence[str]) -> list[list]:
        """Per read, per key: (ts us, [raw values]) or None."""

    @abstractmethod
    def sample(self, group: FeatureGroup, n: int, seed: int = 0) -> list[str]:
        """Up to ``n`` entity keys with a record of the group, drawn at random."""

    # sync watermark

    @abstractmethod
    def sync_state(self, group: FeatureGroup) -> dict | None:
        """What the last sync of the group's table recorded: snapshot_id and synced_at."""

    @abstractmethod
    def set_sync_state(self, group: FeatureGroup, snapshot_id: int) -> None: ...

    @abstractmethod
    def clear(self, group: FeatureGroup) -> int:
        """Delete the group's records (this version) and its sync watermark; returns records deleted."""

    def close(self) -> None:  # noqa: B027 - optional for backends without resources
        pass

    def __enter__(self) -> OnlineStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# The backends by name, each added by its own module when the package keel.online is imported:
# they subclass OnlineStore, so this module cannot import them for from_settings.
BACKENDS: dict[str, type[OnlineStore]] = {}


def wall_clock_us() -> int:
    return time.time_ns() // 1000
