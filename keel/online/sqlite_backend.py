"""The SQLite backend of the online store (embedded default, ``KEEL_HOME/online.db``, WAL mode).

One row per record, the values as JSON, written by an upsert that never replaces a newer
value with an older one; records past their drop time are deleted as writes come in.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import sqlite3
import threading
from pathlib import Path

from keel.online.store import BACKENDS, OnlineStore, record_name, wall_clock_us


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


BACKENDS["sqlite"] = SqliteOnlineStore
