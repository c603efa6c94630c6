"""Configuration: every ``KEEL_*`` environment variable is read here, and only here.

Defaults give the embedded, server-less setup under ``KEEL_HOME``; production backends are
chosen by URI (PostgreSQL catalog, S3 warehouse, Redis, Kafka, an MLflow server). A bad
value fails at start with a message naming the variable, the value and the fix.

Every variable may instead be given as a file: ``KEEL_X_FILE=/run/secrets/x`` holds the value of
``KEEL_X`` (the convention of Docker and Kubernetes secrets), so credentials in URIs need not
sit in the environment. ``hide_password`` and ``redact_url`` are how such values are shown.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path
from urllib.parse import urlparse


class ConfigError(ValueError):
    """An environment variable holds a value Keel cannot use."""


@dataclass(frozen=True)
class Variable:
    name: str
    help: str


# `make mlflow-ui` serves the MLflow UI of the embedded store here.
LOCAL_MLFLOW_UI = "http://127.0.0.1:5000"

VARIABLES = {
    "home": Variable("KEEL_HOME", "root folder for embedded state (default ./.keel)"),
    "catalog_uri": Variable(
        "KEEL_CATALOG_URI",
        "Iceberg catalog: sqlite:///path.db (default), postgresql+psycopg2://..., or http(s):// for a REST catalog",
    ),
    "warehouse": Variable("KEEL_WAREHOUSE", "where table files live: file:///path (default) or s3://bucket/prefix"),
    "s3_endpoint": Variable(
        "KEEL_S3_ENDPOINT",
        "S3-compatible object storage for an s3:// warehouse, http(s)://host:port (default: AWS_ENDPOINT_URL_S3 "
        "or AWS_ENDPOINT_URL when set, else AWS S3); credentials and region come from the usual AWS variables",
    ),
    "redis_url": Variable(
        "KEEL_REDIS_URL",
        "online store: redis://host:port/db, or a Redis Cluster as redis+cluster://host:port[,host:port...]/0; "
        "unset uses a SQLite file",
    ),
    "kafka_bootstrap": Variable(
        "KEEL_KAFKA_BOOTSTRAP", "Kafka bootstrap servers host:port[,host:port]; unset uses a landing folder"
    ),
    "mlflow_uri": Variable("KEEL_MLFLOW_URI", "MLflow tracking URI (default sqlite under KEEL_HOME)"),
    "mlflow_ui_url": Variable(
        "KEEL_MLFLOW_UI_URL",
        "address of the MLflow UI, for links to drift reports (default: KEEL_MLFLOW_URI when it is an http(s) "
        f"server, which serves the UI too, else {LOCAL_MLFLOW_UI}, where `make mlflow-ui` serves it)",
    ),
    "project": Variable("KEEL_PROJECT", "Python module holding the project's declarations (default 'pipelines')"),
    "landing": Variable("KEEL_LANDING", "folder where files to ingest are dropped, one sub-folder per source"),
    "code_version": Variable("KEEL_CODE_VERSION", "code version stamped on every snapshot (default: the git sha)"),
    "alert_webhook": Variable(
        "KEEL_ALERT_WEBHOOK", "Slack-compatible incoming webhook for monitoring alerts, http(s)://...; unset sends none"
    ),
    "alert_file": Variable(
        "KEEL_ALERT_FILE", "JSONL file every monitoring alert is appended to (default KEEL_HOME/alerts.jsonl)"
    ),
    "dagster_url": Variable(
        "KEEL_DAGSTER_URL", "address of the Dagster UI, for run links in alerts (default http://127.0.0.1:3000)"
    ),
    "sensor_interval_s": Variable(
        "KEEL_SENSOR_INTERVAL_S",
        "seconds between evaluations of every sensor, 1 to 86400 (default: each sensor's own, 30 or 60)",
    ),
    "compute": Variable(
        "KEEL_COMPUTE",
        "Dask scheduler that runs the entity shards of training sets and backfills, tcp://host:8786; "
        "unset runs them in this process, one after another",
    ),
    "max_memory": Variable(
        "KEEL_MAX_MEMORY",
        "memory one shard may take, e.g. 4GB or 512MB; sets the number of shards (default: half the machine's memory)",
    ),
    "shards": Variable(
        "KEEL_SHARDS",
        "entity shards of every training set and backfill, a power of two (default: from KEEL_MAX_MEMORY)",
    ),
}

_HOST_PORT = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$")


def s3_region(environ: Mapping[str, str] | None = None) -> str:
    """The region an S3 client signs for: AWS_REGION, else AWS_DEFAULT_REGION, else us-east-1
    (S3-compatible stores at ``KEEL_S3_ENDPOINT`` accept any)."""
    env = os.environ if environ is None else environ
    return env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"


@dataclass(frozen=True)
class Settings:
    home: Path
    catalog_uri: str
    warehouse: str
    s3_endpoint: str | None
    redis_url: str | None
    kafka_bootstrap: str | None
    mlflow_uri: str
    mlflow_ui_url: str
    project: str
    landing: Path
    code_version: str
    alert_webhook: str | None
    alert_file: Path
    dagster_url: str
    sensor_interval_s: int | None = None
    compute: str | None = None
    max_memory: int | None = None
    shards: int | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ

        def get(key: str) -> str | None:
            return read_variable(env, VARIABLES[key].name)

        home = Path(get("home") or ".keel").expanduser().resolve()
        if home.exists() and not home.is_dir():
            _fail("home", str(home), "point it at a folder (it is created if missing)")

        catalog_uri = get("catalog_uri") or f"sqlite:///{home / 'catalog.db'}"
        _check_catalog_uri(catalog_uri)

        warehouse = get("warehouse") or (home / "warehouse").as_uri()
        scheme = urlparse(warehouse).scheme
        if scheme not in ("file", "s3", "s3a", "gs", "abfs", "abfss"):
            _fail("warehouse", warehouse, "use file:///absolute/path or s3://bucket/prefix")

        s3_endpoint = get("s3_endpoint") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
        if s3_endpoint and not _is_http_url(s3_endpoint):
            _fail("s3_endpoint", s3_endpoint, "use the object store's http(s) address, e.g. http://127.0.0.1:9000")

        redis_url = get("redis_url")
        cluster = r"rediss?\+cluster://([^@/]*@)?([^@/,]+:\d+)(,[^@/,]+:\d+)*/?0?"
        if (
            redis_url
            and urlparse(redis_url).scheme not in ("redis", "rediss", "unix")
            and not re.fullmatch(cluster, redis_url)
        ):
            _fail(
                "redis_url",
                redis_url,
                "use redis://host:6379/0, rediss://..., unix:///path.sock, or for a Redis Cluster "
                "redis+cluster://host:6379[,host:6379...]/0 (rediss+cluster:// for TLS; database 0 only)",
            )

        kafka = get("kafka_bootstrap")
        if kafka:
            for server in kafka.split(","):
                if not _HOST_PORT.match(server.strip()):
                    _fail("kafka_bootstrap", kafka, "use host:port, comma-separated for several brokers")

        mlflow_uri = get("mlflow_uri") or f"sqlite:///{home / 'mlflow.db'}"
        if not re.match(r"^(sqlite|postgresql|mysql|https?|file|databricks)[+:a-z0-9]*:", mlflow_uri):
            _fail("mlflow_uri", mlflow_uri, "use sqlite:///path.db, postgresql://..., or http://host:5000")

        mlflow_ui_url = get("mlflow_ui_url") or _mlflow_ui_default(mlflow_uri)
        if not _is_http_url(mlflow_ui_url):
            _fail("mlflow_ui_url", mlflow_ui_url, "use the UI's http(s) address, e.g. http://mlflow.internal:5000")
        _no_credentials("mlflow_ui_url", mlflow_ui_url)
        mlflow_ui_url = mlflow_ui_url.rstrip("/")

        project = get("project") or "pipelines"
        if not re.match(r"^[A-Za-z_][\w.]*$", project):
            _fail("project", project, "give an importable module name such as 'pipelines'")

        landing = Path(get("landing") or home / "landing").expanduser().resolve()

        # A Slack webhook URL is a secret: errors show it redacted.
        alert_webhook = get("alert_webhook")
        if alert_webhook and not _is_http_url(alert_webhook):
            _fail(
                "alert_webhook",
                redact_url(alert_webhook),
                "use an http(s) URL such as https://hooks.slack.com/services/...",
            )

        alert_file = Path(get("alert_file") or home / "alerts.jsonl").expanduser().resolve()
        if alert_file.is_dir():
            _fail("alert_file", str(alert_file), "give a file path such as /var/log/keel/alerts.jsonl, not a folder")

        dagster_url = get("dagster_url") or "http://127.0.0.1:3000"
        if not _is_http_url(dagster_url):
            _fail("dagster_url", dagster_url, "use the UI's http(s) address, e.g. http://dagster.internal:3000")
        _no_credentials("dagster_url", dagster_url)
        dagster_url = dagster_url.rstrip("/")

        interval = get("sensor_interval_s")
        if interval is not None and not (interval.isdigit() and 1 <= int(interval) <= 86400):
            _fail("sensor_interval_s", interval, "give whole seconds from 1 to 86400, e.g. 30")

        return cls(
            home=home,
            catalog_uri=catalog_uri,
            warehouse=warehouse,
            s3_endpoint=s3_endpoint.rstrip("/") if s3_endpoint else None,
            redis_url=redis_url,
            kafka_bootstrap=kafka,
            mlflow_uri=mlflow_uri,
            mlflow_ui_url=mlflow_ui_url,
            project=project,
            landing=landing,
            code_version=get("code_version") or git_sha(),
            alert_webhook=alert_webhook,
            alert_file=alert_file,
            dagster_url=dagster_url,
            sensor_interval_s=int(interval) if interval is not None else None,
            compute=_compute_address(get("compute")),
            max_memory=_memory(get("max_memory")),
            shards=_shards(get("shards")),
        )

    def as_env(self) -> dict[str, str]:
        """The settings as environment variables, e.g. for a child process."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[VARIABLES[f.name].name] = str(value)
        return out

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    @property
    def staging(self) -> Path:
        """Where ingests keep their staging databases while they run; `keel maintain` removes what
        a killed ingest left here."""
        return self.home / "staging"


SERVING_VARIABLES = {
    "models": Variable(
        "KEEL_SERVE_MODELS", "models to serve, comma-separated (default: every model KEEL_PROJECT declares)"
    ),
    "poll_s": Variable("KEEL_SERVE_POLL_S", "seconds between registry polls for newly promoted versions (default 30)"),
    "canary": Variable("KEEL_SERVE_CANARY", "share of entities answered by the challenger, 0 to 1 (default 0)"),
    "shadow": Variable(
        "KEEL_SERVE_SHADOW", "true: also score the challenger on every request, unreturned (default false)"
    ),
    "api_keys": Variable("KEEL_SERVE_API_KEYS", "comma-separated API keys the admin endpoints require"),
    "protect_predict": Variable("KEEL_SERVE_PROTECT_PREDICT", "true: predictions need an API key too (default false)"),
    "max_body_bytes": Variable("KEEL_SERVE_MAX_BODY_BYTES", "largest request body accepted, in bytes (default 65536)"),
    "max_entities": Variable("KEEL_SERVE_MAX_ENTITIES", "most entity ids in one request (default 1000)"),
    "online_timeout_ms": Variable(
        "KEEL_SERVE_ONLINE_TIMEOUT_MS", "time bound of an online-store read, in ms (default 50)"
    ),
    "breaker_failures": Variable(
        "KEEL_SERVE_BREAKER_FAILURES", "online-store failures in a row that open the circuit breaker (default 5)"
    ),
    "breaker_reset_s": Variable(
        "KEEL_SERVE_BREAKER_RESET_S", "seconds the breaker stays open before a trial (default 5)"
    ),
}


@dataclass(frozen=True)
class ServingSettings:
    """How ``keel serve`` behaves; every value from a ``KEEL_SERVE_*`` variable."""

    models: tuple[str, ...] = ()
    poll_s: float = 30.0
    canary: float = 0.0
    shadow: bool = False
    api_keys: tuple[str, ...] = ()
    protect_predict: bool = False
    max_body_bytes: int = 65536
    max_entities: int = 1000
    online_timeout_ms: float = 50.0
    breaker_failures: int = 5
    breaker_reset_s: float = 5.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServingSettings:
        env = os.environ if environ is None else environ
        out: dict = {}
        for key, var in SERVING_VARIABLES.items():
            text = read_variable(env, var.name)
            if not text:
                continue
            default = getattr(cls, key)
            if isinstance(default, tuple):
                out[key] = tuple(v.strip() for v in text.split(",") if v.strip())
            elif isinstance(default, bool):
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ConfigError(f"{var.name}={text!r} is not usable: use true or false ({var.help})")
                out[key] = text.lower() in ("true", "1", "yes")
            else:
                try:
                    value = type(default)(text)
                except ValueError:
                    value = None
                low, high = (0.0, 1.0) if key == "canary" else (1e-9, float("inf"))
                if value is None or not low <= value <= high:
                    bound = "a number from 0 to 1" if key == "canary" else f"a positive {type(default).__name__}"
                    raise ConfigError(f"{var.name}={text!r} is not usable: give {bound} ({var.help})")
                out[key] = value
        return cls(**out)


def read_variable(environ: Mapping[str, str], name: str) -> str | None:
    """The value of ``name``, or the content of the file ``name_FILE`` names; None when neither is set.

    Setting both is an error (which one wins would be a guess), as is a file that cannot be read
    or is empty; the message names the variable and the path, never the value.
    """
    value = (environ.get(name) or "").strip()
    path = (environ.get(f"{name}_FILE") or "").strip()
    if not path:
        return value or None
    if value:
        raise ConfigError(f"{name} and {name}_FILE are both set: keep one (the file is for secrets)")
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(
            f"{name}_FILE={path!r} cannot be read ({reason}): point it at a file holding {name}"
        ) from None
    if not text:
        raise ConfigError(f"{name}_FILE={path!r} is empty: write the value of {name} into it")
    return text


def _compute_address(value: str | None) -> str | None:
    if value and not re.match(r"^(tcp|tls)://[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$", value):
        _fail("compute", value, "give the Dask scheduler's address, e.g. tcp://scheduler:8786")
    return value or None


_UNITS = {"": 1, "B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


def _memory(value: str | None) -> int | None:
    if value is None:
        return None
    match = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*$", value.upper())
    unit = match.group(2).rstrip("B") + "B" if match and match.group(2) else ""
    if not match or float(match.group(1)) * _UNITS[unit] < 64 << 20:
        _fail("max_memory", value, "give at least 64MB, e.g. 4GB, 512MB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[unit])


def _shards(value: str | None) -> int | None:
    if value is None:
        return None
    if not value.isdigit() or int(value) < 1 or int(value) & (int(value) - 1) or int(value) > 4096:
        _fail("shards", value, "give a power of two from 1 to 4096, e.g. 8")
    return int(value)


def _fail(key: str, value: str, fix: str) -> None:
    var = VARIABLES[key]
    raise ConfigError(f"{var.name}={hide_password(value)!r} is not usable: {fix} ({var.help})")


def _no_credentials(key: str, url: str) -> None:
    """UI addresses end up in links (alerts, Dagster metadata, reports): none may carry a password."""
    if "@" in urlparse(url).netloc:
        _fail(key, url, "give the address without user:password@ (links to it are shown in alerts and Dagster)")


def _mlflow_ui_default(mlflow_uri: str) -> str:
    """A tracking server serves the UI at its own address (taken without credentials, which would
    end up in links); a database store serves none, so the UI is where ``make mlflow-ui`` puts it."""
    if not _is_http_url(mlflow_uri):
        return LOCAL_MLFLOW_UI
    parts = urlparse(mlflow_uri)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def _is_http_url(url: str) -> bool:
    parts = urlparse(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def redact_url(url: str) -> str:
    """``url`` safe to print: scheme and host only, since webhook URLs carry their token in
    the path (and may carry credentials before the host)."""
    parts = urlparse(url)
    if parts.scheme and parts.netloc:
        host = parts.netloc.rpartition("@")[2]
        hidden = parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc
        return f"{parts.scheme}://{host}/***" if hidden else f"{parts.scheme}://{host}"
    return f"<{len(url)} characters, hidden>"


def hide_password(uri: str) -> str:
    """``uri`` with the password in its user part (``user:PASSWORD@host``) and in a
    ``password=`` query parameter replaced by ``***``; everything else as it is."""
    parts = urlparse(uri)
    if not parts.scheme or "@" not in parts.netloc:
        shown = uri
    else:
        userinfo, _, host = parts.netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        shown = parts._replace(netloc=f"{user}{':***' if colon else ''}@{host}").geturl()
    return re.sub(r"(?i)(password=)[^&;\s]*", r"\1***", shown)


def _check_catalog_uri(uri: str) -> None:
    scheme = urlparse(uri).scheme
    if scheme.startswith("sqlite"):
        path = uri.split(":///", 1)[-1] if ":///" in uri else ""
        if not path:
            _fail("catalog_uri", uri, "give an absolute file path: sqlite:////abs/path/catalog.db")
    elif scheme.startswith("postgresql"):
        if not urlparse(uri).hostname:
            _fail("catalog_uri", uri, "give a host: postgresql+psycopg2://user:pass@host:5432/db")
    elif scheme not in ("http", "https"):
        _fail("catalog_uri", uri, "use sqlite:///..., postgresql+psycopg2://... or http(s):// (REST)")


@cache
def git_sha() -> str:
    """The checkout's commit, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else "unknown"
