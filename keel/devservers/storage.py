"""PostgreSQL, S3-compatible object storage and an MLflow tracking server on loopback ports, as
the production profile uses them.

``PostgresServer`` runs the PostgreSQL binaries on PATH, Debian's
(``/usr/lib/postgresql/<version>/bin``) or the ``pgserver`` wheel's on a fresh cluster, as the ``postgres`` user when run
as root (PostgreSQL refuses to run as root). ``S3Server`` runs ``moto``'s standalone server,
which speaks the S3 REST API (MinIO does not install from the package registries).
``MlflowServer`` runs ``mlflow server`` on a backend store and an artifact destination
(SQLite and a folder in its scratch folder unless given PostgreSQL and ``s3://``), serving the
artifacts itself, so its clients need no object-store credentials.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from keel.devservers import START_TIMEOUT_S, DevServerError, Server, write_private

# Debian's postgresql packages install each major version's binaries under <this>/<version>/bin.
DEBIAN_POSTGRESQL = Path("/usr/lib/postgresql")


def wheel_postgres_bin_dir() -> Path | None:
    """PostgreSQL's server binaries from the ``pgserver`` wheel, if it is installed."""
    import importlib.util

    # Found, not imported: importing pgserver sets up its own server machinery, not needed here.
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))).resolve() / "pginstall" / "bin"
    return folder if (folder / "initdb").is_file() and (folder / "postgres").is_file() else None


def postgres_bin_dir() -> Path:
    """The folder of PostgreSQL's server binaries (``initdb``, ``postgres``): from PATH, else
    Debian's newest ``/usr/lib/postgresql/<version>/bin``, else the ``pgserver`` wheel's."""
    on_path = shutil.which("initdb")
    candidates = [Path(on_path).resolve().parent] if on_path else []
    if DEBIAN_POSTGRESQL.is_dir():
        versions = [p for p in DEBIAN_POSTGRESQL.iterdir() if p.name.isdigit()]
        candidates += [p / "bin" for p in sorted(versions, key=lambda p: int(p.name), reverse=True)]
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    wheel = wheel_postgres_bin_dir()
    if wheel is not None:
        return wheel
    raise DevServerError(
        "PostgreSQL's server binaries (initdb, postgres) not found: install Debian's postgresql package "
        "(apt-get install postgresql), the pgserver wheel (pip install 'pgserver>=0.1.4,<0.2', part of keel's "
        "dev extras), or put a PostgreSQL bin folder on PATH"
    )


def _reachable(folder: Path, account: pwd.struct_passwd) -> bool:
    """Whether ``account`` may enter ``folder`` and every folder above it (execute permission)."""
    for path in [folder, *folder.parents]:
        if not path.exists():
            continue
        st = path.stat()
        if st.st_uid == account.pw_uid:
            allowed = st.st_mode & 0o100
        elif st.st_gid == account.pw_gid:
            allowed = st.st_mode & 0o010
        else:
            allowed = st.st_mode & 0o001
        if not allowed:
            return False
    return True


class PostgresServer(Server):
    """PostgreSQL on 127.0.0.1 on a fresh cluster (fsync off), superuser ``keel``: trusted
    without a ``password``, else signing in over TCP with it (SCRAM), as a team's server would.

    ``url(database)`` is a SQLAlchemy URL (``postgresql+psycopg2://keel[:PASSWORD]@127.0.0.1:PORT/NAME``);
    ``create_database`` makes one database per user of it (Iceberg catalog, MLflow, Dagster);
    ``passfile`` is a libpq password file for ``psql`` (``PGPASSFILE``), so the password need not
    be typed or shown. Everything it holds is deleted when it stops.
    """

    name = "postgres"
    # SIGINT is PostgreSQL's fast shutdown: it does not wait for connected clients to leave.
    stop_signal = signal.SIGINT
    stop_timeout = 15.0
    user = "keel"

    def __init__(self, bin_dir: Path | None = None, password: str | None = None) -> None:
        super().__init__()
        self.bin_dir = bin_dir or postgres_bin_dir()
        self.password = password

    def _owner(self) -> pwd.struct_passwd | None:
        """The account the server runs as: ``postgres`` when we are root, else ourselves (None)."""
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam("postgres")
        except KeyError:
            raise DevServerError(
                "PostgreSQL refuses to run as root and there is no 'postgres' user to run it as: "
                "create one (useradd --system postgres) or run as another user"
            ) from None

    def start(self, timeout: float = START_TIMEOUT_S, under: Path | None = None) -> PostgresServer:
        """As ``Server.start``; run as ``postgres`` (we are root), the scratch folder goes in the
        temporary folder instead when ``postgres`` cannot reach ``under`` (e.g. under pytest's 0700 tmp)."""
        owner = self._owner()
        if owner and under is not None and not _reachable(Path(under), owner):
            under = None
        return super().start(timeout, under)

    def _popen_options(self) -> dict:
        owner = self._owner()
        return {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []} if owner else {}

    def _prepare(self) -> None:
        owner = self._owner()
        if owner and not _reachable(self.bin_dir, owner):
            raise DevServerError(
                f"PostgreSQL runs as 'postgres' (we are root) and that account cannot reach its binaries in "
                f"{self.bin_dir}: make the folders above it searchable (chmod o+x) or run as another user"
            )
        if owner:
            os.chown(self.workdir, owner.pw_uid, owner.pw_gid)
        initdb = [str(self.bin_dir / "initdb"), "-D", "data", "-U", self.user, "-E", "UTF8", "--no-sync"]
        if self.password is None:
            initdb.append("--auth=trust")
        else:
            # Local socket connections stay trusted (only this account can reach the socket);
            # TCP ones sign in. initdb reads the password from a file, removed once it has run.
            pwfile = write_private(self.workdir / "pwfile", self.password)
            if owner:
                os.chown(pwfile, owner.pw_uid, owner.pw_gid)
            initdb += ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile.name}"]
        try:
            done = subprocess.run(initdb, cwd=self.workdir, capture_output=True, text=True, **self._popen_options())
        finally:
            (self.workdir / "pwfile").unlink(missing_ok=True)
        if done.returncode != 0:
            raise DevServerError(f"initdb failed in {self.workdir}:\n{done.stdout[-1000:]}{done.stderr[-2000:]}")

    def _command(self, port: int) -> list[str]:
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.workdir),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
        }
        options = [arg for key, value in settings.items() for arg in ("-c", f"{key}={value}")]
        return [str(self.bin_dir / "postgres"), "-D", str(self.workdir / "data"), "-p", str(port), *options]

    def _ready(self) -> bool:
        self.connect("postgres", connect_timeout=1).close()
        return True

    def connect(self, database: str = "postgres", **options):
        """A psycopg2 connection to ``database`` over TCP, signed in."""
        import psycopg2

        return psycopg2.connect(
            host="127.0.0.1", port=self.port, user=self.user, password=self.password, dbname=database, **options
        )

    def url(self, database: str = "postgres") -> str:
        from urllib.parse import quote

        secret = f":{quote(self.password, safe='')}" if self.password else ""
        return f"postgresql+psycopg2://{self.user}{secret}@127.0.0.1:{self.port}/{database}"

    @property
    def psql(self) -> str:
        """``psql`` from PATH, else the one beside this server's binaries."""
        return shutil.which("psql") or str(self.bin_dir / "psql")

    @property
    def passfile(self) -> Path:
        """A libpq password file (mode 0600) for this server, written on first use."""
        path = self.workdir / "pgpass"
        if not path.exists():
            write_private(path, f"127.0.0.1:{self.port}:*:{self.user}:{self.password or ''}\n")
        return path

    def create_database(self, name: str) -> str:
        """Create the database ``name`` (if missing) and return its URL."""
        from psycopg2 import sql

        connection = self.connect("postgres")
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cursor.fetchone() is None:
                    cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        finally:
            connection.close()
        return self.url(name)


class S3Server(Server):
    """moto's standalone S3-compatible server on 127.0.0.1, objects held in memory.

    ``endpoint`` is its URL; ``environment()`` the standard AWS variables that point boto3,
    pyarrow (pyiceberg's FileIO) and MLflow's artifact store at it.
    """

    name = "s3"
    access_key = "keel"
    region = "us-east-1"

    def __init__(self) -> None:
        super().__init__()
        # moto takes any key; a fresh one per server is a secret a test can look for in logs.
        self.secret_key = f"s3-{secrets.token_hex(12)}"

    def _command(self, port: int) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]

    def _ready(self) -> bool:
        import urllib.request

        with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1) as answer:
            return answer.status == 200

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key in ``bucket`` under ``prefix``."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def create_bucket(self, name: str) -> str:
        """Create the bucket ``name`` and return ``s3://name``."""
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"


class MlflowServer(Server):
    """``mlflow server`` on a loopback port; ``url`` is its tracking (and registry) URI.

    ``backend_store_uri`` defaults to SQLite and ``artifacts_destination`` to a folder, both in
    its scratch folder; ``environment`` is added to the server's own (e.g. ``S3Server.environment()``
    for an ``s3://`` destination).
    """

    name = "mlflow"
    stop_timeout = 15.0
    # `mlflow server` runs uvicorn as its child: started in a session of their own, the two are
    # stopped together as one process group, and a parent killed after a timeout orphans nothing.
    # Job execution (a huey consumer beside them) is not needed here.
    LAUNCH = (
        "import os, sys; os.setsid(); os.environ['MLFLOW_SERVER_ENABLE_JOB_EXECUTION'] = 'false'; "
        "os.execv(sys.executable, [sys.executable, '-m', 'mlflow', *sys.argv[1:]])"
    )

    def __init__(
        self,
        backend_store_uri: str | None = None,
        artifacts_destination: str | None = None,
        environment: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.backend_store_uri = backend_store_uri
        self.artifacts_destination = artifacts_destination
        self.environment = dict(environment or {})

    def _popen_options(self) -> dict:
        # The store's URI carries its password: it goes in through the environment (which
        # `mlflow server` reads for --backend-store-uri), never on the command line `ps` shows.
        store = self.backend_store_uri or f"sqlite:///{self.workdir / 'mlflow.db'}"
        return {"env": os.environ | self.environment | {"MLFLOW_BACKEND_STORE_URI": store}}

    def _command(self, port: int) -> list[str]:
        return [
            sys.executable,
            "-c",
            self.LAUNCH,
            "server",
            "--artifacts-destination",
            self.artifacts_destination or str(self.workdir / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ]

    def _ready(self) -> bool:
        with urllib.request.urlopen(f"{self.url}/health", timeout=1) as answer:
            return answer.status == 200

    def _terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, sig)
                try:
                    self.process.wait(self.stop_timeout)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.process = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"
