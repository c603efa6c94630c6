"""A served world for the serving tests: a real registry (file-backed MLflow) and a real online store.

``world`` lands payments and labels, trains v1 (champion) and v2 (challenger) of ``churn``
on the ``spend`` and ``spend_ratio`` groups, and publishes and syncs yesterday's features
online. ``tests.factories.serving.client_for`` serves it through ``serving.app.create_app``.
"""

import datetime as dt
import logging

import pytest

from keel.features.materialize import backfill
from keel.models import promotion, registration
from keel.models.training import train
from keel.online.store import OnlineStore
from keel.online.sync import sync_group
from keel.project import Project
from keel.store import FeatureStore
from tests.factories.features import land, online_groups
from tests.factories.models import START, land_labels, spec, synthetic
from tests.factories.payments import payment_rows
from tests.factories.serving import LAST

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


@pytest.fixture
def online_project(payments, outcomes) -> Project:
    spend, ratio = online_groups(payments)
    return Project(name="t", sources=(payments, outcomes), start_date=START.date(), feature_groups=(spend, ratio))


@pytest.fixture
def world(online_project, settings, lake, payments, outcomes, buyer):
    """Events, labels, both groups published and synced online, v1 champion, v2 challenger."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    rows, labels = synthetic(4)
    land(lake, payments, rows, "p")
    land_labels(lake, outcomes, labels, "l")
    store = FeatureStore(lake, online_project)
    model = spec(buyer, outcomes)
    v1 = registration.log_and_register(settings, model, train(store, model, now=NOW))
    promotion.promote(settings, "churn", v1.version)
    other = spec(buyer, outcomes, params={"n_estimators": 10, "max_depth": 2})
    v2 = registration.log_and_register(settings, other, train(store, other, now=NOW))
    # Yesterday's payments of u0..u6, published and synced, so the online values are fresh.
    land(lake, payments, payment_rows(LAST, 40, prefix="fresh", amount=5.0), "fresh")
    online = OnlineStore.from_settings(settings)
    for group in online_project.feature_groups:
        assert backfill(store, group, LAST, LAST, run_id=f"fg-{group.name}")[2] is not None
        sync_group(lake, online, group)
    return {"store": store, "online": online, "model": model, "v1": v1, "v2": v2}
