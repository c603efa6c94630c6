"""The online store on a real three-master Redis Cluster: what only a cluster can get wrong.

The contract itself (newer wins, NULL as an absent field, TTLs, lookups, the sync, consistency)
runs on the cluster in ``test_online.py`` (its ``online`` fixture's ``redis-cluster`` case); here:
a batch over many slots lands on the nodes of those slots, a read is one send per node, slot
moves are followed, and the configuration picks the cluster.
"""

import dataclasses
import datetime as dt
import uuid
from collections import Counter

import pytest
import redis
from redis.cluster import key_slot
from redis.connection import Connection

from keel.config import Settings
from keel.devservers.redis_cluster import RedisCluster
from keel.online.redis_backend import RedisClusterOnlineStore, cluster_nodes
from keel.online.store import OnlineStore, OnlineStoreError, record_name
from tests.factories.timing import wait_for
from tests.keel.online.test_online import NOW, rows, typed_group, typed_row


@pytest.fixture
def cluster_store(redis_cluster_url):
    store = RedisClusterOnlineStore(redis_cluster_url, prefix=f"c{uuid.uuid4().hex[:8]}")
    yield store
    store.close()


def slot_ports(redis_cluster: RedisCluster) -> list[int]:
    """The port of the master serving each slot, by the first node's slot table."""
    ports = [0] * 16384
    with redis_cluster.nodes[0].client() as client:
        for start, end, primary, *_ in client.execute_command("CLUSTER SLOTS"):
            ports[start : end + 1] = [primary[1]] * (end - start + 1)
    return ports


@pytest.fixture
def sends(monkeypatch) -> Counter:
    """Sends on a Redis connection, by server port, from when the fixture is asked for."""
    counted: Counter = Counter()
    send = Connection.send_packed_command

    def counting(self, command, check_health=True):
        counted[self.port] += 1
        return send(self, command, check_health)

    monkeypatch.setattr(Connection, "send_packed_command", counting)
    return counted


def hmget_calls(redis_cluster: RedisCluster) -> dict[int, int]:
    calls = {}
    for node in redis_cluster.nodes:
        with node.client() as client:
            calls[node.port] = client.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0)
    return calls


def test_a_batch_over_many_slots_lands_every_record_on_its_slots_node(cluster_store, redis_cluster, payments):
    typed = typed_group(payments)
    users = [f"user-{i:04d}" for i in range(1000)]
    hour_ago = NOW - dt.timedelta(hours=1)
    assert (
        cluster_store.write(typed, rows(typed, [typed_row(u, hour_ago, n=i) for i, u in enumerate(users)]), now=NOW)
        == 1000
    )

    names = {u: f"{cluster_store.prefix}:{record_name(typed)}:{u}".encode() for u in users}
    assert len({key_slot(name) for name in names.values()}) > 900  # the batches span ~1000 slots
    by_port = {node.port: node.client() for node in redis_cluster.nodes}
    try:
        placed, owners = Counter(), slot_ports(redis_cluster)
        for i, user in enumerate(users):
            port = owners[key_slot(names[user])]
            fields = by_port[port].hgetall(names[user])
            assert fields[b"n"] == str(i).encode() and fields[b"_ts"] == str(int(hour_ago.timestamp() * 1e6)).encode()
            assert by_port[port].pttl(names[user]) > 0  # dropped by key expiry
            placed[port] += 1
        assert set(placed) == set(by_port) and min(placed.values()) > 250  # every master holds its share
    finally:
        for client in by_port.values():
            client.close()

    # Newer wins per record on every node: an older batch writes nothing, a newer half writes its half.
    older = rows(typed, [typed_row(u, NOW - dt.timedelta(hours=2), n=-1) for u in users])
    assert cluster_store.write(typed, older, now=NOW) == 0
    newer = rows(typed, [typed_row(u, NOW, n=7, currency_last=None) for u in users[::2]])
    assert cluster_store.write(typed, newer, now=NOW) == 500
    got = cluster_store.read([(typed, ["n", "currency_last"])], users[:4])
    assert [r.values for r in got[0]] == [[7, None], [1, "EUR"], [7, None], [3, "EUR"]]


def test_a_read_of_many_groups_and_entities_is_one_send_per_node(cluster_store, redis_cluster, payments, request):
    typed = typed_group(payments)
    other = dataclasses.replace(typed, name="typed_other")
    users = [f"u{i}" for i in range(300)]
    for group, n in ((typed, 1), (other, 2)):
        cluster_store.write(group, rows(group, [typed_row(u, NOW, n=n) for u in users]), now=NOW)
    wanted = [(typed, ["n"]), (other, ["n", "currency_last"])]
    cluster_store.read(wanted, users)  # every node's connection opened: sends from here are reads
    before = hmget_calls(redis_cluster)
    counted = request.getfixturevalue("sends")

    found = cluster_store.read(wanted, [*users, "nobody"])

    assert counted == {port: 1 for port in redis_cluster.ports}
    assert [r.values for r in found[0][:300]] == [[1]] * 300 and found[0][300] is None
    assert [r.values for r in found[1][:300]] == [[2, "EUR"]] * 300 and found[1][300] is None
    # Each node answered the HMGETs of the keys of its slots, and only those.
    owners = slot_ports(redis_cluster)
    expected = Counter(
        owners[key_slot(f"{cluster_store.prefix}:{record_name(g)}:{u}".encode())]
        for g, _ in wanted
        for u in [*users, "nobody"]
    )
    after = hmget_calls(redis_cluster)
    assert {port: after[port] - before[port] for port in after} == dict(expected)


def test_a_write_batch_is_one_send_per_node(cluster_store, redis_cluster, payments, request):
    typed = typed_group(payments)
    # Every node's connection opened and the write script loaded on it: sends from here are writes.
    cluster_store.write(typed, rows(typed, [typed_row(f"warm{i}", NOW) for i in range(50)]), now=NOW)
    counted = request.getfixturevalue("sends")

    # 200 records (one write batch), each new key in its own slot: one script call per slot.
    assert cluster_store.write(typed, rows(typed, [typed_row(f"b{i}", NOW) for i in range(200)]), now=NOW) == 200

    assert counted == {port: 1 for port in redis_cluster.ports}


def two_users_in_one_slot(prefix: str) -> tuple[str, str, int]:
    seen = {}
    for i in range(100_000):
        user = f"s{i}"
        slot = key_slot(f"{prefix}{user}".encode())
        if slot in seen:
            return seen[slot], user, slot
        seen[slot] = user
    raise AssertionError("no two keys share a slot among 100000")


def replied(node) -> Counter:
    """The redirections and NOSCRIPT errors ``node`` has replied so far (INFO errorstats)."""
    with node.client() as client:
        stats = client.info("errorstats")
    return Counter(
        {code: stats.get(f"errorstat_{code}", {}).get("count", 0) for code in ("ASK", "TRYAGAIN", "MOVED", "NOSCRIPT")}
    )


def node_id(node) -> str:
    with node.client() as client:
        found = client.execute_command("CLUSTER MYID")
    return found.decode() if isinstance(found, bytes) else found


def migrate(source, target, names: list[bytes]) -> None:
    with source.client() as client:
        client.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "REPLACE", "KEYS", *names)


def owns(node, slot: int) -> bool:
    """Whether ``node`` serves ``slot``, in its own view."""
    with node.client() as client:
        ranges = client.execute_command("CLUSTER SLOTS")
    return any(start <= slot <= end and primary[1] == node.port for start, end, primary, *_ in ranges)


def move_slot(redis_cluster: RedisCluster, slot: int, to) -> None:
    """Move ``slot`` and its keys to ``to`` as ``redis-cli --cluster reshard`` does (importing,
    migrating, the keys, the new owner on every master); a move left half done is finished too."""
    to_id = node_id(to)
    for node in redis_cluster.nodes:
        with node.client() as client:
            client.execute_command("CLUSTER SETSLOT", slot, "STABLE")
    for node in redis_cluster.nodes:
        if node is to:
            continue
        if owns(node, slot):
            with to.client() as client:
                client.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", node_id(node))
            with node.client() as client:
                client.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", to_id)
        else:  # keys left behind by a move cut short: only an open slot lets them go
            with node.client() as client:
                client.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", to_id)
        with node.client() as client:
            keys = client.execute_command("CLUSTER GETKEYSINSLOT", slot, 1000)
        if keys:
            migrate(node, to, keys)
    for node in [to, *(n for n in redis_cluster.nodes if n is not to)]:
        with node.client() as client:
            client.execute_command("CLUSTER SETSLOT", slot, "NODE", to_id)


def test_reads_and_writes_follow_a_slot_while_it_moves_and_after(cluster_store, redis_cluster, payments):
    typed = typed_group(payments)
    prefix = f"{cluster_store.prefix}:{record_name(typed)}:"
    moved, staying, slot = two_users_in_one_slot(prefix)
    elsewhere = next(u for u in (f"e{i}" for i in range(100)) if key_slot(f"{prefix}{u}".encode()) != slot)
    assert (
        cluster_store.write(typed, rows(typed, [typed_row(u, NOW, n=1) for u in (moved, staying, elsewhere)]), now=NOW)
        == 3
    )
    source = redis_cluster.node_of_slot(slot)
    target = next(node for node in redis_cluster.nodes if node is not source)
    wanted = [(typed, ["n"])]
    try:
        # The move starts (as redis-cli reshard does) and one of the slot's two keys has gone.
        with target.client() as client:
            client.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", node_id(source))
            client.script_flush()  # the target must be taught the write script (NOSCRIPT)
        with source.client() as client:
            client.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", node_id(target))
        migrate(source, target, [(prefix + moved).encode()])
        on_source, on_target = replied(source), replied(target)

        # A read follows ASK to the target for the moved key.
        assert [r.values for r in cluster_store.read(wanted, [moved, staying, elsewhere])[0]] == [[1], [1], [1]]
        assert replied(source) - on_source == Counter(ASK=1)
        # The batch's one script call for the slot is asked to the target, which answers TRYAGAIN
        # (it holds one of the call's keys): the call is sent again one key per call, the moved
        # key's asked to the target again, which is taught the script (NOSCRIPT).
        newer = rows(typed, [typed_row(u, NOW + dt.timedelta(hours=1), n=2) for u in (moved, staying)])
        assert cluster_store.write(typed, newer, now=NOW) == 2
        assert replied(source) - on_source == Counter(ASK=3)
        assert replied(target) - on_target == Counter(TRYAGAIN=1, NOSCRIPT=1)
        with target.client() as target_client, source.client() as source_client:
            asking = target_client.pipeline(transaction=False)
            assert asking.execute_command("ASKING").hget(prefix + moved, "n").execute() == [True, b"2"]
            assert source_client.hget(prefix + staying, "n") == b"2"

        # The move ends: the store's slot map is stale, MOVED sends it to read the map again.
        move_slot(redis_cluster, slot, target)
        assert [r.values for r in cluster_store.read(wanted, [moved, staying])[0]] == [[2], [2]]
        assert replied(source) - on_source == Counter(ASK=3, MOVED=2)
        older = rows(typed, [typed_row(u, NOW, n=3) for u in (moved, staying)])
        assert cluster_store.write(typed, older, now=NOW) == 0
        assert sorted(cluster_store.sample(typed, 10)) == sorted([moved, staying, elsewhere])
    finally:
        move_slot(redis_cluster, slot, source)
    assert redis_cluster.node_of_slot(slot) is source
    assert [r.values for r in cluster_store.read(wanted, [moved, staying])[0]] == [[2], [2]]


def test_reads_survive_killed_connections_and_an_error_reply_leaves_no_reply_unread(
    cluster_store, redis_cluster, payments
):
    typed = typed_group(payments)
    users = [f"k{i}" for i in range(30)]
    cluster_store.write(typed, rows(typed, [typed_row(u, NOW) for u in users]), now=NOW)
    wanted = [(typed, ["n", "amount_sum"])]
    expected = cluster_store.read(wanted, users)
    # Every node drops its client connections (as a restart does): the pooled ones are stale.
    for node in redis_cluster.nodes:
        with node.client() as client:
            client.client_kill_filter(_type="normal", skipme=True)
    assert cluster_store.read(wanted, users) == expected
    # An error reply in the middle of a batch raises, once every node's replies are read.
    with redis_cluster.client() as client:
        client.set(f"{cluster_store.prefix}:{record_name(typed)}:eve", "not a hash")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        cluster_store.read(wanted, [*users[:15], "eve", *users[15:]])
    assert cluster_store.read(wanted, users) == expected


def readable(store, wanted, users) -> list | None:
    try:
        return store.read(wanted, users)
    except OnlineStoreError:
        return None


def test_the_settings_pick_the_cluster_its_password_from_the_url_and_a_node_restart_is_ridden_out(
    keel_home, monkeypatch, payments
):
    typed = typed_group(payments)
    users = [f"u{i}" for i in range(30)]
    wanted = [(typed, ["n"])]
    with RedisCluster(masters=3, password="cluster-check-secret") as cluster:
        monkeypatch.setenv("KEEL_REDIS_URL", cluster.url)
        with OnlineStore.from_settings(Settings.from_env()) as store:
            assert isinstance(store, RedisClusterOnlineStore)
            assert store.location == "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in cluster.ports) + "/0"
            assert store.write(typed, rows(typed, [typed_row(u, NOW) for u in users]), now=NOW) == 30
            assert [r.values for r in store.read(wanted, users)[0]] == [[3]] * 30

            # A master stops: a read fails, naming the cluster (not the password) and the fix.
            down = cluster.nodes[1]
            down.halt()
            with pytest.raises(
                OnlineStoreError, match=r"Redis Cluster at redis\+cluster://127.0.0.1:\d+,.*/0 is unreachable"
            ):
                store.read(wanted, users)
            # It comes back on its port, empty (no persistence): the same store reads again.
            down.restart()
            wait_for(lambda: readable(store, wanted, users) is not None, what="the cluster to serve after the restart")
            owners = slot_ports(cluster)
            on_down = [owners[key_slot(f"keel:{record_name(typed)}:{u}".encode())] == down.port for u in users]
            found = store.read(wanted, users)[0]
            assert [r is None for r in found] == on_down and any(on_down) and not all(on_down)
            assert store.write(typed, rows(typed, [typed_row(u, NOW) for u in users]), now=NOW) == 30

        wrong = cluster.url.replace("cluster-check-secret", "wrong-secret")
        with RedisClusterOnlineStore(wrong) as store, pytest.raises(OnlineStoreError) as caught:
            store.read(wanted, ["ann"])
        assert "is unreachable" in str(caught.value) and "secret" not in str(caught.value)


def test_an_unreachable_cluster_is_named_with_the_fix(payments):
    store = RedisClusterOnlineStore("redis+cluster://:pw@127.0.0.1:1,127.0.0.1:2/0", socket_connect_timeout=0.5)
    with pytest.raises(
        OnlineStoreError,
        match=r"Redis Cluster at redis\+cluster://127.0.0.1:1,127.0.0.1:2/0 is unreachable .*KEEL_REDIS_URL",
    ):
        store.read([(typed_group(payments), ["n"])], ["ann"])


def test_a_cluster_url_gives_its_nodes_and_credentials_and_a_bad_one_names_the_fix():
    nodes, options = cluster_nodes("rediss+cluster://keel:p%40ss@cache-0:7000,cache-1:7001,[::1]:7002/0")
    assert nodes == [("cache-0", 7000), ("cache-1", 7001), ("::1", 7002)]
    assert options == {"username": "keel", "password": "p@ss", "ssl": True}
    with pytest.raises(OnlineStoreError, match=r"only database 0 .* end it with /0") as caught:
        cluster_nodes("redis+cluster://:secret@cache-0:7000/2")
    assert "secret" not in str(caught.value)
    with pytest.raises(OnlineStoreError, match=r"'cache-1' is not host:port; use redis\+cluster://host:6379"):
        cluster_nodes("redis+cluster://cache-0:7000,cache-1/0")
