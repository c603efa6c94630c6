"""A served world for the serving tests: a real registry (file-backed MLflow) and a real online store.

``world`` lands payments and labels, trains v1 (champion) and v2 (challenger) of ``churn``
on the ``spend`` and ``spend_ratio`` groups, and publishes and syncs yesterday's features
online. ``client_for`` serves it through ``serving.app.create_app``.
"""

import dataclasses
import datetime as dt
import logging

import pytest
from fastapi.testclient import TestClient
from schemathesis import checks
from schemathesis.core.failures import FailureGroup

from keel.config import ServingSettings
from keel.features.materialize import backfill
from keel.models import promotion, registry
from keel.models.spec import train
from keel.online.store import OnlineStore
from keel.online.sync import sync_group
from keel.project import Project
from keel.store import FeatureStore
from serving.app import create_app
from serving.breaker import CircuitBreaker
from serving.models import ModelSet
from serving.server import Server
from tests.conftest import payment_rows
from tests.keel.test_models import START, land_labels, spec, synthetic
from tests.keel.test_store import groups_for, land

LAST = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


@pytest.fixture
def online_project(payments, outcomes) -> Project:
    spend, ratio = groups_for(payments)
    spend = dataclasses.replace(spend, online=True)
    ratio = dataclasses.replace(ratio, online=True, upstream=(spend,))
    return Project(name="t", sources=(payments, outcomes), start_date=START.date(), feature_groups=(spend, ratio))


class Recorder:
    """An inference log that keeps what it is given."""

    def __init__(self):
        self.records, self.closed = [], False

    def log(self, record):
        self.records.append(record)

    def close(self):
        self.closed = True


@pytest.fixture
def world(online_project, settings, lake, payments, outcomes, buyer):
    """Events, labels, both groups published and synced online, v1 champion, v2 challenger."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    rows, labels = synthetic(4)
    land(lake, payments, rows, "p")
    land_labels(lake, outcomes, labels, "l")
    store = FeatureStore(lake, online_project)
    model = spec(buyer, outcomes)
    v1 = registry.log_and_register(settings, model, train(store, model, now=NOW))
    promotion.promote(settings, "churn", v1.version)
    other = spec(buyer, outcomes, params={"n_estimators": 10, "max_depth": 2})
    v2 = registry.log_and_register(settings, other, train(store, other, now=NOW))
    # Yesterday's payments of u0..u6, published and synced, so the online values are fresh.
    land(lake, payments, payment_rows(LAST, 40, prefix="fresh", amount=5.0), "fresh")
    online = OnlineStore.from_settings(settings)
    for group in online_project.feature_groups:
        assert backfill(store, group, LAST, LAST, run_id=f"fg-{group.name}")[2] is not None
        sync_group(lake, online, group)
    return {"store": store, "online": online, "model": model, "v1": v1, "v2": v2}


def client_for(world, settings, online_project, *, names=("churn",), fast_path=True, **overrides):
    """A TestClient of the app serving ``names`` (a name with no registered model keeps it unready)."""
    serving = dataclasses.replace(ServingSettings(), **overrides)
    models = ModelSet(settings, online_project, list(names))
    models.refresh()
    server = Server(
        models=models,
        online=world["online"],
        project=online_project,
        canary=serving.canary,
        shadow=serving.shadow,
        breaker=CircuitBreaker(serving.breaker_failures, serving.breaker_reset_s),
        inference_log=Recorder(),
    )
    return TestClient(create_app(server, serving, fast_path=fast_path)), server


CONFORMANCE = (checks.status_code_conformance, checks.content_type_conformance, checks.response_schema_conformance)


def conformance_failures(case, response, *, server_errors: bool = False) -> list[str]:
    """What schemathesis' response-conformance checks say of one answer (nothing when it conforms);
    a 5xx fails too unless ``server_errors`` are what the caller provoked."""
    try:
        case.validate_response(
            response, checks=[*CONFORMANCE, *(() if server_errors else (checks.not_a_server_error,))]
        )
    except FailureGroup as group:
        return [f"{case.method} {case.formatted_path} -> {response.status_code}: {f.title}" for f in group.exceptions]
    return []
