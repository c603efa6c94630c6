"""Shared fixtures: every test gets its own KEEL_HOME, catalog and warehouse under tmp_path."""

import datetime as dt
import os

import pyarrow as pa
import pytest

from keel.config import Settings
from keel.dsl import Column, Entity, EventSource
from keel.lakehouse.tables import Lakehouse

pytest_plugins = ["tests.servers"]

# Keep third-party tools quiet and offline for every test, whatever the caller's shell exports.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")

KEEL_VARIABLES = (
    "KEEL_HOME",
    "KEEL_CATALOG_URI",
    "KEEL_WAREHOUSE",
    "KEEL_REDIS_URL",
    "KEEL_KAFKA_BOOTSTRAP",
    "KEEL_MLFLOW_URI",
    "KEEL_MLFLOW_UI_URL",
    "KEEL_PROJECT",
    "KEEL_LANDING",
    "KEEL_CODE_VERSION",
    "KEEL_ALERT_WEBHOOK",
    "KEEL_ALERT_FILE",
    "KEEL_DAGSTER_URL",
)


@pytest.fixture
def keel_home(tmp_path, monkeypatch):
    """A private KEEL_HOME set in the environment, with every other KEEL_* variable cleared."""
    for name in KEEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "keel"
    home.mkdir()
    monkeypatch.setenv("KEEL_HOME", str(home))
    monkeypatch.setenv("KEEL_CODE_VERSION", "test-sha")
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    (home / "dagster").mkdir()
    return home


@pytest.fixture
def settings(keel_home) -> Settings:
    return Settings.from_env()


@pytest.fixture
def lake(settings) -> Lakehouse:
    return Lakehouse.from_settings(settings)


@pytest.fixture
def buyer() -> Entity:
    return Entity(name="buyer", join_keys={"user_id": "string"})


def payments_source(buyer: Entity) -> EventSource:
    """A small source with every column type and constraint the validator knows."""
    return EventSource(
        name="payments",
        entity=buyer,
        columns=(
            Column("amount", "float64", nullable=False, min=0, max=10_000),
            Column("currency", "string", nullable=False, allowed=("EUR", "USD")),
            Column("items", "int64", min=1, max=100),
            Column("is_refund", "bool", nullable=False),
        ),
    )


@pytest.fixture
def payments(buyer) -> EventSource:
    return payments_source(buyer)


def payment_rows(day: dt.date, n: int, *, prefix: str = "p", amount: float = 10.0) -> list[dict]:
    """``n`` valid payment rows spread over ``day``, event ids ``{prefix}-{day}-{i}``."""
    base = dt.datetime.combine(day, dt.time(), dt.UTC)
    return [
        {
            "event_id": f"{prefix}-{day.isoformat()}-{i}",
            "user_id": f"u{i % 7}",
            "event_ts": base + dt.timedelta(minutes=7 * i % 1440),
            "amount": amount + i,
            "currency": "EUR" if i % 2 else "USD",
            "items": 1 + i % 5,
            "is_refund": i % 11 == 0,
        }
        for i in range(n)
    ]


@pytest.fixture
def table(lake, payments) -> str:
    """raw.payments, created empty and partitioned by day of event_ts."""
    lake.ensure_table(payments.table_name, payments.arrow_schema(), day_column="event_ts")
    return payments.table_name


def as_table(payments: EventSource, rows: list[dict]) -> pa.Table:
    """Rows as an Arrow table with the source's schema."""
    return pa.Table.from_pylist(rows, schema=payments.arrow_schema())


@pytest.fixture
def outcomes(buyer) -> EventSource:
    """Delayed labels of ``buyer``: whether they churned, and their spend afterwards."""
    return EventSource(
        name="outcomes",
        entity=buyer,
        columns=(Column("churned", "bool", nullable=False), Column("spend_next", "float64")),
    )


@pytest.fixture
def model_project(payments, outcomes):
    """Payments with the 'spend' and 'spend_ratio' groups, and the outcomes label source: what the model tests train on."""
    from keel.project import Project
    from tests.keel.test_store import groups_for

    spend, ratio = groups_for(payments)
    start = dt.date(2026, 3, 1)
    return Project(name="t", sources=(payments, outcomes), start_date=start, feature_groups=(spend, ratio))
