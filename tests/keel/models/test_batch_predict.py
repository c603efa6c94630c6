"""Batch prediction on real Iceberg tables and a real file-backed MLflow: each day's active
entities scored by the champion, with lineage, idempotent per day, through write-audit-publish."""

import datetime as dt
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from keel.features.materialize import backfill, day_end
from keel.models import promotion, registration, registry
from keel.models.batch_predict import BatchPredictError, predictions_table, score_days, stage_scores
from keel.models.registry_client import ModelRegistryError
from keel.models.training import predict, train
from keel.store import FeatureStore
from tests.factories.features import land
from tests.factories.models import START, land_labels, spec, synthetic

FIRST = (START + dt.timedelta(weeks=6)).date()
DAYS = [FIRST + dt.timedelta(days=i) for i in range(10)]  # crosses a 7-day chunk boundary
NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


@pytest.fixture
def store(lake, model_project) -> FeatureStore:
    return FeatureStore(lake, model_project)


@pytest.fixture
def champion(store, settings, lake, payments, outcomes, buyer):
    """Events, labels and both feature tables for the scored days; v1 of 'churn' is champion."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    rows, labels = synthetic(3)
    land(lake, payments, rows, "p")
    land_labels(lake, outcomes, labels, "l")
    for group in store.project.feature_groups:
        _, report, snapshot = backfill(store, group, DAYS[0], DAYS[-1], run_id=f"fg-{group.name}")
        assert snapshot is not None, report.summary()
    model = spec(buyer, outcomes)
    result = train(store, model, now=NOW)
    info = registration.log_and_register(settings, model, result, code_version="sha-1")
    promotion.promote(settings, "churn", info.version)
    return model, info


def test_each_day_scores_its_active_entities_with_lineage(store, settings, lake, champion):
    model, info = champion
    scored, report, snapshot = score_days(store, settings, model, DAYS, run_id="score-1")
    assert report.success, report.summary()
    assert snapshot == lake.head(predictions_table(model))

    out = lake.read(predictions_table(model)).sort_by([("feature_ts", "ascending"), ("user_id", "ascending")])
    spend_rows = lake.read("features.spend")
    for day in DAYS:
        on_day = pc.equal(out.column("feature_ts"), pa.scalar(day_end(day), pa.timestamp("us", tz="UTC")))
        active = spend_rows.filter(
            pc.equal(spend_rows.column("feature_ts"), pa.scalar(day_end(day), pa.timestamp("us", tz="UTC")))
        )
        assert sorted(out.filter(on_day).column("user_id").to_pylist()) == sorted(active.column("user_id").to_pylist())
        assert scored.entities_per_day[day] == active.num_rows > 0
    assert out.num_rows == sum(scored.entities_per_day.values())

    # Lineage on every row.
    assert set(out.column("model_name").to_pylist()) == {"churn"}
    assert set(out.column("model_version").to_pylist()) == {info.version}
    assert set(out.column("model_run_id").to_pylist()) == {info.run_id}
    assert set(out.column("run_id").to_pylist()) == {"score-1"}
    (snapshots,) = set(out.column("feature_snapshot_ids").to_pylist())
    assert json.loads(snapshots) == {
        "features.spend": scored.snapshots["features.spend"],
        "features.spend_ratio": scored.snapshots["features.spend_ratio"],
    }
    assert len(set(out.column("prediction_id").to_pylist())) == out.num_rows

    # The predictions are the champion's on the point-in-time features at each day's end.
    spine = out.select(["user_id", "feature_ts"])
    offline = store.get_training_set(spine, model.feature_refs(store.project), timestamp="feature_ts")
    loaded, features, _ = registry.load_model(settings, "churn", "champion")
    expected = predict(loaded, model, offline.table, features)
    np.testing.assert_allclose(out.column("prediction").to_numpy(), expected, rtol=0, atol=1e-12)
    nulls = sum(pc.is_null(offline.table.column(f)).to_numpy(zero_copy_only=False).astype(int) for f in features)
    assert out.column("missing_features").to_pylist() == nulls.tolist()


def test_rescoring_days_replaces_them_and_a_new_champion_takes_over(store, settings, lake, buyer, outcomes, champion):
    model, _ = champion
    score_days(store, settings, model, DAYS, run_id="score-1")
    first = lake.read(predictions_table(model))
    score_days(store, settings, model, DAYS[:3], run_id="score-2")
    again = lake.read(predictions_table(model))
    assert again.num_rows == first.num_rows
    assert set(again.column("run_id").to_pylist()) == {"score-1", "score-2"}

    better = spec(buyer, outcomes, params={"n_estimators": 60, "max_depth": 2})
    v2 = registration.log_and_register(settings, better, train(store, better, now=NOW), code_version="sha-2")
    promotion.promote(settings, "churn", v2.version)
    score_days(store, settings, model, DAYS[-1:], run_id="score-3")
    latest = lake.read(predictions_table(model))
    assert latest.num_rows == first.num_rows
    last = pc.equal(latest.column("feature_ts"), pa.scalar(day_end(DAYS[-1]), pa.timestamp("us", tz="UTC")))
    assert set(latest.filter(last).column("model_version").to_pylist()) == {v2.version}
    assert set(latest.filter(pc.invert(last)).column("model_version").to_pylist()) == {1}


def test_days_without_features_or_models_without_champion_are_refused(store, settings, lake, champion):
    model, _ = champion
    late = DAYS[-1] + dt.timedelta(days=1)
    with pytest.raises(BatchPredictError, match=rf"no feature rows on {late} in features.spend, features.spend_ratio"):
        stage_scores(store, settings, model, [DAYS[-1], late], run_id="x")
    assert not lake.exists(predictions_table(model))
    with pytest.raises(ModelRegistryError, match="has no version with alias 'staging'"):
        stage_scores(store, settings, model, DAYS, run_id="x", alias="staging")
    with pytest.raises(BatchPredictError, match="no days to score"):
        stage_scores(store, settings, model, [], run_id="x")


def test_the_audit_holds_back_a_staged_day_with_a_broken_row(store, settings, lake, champion):
    from keel.lakehouse import wap
    from keel.models.batch_predict import audit_scores

    model, _ = champion
    scored = stage_scores(store, settings, model, DAYS[:2], run_id="bad")
    assert audit_scores(store, model, scored.staged).success
    # A duplicated row on the branch (as a buggy writer would leave) fails uniqueness.
    name = predictions_table(model)
    data = lake.read(name, snapshot_id=scored.staged.snapshot_id)
    doubled = wap.stage(
        lake,
        name,
        [pa.concat_tables([data, data.slice(0, 1)])],
        run_id="bad",
        source="test",
        day_column="feature_ts",
    )
    report = audit_scores(store, model, doubled)
    assert not report.success
    assert any(o.column == "prediction_id" for o in report.failures)
