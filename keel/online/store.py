"""The online store: each entity's latest feature values, read in one round trip.

One record per (feature group, group version, entity) holds the group's features and the
value's timestamp ``feature_ts``: the moment the values are as of (a day's end for a synced
table row, the event time for a value the stream worker wrote). Two backends, one contract:

- **Redis** (``KEEL_REDIS_URL``, production): a hash at ``keel:<group>:v<version>:<entity key>``
  with one field per non-NULL feature and ``_ts`` (epoch microseconds); a NULL feature is an
  absent field. Writes run a Lua script that compares ``_ts`` inside Redis, so an older value
  never overwrites a newer one whoever writes (the sync, stream workers, both at once). Reads
  are one pipelined ``HMGET`` per (group, entity): a single round trip for many groups and
  many entities. Connections come from one pool per store.
- **SQLite** (embedded default, ``KEEL_HOME/online.db``, WAL mode): one row per record, the
  values as JSON, written by an upsert guarded by the same rule.

A value is *expired* once ``feature_ts + ttl`` (the group's TTL) has passed: it is read as
NULL with the status ``expired`` and its age. The record itself is dropped ``retention``
(default: one more TTL) after it expires, or after it was written if it came in expired (Redis
key expiry, on the wall clock); the entity then reads as ``missing``.

Values are stored as text: integers and timestamps (microseconds) in decimal, floats by
``repr`` (round-trips exactly), booleans as ``1``/``0``, dates as days since 1970-01-01.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import random
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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
            return RedisOnlineStore(settings.redis_url, **kwargs)
        return SqliteOnlineStore(settings.home / "online.db", **kwargs)

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


# Redis -------------------------------------------------------------------------------------

# KEYS: the records' keys. ARGV[1]: JSON {"f": [feature names], "r": [[ts, drop-at ms or 0,
# [encoded value or null, ...]], ...]}, one row per key, numbers as strings so none loses digits
# (Lua's numbers are doubles: exact for microsecond timestamps, printed in exponent form).
# One argument keeps redis-py's packing cheap; Redis decodes it with its built-in cjson.
_WRITE_SCRIPT = """
local batch = cjson.decode(ARGV[1])
local names = batch.f
local written = 0
for i, key in ipairs(KEYS) do
  local row = batch.r[i]
  local ts = row[1]
  local old = redis.call('HGET', key, '_ts')
  if (not old) or tonumber(old) <= tonumber(ts) then
    local set = {'_ts', ts}
    local del = {}
    for j, name in ipairs(names) do
      local v = row[3][j]
      if v == cjson.null then
        del[#del + 1] = name
      else
        set[#set + 1] = name
        set[#set + 1] = v
      end
    end
    if #del > 0 then redis.call('HDEL', key, unpack(del)) end
    redis.call('HSET', key, unpack(set))
    local drop_at = tonumber(row[2])
    if drop_at > 0 then redis.call('PEXPIREAT', key, drop_at) else redis.call('PERSIST', key) end
    written = written + 1
  end
end
return written
"""


class RedisOnlineStore(OnlineStore):
    def __init__(self, url: str, *, prefix: str = "keel", retention: dt.timedelta | None = None, **pool) -> None:
        import redis

        super().__init__(retention)
        self.url = url
        self.prefix = prefix
        self.pool = redis.ConnectionPool.from_url(url, **pool)
        self.client = redis.Redis(connection_pool=self.pool)
        self._script = self.client.register_script(_WRITE_SCRIPT)
        self._errors = (redis.ConnectionError, redis.TimeoutError)
        self._framed: dict[tuple[bytes, ...], tuple[bytes, bytes]] = {}

    @property
    def location(self) -> str:
        from urllib.parse import urlparse

        parts = urlparse(self.url)
        return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"

    def _key(self, record: str, key: str) -> str:
        return f"{self.prefix}:{record}:{key}"

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except self._errors as exc:
            raise OnlineStoreError(
                f"online store Redis at {self.location} is unreachable ({exc}); "
                "start it or fix KEEL_REDIS_URL (unset it to use the embedded SQLite store)"
            ) from None

    def _write(self, group, features, records) -> int:
        prefix = f"{self.prefix}:{record_name(group)}:"
        rows = [
            [str(ts), str(0 if drop_at is None else math.ceil(drop_at / 1000)), values]
            for _, ts, drop_at, values in records
        ]
        batch = json.dumps({"f": features, "r": rows}, separators=(",", ":"))
        return int(self._call(self._script, [prefix + key for key, *_ in records], [batch]))

    def _read(self, reads, keys):
        # One HMGET per (group, entity), all sent at once on one pooled connection: one
        # round trip. The commands are framed here (RESP) from each group's fields, framed
        # once; redis-py's pipeline spends ~50 us more per request packing the same bytes.
        commands = []
        for read in reads:
            head, fields = self._framing(read)
            prefix = f"{self.prefix}:{read.record}:"
            for key in keys:
                name = (prefix + key).encode()
                commands.append(b"%s$%d\r\n%s\r\n%s" % (head, len(name), name, fields))
        replies = self._call(self._send, b"".join(commands), len(commands))
        out, i = [], 0
        for _read in reads:
            part = []
            for _ in keys:
                reply = replies[i]
                i += 1
                part.append(None if reply[0] is None else (int(reply[0]), reply[1:]))
            out.append(part)
        return out

    def _framing(self, read: Read) -> tuple[bytes, bytes]:
        """``HMGET``'s array header and the framed field names of ``read`` (made once per read)."""
        framed = self._framed.get(read.fields)
        if framed is None:
            head = b"*%d\r\n$5\r\nHMGET\r\n" % (len(read.fields) + 2)
            fields = b"".join(b"$%d\r\n%s\r\n" % (len(f), f) for f in read.fields)
            framed = self._framed[read.fields] = (head, fields)
        return framed

    def _send(self, packed: bytes, replies: int) -> list:
        # The pool hands out a connection only once it is connected with nothing left to read.
        connection = self.pool.get_connection()
        try:
            connection.send_packed_command([packed])
            return [connection.read_response() for _ in range(replies)]
        except BaseException:
            # Replies may be left unread on it: it reconnects before its next use.
            connection.disconnect()
            raise
        finally:
            self.pool.release(connection)

    def sample(self, group, n, seed=0):
        pattern = self._key(record_name(group), "*")
        skip = len(self._key(record_name(group), ""))
        found = []
        for raw in self._call(lambda: list(self.client.scan_iter(match=pattern, count=1000))):
            name = raw.decode()[skip:]
            if name != "_sync":
                found.append(name)
        found.sort()
        return random.Random(seed).sample(found, min(n, len(found)))

    def sync_state(self, group):
        raw = self._call(self.client.hgetall, self._key(record_name(group), "_sync"))
        if not raw:
            return None
        return {"snapshot_id": int(raw[b"snapshot_id"]), "synced_at": raw[b"synced_at"].decode()}

    def set_sync_state(self, group, snapshot_id):
        now = dt.datetime.now(dt.UTC).isoformat()
        self._call(
            self.client.hset,
            self._key(record_name(group), "_sync"),
            None,
            None,
            {"snapshot_id": snapshot_id, "synced_at": now},
        )

    def clear(self, group):
        keys = self._call(lambda: list(self.client.scan_iter(match=self._key(record_name(group), "*"), count=1000)))
        deleted = 0
        for start in range(0, len(keys), 500):
            deleted += self._call(self.client.delete, *keys[start : start + 500])
        return max(0, deleted - (1 if self._key(record_name(group), "_sync").encode() in keys else 0))

    def close(self):
        self.pool.disconnect()


# SQLite ------------------------------------------------------------------------------------


class SqliteOnlineStore(OnlineStore):
    def __init__(self, path: Path, *, retention: dt.timedelta | None = None) -> None:
        super().__init__(retention)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.con = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute("PRAGMA synchronous=NORMAL")
        self.con.execute(
            "CREATE TABLE IF NOT EXISTS online_values (record TEXT NOT NULL, entity TEXT NOT NULL, "
            "ts INTEGER NOT NULL, drop_at INTEGER, vals TEXT NOT NULL, PRIMARY KEY (record, entity)) WITHOUT ROWID"
        )
        self.con.execute(
            "CREATE TABLE IF NOT EXISTS online_sync (record TEXT PRIMARY KEY, snapshot_id INTEGER, synced_at TEXT)"
        )

    @property
    def location(self) -> str:
        return str(self.path)

    def _write(self, group, features, records) -> int:
        record = record_name(group)
        rows = [
            (
                record,
                key,
                ts,
                drop_at,
                json.dumps({f: v for f, v in zip(features, values, strict=True) if v is not None}),
            )
            for key, ts, drop_at, values in records
        ]
        with self._lock:
            before = self.con.total_changes
            self.con.execute("BEGIN IMMEDIATE")
            try:
                self.con.executemany(
                    "INSERT INTO online_values VALUES (?, ?, ?, ?, ?) ON CONFLICT (record, entity) DO UPDATE SET "
                    "ts = excluded.ts, drop_at = excluded.drop_at, vals = excluded.vals "
                    "WHERE excluded.ts >= online_values.ts",
                    rows,
                )
                written = self.con.total_changes - before
                self.con.execute(
                    "DELETE FROM online_values WHERE drop_at IS NOT NULL AND drop_at <= ?", (wall_clock_us(),)
                )
                self.con.execute("COMMIT")
            except BaseException:
                self.con.execute("ROLLBACK")
                raise
        return written

    def _read(self, reads, keys):
        found: dict[tuple[str, str], tuple[int, dict]] = {}
        records = sorted({r.record for r in reads})
        now = wall_clock_us()
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start : start + 500])
                marks = ", ".join("?" * len(chunk))
                for record, entity, ts, vals in self.con.execute(
                    f"SELECT record, entity, ts, vals FROM online_values WHERE record IN ({', '.join('?' * len(records))}) "
                    f"AND entity IN ({marks}) AND (drop_at IS NULL OR drop_at > ?)",
                    [*records, *chunk, now],
                ):
                    found[(record, entity)] = (ts, json.loads(vals))
        out = []
        for read in reads:
            part = []
            for key in keys:
                hit = found.get((read.record, key))
                part.append(None if hit is None else (hit[0], [hit[1].get(f) for f in read.features]))
            out.append(part)
        return out

    def sample(self, group, n, seed=0):
        with self._lock:
            keys = [
                r[0]
                for r in self.con.execute(
                    "SELECT entity FROM online_values WHERE record = ? AND (drop_at IS NULL OR drop_at > ?) ORDER BY entity",
                    (record_name(group), wall_clock_us()),
                )
            ]
        return random.Random(seed).sample(keys, min(n, len(keys)))

    def sync_state(self, group):
        with self._lock:
            row = self.con.execute(
                "SELECT snapshot_id, synced_at FROM online_sync WHERE record = ?", (record_name(group),)
            ).fetchall()
        return {"snapshot_id": row[0][0], "synced_at": row[0][1]} if row else None

    def set_sync_state(self, group, snapshot_id):
        with self._lock:
            self.con.execute(
                "INSERT INTO online_sync VALUES (?, ?, ?) ON CONFLICT (record) DO UPDATE SET "
                "snapshot_id = excluded.snapshot_id, synced_at = excluded.synced_at",
                (record_name(group), snapshot_id, dt.datetime.now(dt.UTC).isoformat()),
            )

    def clear(self, group):
        with self._lock:
            cur = self.con.execute("DELETE FROM online_values WHERE record = ?", (record_name(group),))
            self.con.execute("DELETE FROM online_sync WHERE record = ?", (record_name(group),))
            return cur.rowcount

    def close(self):
        with self._lock:
            self.con.close()


def wall_clock_us() -> int:
    return time.time_ns() // 1000
