"""Reproducing a registered version: the training set rebuilt from its recorded snapshots is
identical after late events, label corrections and new labels land, and retrains the same."""

import dataclasses
import datetime as dt
import logging

import numpy as np
import pyarrow as pa
import pytest

from keel.features.training_sets import table_digest
from keel.models import registration
from keel.models.registry_client import ModelRegistryError, mlflow_client
from keel.models.reproduce import reproduce
from keel.models.spec import ModelError, load_models, model_named
from keel.models.training import train
from keel.store import FeatureStore
from tests.factories.features import groups_for, land
from tests.factories.models import START, land_labels, spec, synthetic

LATER = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


@pytest.fixture
def store(lake, model_project) -> FeatureStore:
    return FeatureStore(lake, model_project)


@pytest.fixture
def registered(store, settings, lake, payments, outcomes, buyer):
    """v1 trained and registered, then the world moves on: late payments in old weeks, a
    later week of events and labels, and corrections to labels v1 trained on."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    rows, labels = synthetic(5)
    land(lake, payments, rows, "p1")
    land_labels(lake, outcomes, labels, "l1")
    model = spec(buyer, outcomes, params={"n_estimators": 30, "subsample": 0.7, "colsample_bytree": 0.7})
    # The label cutoff falls after the last label week, so rows landed later but timed
    # before it are what a reproduction must not read.
    first = train(store, model, now=START + dt.timedelta(weeks=9))
    info = registration.log_and_register(settings, model, first, code_version="sha-1")

    more_rows, more_labels = synthetic(6, weeks=9, prefix="x")
    land(lake, payments, more_rows, "p2")
    corrected = [{**row, "churned": not row["churned"]} for row in labels[: len(labels) // 3]]
    land_labels(lake, outcomes, more_labels + corrected, "l2")
    return model, first, info


def test_recorded_lineage_rebuilds_an_identical_training_set(store, settings, registered):
    model, first, info = registered
    out = reproduce(store, settings, model, info.version)

    assert out.identical, (out.digest, out.recorded_digest)
    assert out.result.training_set.table.equals(first.training_set.table)
    assert out.rows == out.recorded_rows == first.training_set.table.num_rows
    assert out.snapshots == first.training_set.snapshots
    assert out.changed == []
    for metric, (recorded, reproduced) in out.metrics.items():
        assert reproduced == pytest.approx(recorded, rel=1e-12), metric
    assert np.array_equal(out.result.predictions, first.predictions)
    # By alias too.
    assert reproduce(store, settings, model, "challenger").identical


def test_the_same_model_trained_today_reads_a_different_set(store, registered):
    model, first, _ = registered
    today = train(store, model, now=LATER)
    assert today.training_set.digest() != first.training_set.digest()
    assert today.training_set.table.num_rows > first.training_set.table.num_rows


def test_the_recorded_declaration_is_used_when_the_current_one_changed(store, settings, payments, registered):
    model, first, info = registered
    edited = dataclasses.replace(model, features=("spend",), params={"n_estimators": 5})
    out = reproduce(store, settings, edited, info.version)
    assert out.identical
    assert out.result.features == first.features
    assert out.result.params["n_estimators"] == 30

    # A group whose definition changed is named: today's definition computes the set.
    spend, ratio = groups_for(payments, version=2, window="3d")
    changed = FeatureStore(
        store.lake,
        dataclasses.replace(store.project, feature_groups=(spend, ratio)),
    )
    out = reproduce(changed, settings, model, info.version)
    assert not out.identical
    assert any(c.startswith("spend: trained on v1-") and ", now v2-" in c for c in out.changed)


def test_a_version_without_lineage_tags_names_the_fix(store, settings, registered):
    model, _, info = registered
    client = mlflow_client(settings)
    client.delete_model_version_tag("churn", str(info.version), "training_set_digest")
    with pytest.raises(ModelRegistryError, match=r"lacks the lineage tag\(s\) training_set_digest"):
        reproduce(store, settings, model, info.version)


def test_table_digest_sees_values_nulls_order_and_types_not_chunking():
    base = pa.table({"k": ["a", "b", "c"], "x": pa.array([1.0, None, 3.0])})
    chunked = pa.concat_tables([base.slice(0, 1), base.slice(1)])
    assert table_digest(chunked) == table_digest(base)
    assert table_digest(base.set_column(1, "x", pa.array([1.0, 0.0, 3.0]))) != table_digest(base)
    assert table_digest(base.set_column(1, "x", pa.array([1.0, float("nan"), 3.0]))) != table_digest(base)
    assert table_digest(base.take([1, 0, 2])) != table_digest(base)
    assert table_digest(base.set_column(1, "x", pa.array([1.0, None, 3.0], pa.float32()))) != table_digest(base)
    assert table_digest(base.rename_columns(["k", "y"])) != table_digest(base)


def test_models_load_from_the_project_package():
    models = load_models("pipelines")
    assert model_named(models, "churn").name == "churn"
    with pytest.raises(ModelError, match=r"model 'churm' is not declared \(declared: churn\)"):
        model_named(models, "churm")
    with pytest.raises(ModelError, match="there is no module 'nowhere.models'"):
        load_models("nowhere")
