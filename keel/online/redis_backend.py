"""The Redis backends of the online store (``KEEL_REDIS_URL``, production): one server or a Redis Cluster.

A record is a hash at ``keel:<group>:v<version>:<entity key>`` with one field per non-NULL
feature and ``_ts`` (epoch microseconds); a NULL feature is an absent field. Writes run a Lua
script that compares ``_ts`` inside Redis, so an older value never overwrites a newer one
whoever writes (the sync, stream workers, both at once). Reads are one pipelined ``HMGET`` per
(group, entity). A record is dropped by Redis key expiry, on the wall clock.

One server (``redis://``, ``rediss://``, ``unix://``): a write batch is one script call over all
its keys and a read is one round trip; connections come from one pool per store.

A Redis Cluster (``redis+cluster://host:port[,host:port...]/0``, ``rediss+cluster://`` for TLS):
the keys are the same, without hash tags, so a group's records spread over every slot and node
as its entities do. A script may only touch keys of one slot, so a write batch runs the script
once per slot among its keys (each call atomic, the ``_ts`` rule unchanged); the calls of a
batch, like the ``HMGET``\\s of a read, are framed per node and sent to every node before any
reply is read: one round trip per node, the nodes in parallel. A slot moved (``MOVED``) makes the
store read the slot map again and resend; a slot being moved (``ASK``) is followed with
``ASKING``; a script call whose keys are split by a move in progress (``TRYAGAIN``) is sent
again one key per call. The sync watermark is one hash (``..:_sync``), like a record.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import random
import threading
import time
from abc import abstractmethod
from urllib.parse import unquote, urlparse

from keel.online.store import BACKENDS, OnlineStore, OnlineStoreError, Read, record_name

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

_WRITE_SHA = hashlib.sha1(_WRITE_SCRIPT.encode()).hexdigest().encode()

# Sends of a cluster exchange before giving up on redirections (a slot moved again and again).
CLUSTER_SENDS = 5
_ASKING = b"*1\r\n$6\r\nASKING\r\n"


def write_batch(features: list[str], records: list) -> bytes:
    """The write script's argument for ``records`` (entity key, ts us, drop-at us or None, values)."""
    rows = [
        [str(ts), str(0 if drop_at is None else math.ceil(drop_at / 1000)), values]
        for _, ts, drop_at, values in records
    ]
    return json.dumps({"f": features, "r": rows}, separators=(",", ":")).encode()


def _reply(connection):
    """The next reply on ``connection``; an error reply is returned, not raised."""
    from redis.exceptions import ResponseError

    try:
        return connection.read_response()
    except ResponseError as exc:
        return exc


def frame(*args: bytes) -> bytes:
    """One command in RESP, the protocol's framing, from its parts."""
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


class RedisStore(OnlineStore):
    """What both Redis backends share: key names, framing reads, the sync watermark, sampling."""

    what = "Redis"

    def __init__(self, url: str, prefix: str, retention: dt.timedelta | None) -> None:
        super().__init__(retention)
        self.url = url
        self.prefix = prefix
        self._framed: dict[tuple[bytes, ...], tuple[bytes, bytes]] = {}
        self._errors: tuple[type[BaseException], ...] = ()

    @property
    @abstractmethod
    def client(self):
        """A redis-py client of the store (``redis.Redis`` or ``redis.cluster.RedisCluster``)."""

    def _key(self, record: str, key: str) -> str:
        return f"{self.prefix}:{record}:{key}"

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except self._errors as exc:
            raise OnlineStoreError(
                f"online store {self.what} at {self.location} is unreachable ({exc}); "
                "start it or fix KEEL_REDIS_URL (unset it to use the embedded SQLite store)"
            ) from None

    def _framing(self, read: Read) -> tuple[bytes, bytes]:
        """``HMGET``'s array header and the framed field names of ``read`` (made once per read)."""
        framed = self._framed.get(read.fields)
        if framed is None:
            head = b"*%d\r\n$5\r\nHMGET\r\n" % (len(read.fields) + 2)
            fields = b"".join(b"$%d\r\n%s\r\n" % (len(f), f) for f in read.fields)
            framed = self._framed[read.fields] = (head, fields)
        return framed

    def _hmgets(self, reads: list[Read], keys) -> tuple[list[bytes], list[bytes]]:
        """The ``HMGET`` of each (read, key), framed (RESP) from each read's fields framed once, and
        the keys' names; redis-py's pipeline spends ~50 us more per request packing the same bytes."""
        commands, names = [], []
        for read in reads:
            head, fields = self._framing(read)
            prefix = f"{self.prefix}:{read.record}:"
            for key in keys:
                name = (prefix + key).encode()
                commands.append(b"%s$%d\r\n%s\r\n%s" % (head, len(name), name, fields))
                names.append(name)
        return commands, names

    @staticmethod
    def _records(reads: list[Read], keys, replies: list) -> list[list]:
        """Per read, per key: (ts us, [raw values]) or None, from the replies of ``_hmgets``' commands."""
        n = len(keys)
        return [
            [None if reply[0] is None else (int(reply[0]), reply[1:]) for reply in replies[j * n : (j + 1) * n]]
            for j in range(len(reads))
        ]

    @abstractmethod
    def _scan(self, pattern: str) -> list[bytes]:
        """The names of the keys matching ``pattern``, on every node."""

    def sample(self, group, n, seed=0):
        skip = len(self._key(record_name(group), ""))
        found = {raw.decode()[skip:] for raw in self._call(self._scan, self._key(record_name(group), "*"))}
        found.discard("_sync")
        return random.Random(seed).sample(sorted(found), min(n, len(found)))

    def sync_state(self, group):
        raw = self._call(lambda: self.client.hgetall(self._key(record_name(group), "_sync")))
        if not raw:
            return None
        return {"snapshot_id": int(raw[b"snapshot_id"]), "synced_at": raw[b"synced_at"].decode()}

    def set_sync_state(self, group, snapshot_id):
        state = {"snapshot_id": snapshot_id, "synced_at": dt.datetime.now(dt.UTC).isoformat()}
        self._call(lambda: self.client.hset(self._key(record_name(group), "_sync"), mapping=state))


class RedisOnlineStore(RedisStore):
    """The online store on one Redis server (``redis://``, ``rediss://``, ``unix://``)."""

    def __init__(self, url: str, *, prefix: str = "keel", retention: dt.timedelta | None = None, **pool) -> None:
        import redis

        super().__init__(url, prefix, retention)
        self.pool = redis.ConnectionPool.from_url(url, **pool)
        self._client = redis.Redis(connection_pool=self.pool)
        self._script = self._client.register_script(_WRITE_SCRIPT)
        self._errors = (redis.ConnectionError, redis.TimeoutError)

    @property
    def client(self):
        return self._client

    @property
    def location(self) -> str:
        parts = urlparse(self.url)
        return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"

    def _write(self, group, features, records) -> int:
        prefix = f"{self.prefix}:{record_name(group)}:"
        keys = [prefix + key for key, *_ in records]
        return int(self._call(self._script, keys, [write_batch(features, records)]))

    def _read(self, reads, keys):
        # One HMGET per (group, entity), all sent at once on one pooled connection: one round trip.
        commands, _ = self._hmgets(reads, keys)
        return self._records(reads, keys, self._call(self._send, b"".join(commands), len(commands)))

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

    def _scan(self, pattern):
        return list(self._client.scan_iter(match=pattern, count=1000))

    def clear(self, group):
        keys = self._call(self._scan, self._key(record_name(group), "*"))
        deleted = 0
        for start in range(0, len(keys), 500):
            deleted += self._call(self._client.delete, *keys[start : start + 500])
        return max(0, deleted - (1 if self._key(record_name(group), "_sync").encode() in keys else 0))

    def close(self):
        self.pool.disconnect()


def cluster_nodes(url: str) -> tuple[list[tuple[str, int]], dict]:
    """The startup nodes ``(host, port)`` of a ``redis+cluster://`` URL and the client's options
    from it (username, password, TLS); the message of a bad URL names the fix."""
    parts = urlparse(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    nodes = []
    for address in hosts.split(","):
        host, _, port = address.strip().rpartition(":")
        if not host or not port.isdigit():
            raise OnlineStoreError(
                f"Redis Cluster URL {cluster_location(url)!r}: {address.strip()!r} is not host:port; "
                "use redis+cluster://host:6379[,host:6379...]/0"
            )
        nodes.append((host.strip("[]"), int(port)))
    if parts.path not in ("", "/", "/0") or parts.query:
        raise OnlineStoreError(
            f"Redis Cluster URL {cluster_location(url)!r}: a cluster has only database 0 and takes no "
            "options in the URL; end it with /0"
        )
    options = {"username": unquote(user) or None, "password": unquote(password) if password else None}
    return nodes, options | ({"ssl": True} if parts.scheme == "rediss+cluster" else {})


def cluster_location(url: str) -> str:
    parts = urlparse(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


class RedisClusterOnlineStore(RedisStore):
    """The online store on a Redis Cluster (``redis+cluster://host:port[,host:port...]/0``).

    The cluster client connects on first use, so a store made while the cluster is down fails
    then, with the message of an unreachable store, as a one-server store does.
    """

    what = "Redis Cluster"

    def __init__(self, url: str, *, prefix: str = "keel", retention: dt.timedelta | None = None, **options) -> None:
        from redis import exceptions as x

        super().__init__(url, prefix, retention)
        self.nodes, self.options = cluster_nodes(url)
        self.options |= options
        self._cluster = None
        self._lock = threading.Lock()
        self._stale = False  # a node failed: read the slot map again before the next exchange
        self._errors = (x.ConnectionError, x.TimeoutError, x.ClusterDownError, x.RedisClusterException)

    @property
    def client(self):
        if self._cluster is None:
            from redis.cluster import ClusterNode, RedisCluster

            with self._lock:
                if self._cluster is None:
                    nodes = [ClusterNode(host, port) for host, port in self.nodes]
                    self._cluster = RedisCluster(startup_nodes=nodes, **self.options)
        return self._cluster

    @property
    def location(self) -> str:
        return cluster_location(self.url)

    def _write(self, group, features, records) -> int:
        from redis.cluster import key_slot

        prefix = f"{self.prefix}:{record_name(group)}:"
        by_slot: dict[int, list] = {}
        for record in records:
            name = (prefix + record[0]).encode()
            by_slot.setdefault(key_slot(name), []).append((name, record))
        calls = [self._eval(features, members) for members in by_slot.values()]
        answers = self._call(lambda: self._exchange(calls, list(by_slot), keep_tryagain=True))
        written, split = 0, []
        for members, answer in zip(by_slot.values(), answers, strict=True):
            if isinstance(answer, Exception):
                split.extend(members)  # TRYAGAIN: a move in progress has taken some of its keys
            else:
                written += answer
        if split:
            singles = [self._eval(features, [member]) for member in split]
            written += sum(self._call(self._exchange, singles, [key_slot(name) for name, _ in split]))
        return written

    @staticmethod
    def _eval(features: list[str], members: list) -> bytes:
        """The write script's call (``EVALSHA``) for ``members``, (key name, record) of one slot."""
        names = [name for name, _ in members]
        batch = write_batch(features, [record for _, record in members])
        return frame(b"EVALSHA", _WRITE_SHA, b"%d" % len(names), *names, batch)

    def _read(self, reads, keys):
        from redis.cluster import key_slot

        commands, names = self._hmgets(reads, keys)
        replies = self._call(self._exchange, commands, [key_slot(name) for name in names])
        return self._records(reads, keys, replies)

    def _exchange(self, commands: list[bytes], slots: list[int], keep_tryagain: bool = False) -> list:
        """Each command's reply, the command sent to the master of its slot: one send per node,
        every node's before any reply is read. Redirections are followed; an error reply raises
        (once every reply is read), but ``keep_tryagain`` returns a ``TRYAGAIN`` as the reply."""
        from redis import exceptions as x

        cluster = self.client
        if self._stale:
            cluster.nodes_manager.initialize()
            self._stale = False
        replies: list = [None] * len(commands)
        pending, asking = list(range(len(commands))), {}
        for attempt in range(CLUSTER_SENDS):
            answers = self._round(cluster, commands, slots, pending, asking)
            retry, refresh, wait, unloaded = [], False, False, set()
            for i in pending:
                node, answer = answers[i]
                if not isinstance(answer, x.ResponseError) or keep_tryagain and isinstance(answer, x.TryAgainError):
                    replies[i] = answer
                    continue
                if isinstance(answer, x.MovedError | x.ClusterDownError):
                    refresh = True
                    asking.pop(i, None)
                elif isinstance(answer, x.AskError):
                    target = cluster.get_node(answer.host, answer.port)
                    if target is None:  # a node the slot map does not know yet
                        refresh = True
                        asking.pop(i, None)
                    else:
                        asking[i] = target
                elif isinstance(answer, x.NoScriptError):
                    unloaded.add(node)
                elif isinstance(answer, x.TryAgainError):
                    wait = True
                else:
                    raise answer
                retry.append(i)
            if not retry:
                return replies
            if refresh:
                cluster.nodes_manager.initialize()
            for node in unloaded:
                cluster.get_redis_connection(node).script_load(_WRITE_SCRIPT)
            if wait:
                time.sleep(0.01 * 2**attempt)  # a slot is being moved: give the move a moment
            pending = retry
        raise OnlineStoreError(
            f"online store Redis Cluster at {self.location}: slot(s) "
            f"{', '.join(map(str, sorted({slots[i] for i in pending})[:10]))} still redirected after "
            f"{CLUSTER_SENDS} sends ({answers[pending[0]][1]}); the cluster is moving slots or failing over: "
            "retry, and check it with redis-cli --cluster check"
        )

    def _round(self, cluster, commands, slots, pending, asking) -> dict:
        """One send per node of the ``pending`` commands and their replies (a reply or an error) by index."""
        from redis import exceptions

        by_node: dict = {}
        for i in pending:
            node = asking.get(i) or cluster.nodes_manager.get_node_from_slot(slots[i])
            by_node.setdefault(node, []).append(i)
        held, answers = [], {}
        try:
            for node, indexes in by_node.items():
                pool = cluster.get_redis_connection(node).connection_pool
                connection = pool.get_connection()
                held.append((pool, connection))
                packed = b"".join(_ASKING + commands[i] if i in asking else commands[i] for i in indexes)
                connection.send_packed_command([packed])
            for (node, indexes), (_, connection) in zip(by_node.items(), held, strict=True):
                for i in indexes:
                    asked = _reply(connection) if i in asking else None  # ASKING's +OK, or why not
                    answer = _reply(connection)
                    answers[i] = (node, asked if isinstance(asked, exceptions.ResponseError) else answer)
            return answers
        except BaseException as exc:
            # Replies may be left unread: each connection reconnects before its next use.
            for _, connection in held:
                connection.disconnect()
            self._stale |= isinstance(exc, exceptions.ConnectionError | exceptions.TimeoutError)
            raise
        finally:
            for pool, connection in held:
                pool.release(connection)

    def _scan(self, pattern):
        cluster = self.client
        primaries = [cluster.get_redis_connection(node) for node in cluster.get_primaries()]
        return [key for primary in primaries for key in primary.scan_iter(match=pattern, count=1000)]

    def clear(self, group):
        from redis.cluster import key_slot

        keys = sorted(set(self._call(self._scan, self._key(record_name(group), "*"))))
        deleted = self._call(self._exchange, [frame(b"DEL", key) for key in keys], [key_slot(k) for k in keys])
        return sum(deleted) - (1 if self._key(record_name(group), "_sync").encode() in keys else 0)

    def close(self):
        if self._cluster is not None:
            self._cluster.close()


BACKENDS["redis"] = RedisOnlineStore
BACKENDS["redis-cluster"] = RedisClusterOnlineStore
