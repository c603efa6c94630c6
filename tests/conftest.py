"""Shared fixtures: every test gets its own KEEL_HOME, catalog and warehouse under tmp_path."""

import datetime as dt
import os

import pytest

from keel.config import Settings
from keel.dsl import Column, Entity, EventSource
from keel.lakehouse.tables import Lakehouse
from keel.project import Project
from tests.factories.features import groups_for
from tests.factories.payments import payments_source

pytest_plugins = ["tests.servers"]

# Keep third-party tools quiet and offline for every test, whatever the caller's shell exports.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")

KEEL_VARIABLES = (
    "KEEL_HOME",
    "KEEL_CATALOG_URI",
    "KEEL_WAREHOUSE",
    "KEEL_S3_ENDPOINT",
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


@pytest.fixture
def payments(buyer) -> EventSource:
    return payments_source(buyer)


@pytest.fixture
def table(lake, payments) -> str:
    """raw.payments, created empty and partitioned by day of event_ts."""
    lake.ensure_table(payments.table_name, payments.arrow_schema(), day_column="event_ts")
    return payments.table_name


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
    spend, ratio = groups_for(payments)
    start = dt.date(2026, 3, 1)
    return Project(name="t", sources=(payments, outcomes), start_date=start, feature_groups=(spend, ratio))


# The end-to-end tests take minutes each; `make test` spreads the suite over the cores
# (pytest-xdist, one file at a time), and handing the longest files out first keeps one core
# from finishing a long test alone at the end.
LONGEST_FIRST = ("tests/e2e/test_demo_production.py", "tests/e2e/test_demo.py", "tests/e2e/test_dagster_ui.py")


def pytest_collection_modifyitems(session, config, items):
    def rank(item) -> int:
        path = item.nodeid.split("::")[0]
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)
