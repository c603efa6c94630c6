"""Model declarations, the time split, and training on real Iceberg tables."""

import dataclasses
import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from keel.dsl import Column, Entity, EventSource, Feature, FeatureGroup
from keel.lakehouse import wap
from keel.models.spec import ModelError, Split
from keel.models.training import evaluate, model_frame, predict, train
from keel.project import Project
from keel.store import FeatureStore
from tests.factories.features import groups_for, land
from tests.factories.models import START, USERS, WEEKS, land_labels, spec, synthetic

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


@pytest.fixture
def project(model_project) -> Project:
    return model_project


@pytest.fixture
def store(lake, project) -> FeatureStore:
    return FeatureStore(lake, project)


# Declarations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"algorithm": "catboost"}, "algorithm 'catboost' is not known"),
        ({"algorithm": "sklearn:LogisticRegression"}, "needs a dotted path"),
        ({"algorithm": "sklearn:sklearn.linear_model.LogisticRegresion"}, "has no estimator class"),
        ({"algorithm": "sklearn:sklearn.linear_model.Ridge"}, "is not a classifier"),
        ({"algorithm": "sklearn:sklearn.svm.LinearSVC"}, "has no predict_proba"),
        (
            {"algorithm": "sklearn:sklearn.linear_model.LogisticRegression", "params": {"depth": 3}},
            "params ['depth'] are not parameters of LogisticRegression",
        ),
        ({"metric": "rmse"}, "metric 'rmse' does not fit task 'classification' (use one of roc_auc"),
        ({"task": "regression", "label": "spend_next"}, "metric 'roc_auc' does not fit task 'regression'"),
        ({"task": "ranking"}, "task 'ranking' is not known"),
        ({"split": "2x"}, "holdout '2x' is not a duration"),
        ({"split": "lifetime"}, "holdout 'lifetime' is not a duration"),
        ({"label": "churn"}, "label 'churn' is not a column of label source 'outcomes' (columns: churned, spend_next)"),
        ({"label": "spend_next"}, "label 'spend_next' is float64, but a classification label must be bool or int64"),
        ({"min_improvement": -0.01}, "min_improvement -0.01 must be a number >= 0"),
        ({"features": ()}, "features is empty"),
        ({"features": ("spend", "spend")}, "feature 'spend' is listed twice"),
        ({"features": ("a.b.c",)}, "feature 'a.b.c' is not a group or group.feature"),
        ({"name": "Churn"}, "model name 'Churn' is not a valid identifier"),
    ],
)
def test_declaration_errors_name_the_model_the_value_and_the_fix(buyer, outcomes, overrides, message):
    with pytest.raises(ValueError) as err:
        spec(buyer, outcomes, **overrides)
    assert message in str(err.value)
    if "name" not in overrides:
        assert str(err.value).startswith("model 'churn': ")


def test_split_validates_its_holdout_on_its_own():
    with pytest.raises(ModelError, match="holdout '0d' is not a duration"):
        Split("0d")


def test_labels_and_feature_groups_of_another_entity_are_refused(buyer, outcomes, payments):
    shop = Entity(name="shop", join_keys={"shop_id": "string"})
    with pytest.raises(ModelError, match="label source 'outcomes' is keyed by .*use a label source of that entity"):
        spec(shop, outcomes)
    sales = EventSource(name="sales", entity=shop, columns=(Column("amount", "float64"),))
    by_shop = FeatureGroup(name="by_shop", entity=shop, source=sales, features=(Feature("n", "count"),))
    with pytest.raises(ModelError, match="feature group 'by_shop' describes entity 'shop', not 'buyer'"):
        spec(buyer, outcomes, features=(by_shop,))


def test_a_declared_group_object_is_kept_by_name(buyer, outcomes, payments):
    spend, _ = groups_for(payments)
    assert spec(buyer, outcomes, features=(spend, "spend_ratio")).features == ("spend", "spend_ratio")


def test_feature_refs_expand_groups_in_declaration_order(buyer, outcomes, project):
    model = spec(buyer, outcomes, features=("spend_ratio.big_spender", "spend"))
    assert model.feature_refs(project) == [
        "spend_ratio.big_spender",
        "spend.n_7d",
        "spend.amount_7d",
        "spend.last_amount",
        "spend.avg_7d",
    ]


def test_feature_refs_are_checked_against_the_project(buyer, outcomes, project, payments):
    with pytest.raises(ModelError, match="model 'churn': project 't' has no feature group 'spnd' .*known: spend"):
        spec(buyer, outcomes, features=("spnd",)).feature_refs(project)
    with pytest.raises(ModelError, match="model 'churn': feature group 'spend' has no feature 'n_8d'"):
        spec(buyer, outcomes, features=("spend.n_8d",)).feature_refs(project)
    with pytest.raises(ModelError, match="feature name 'n_7d' comes from both 'spend' and 'spend'"):
        spec(buyer, outcomes, features=("spend", "spend.n_7d")).feature_refs(project)
    shop = Entity(name="shop", join_keys={"user_id": "int64"})
    sales = EventSource(name="sales", entity=shop, columns=(Column("amount", "float64"),))
    by_shop = FeatureGroup(name="by_shop", entity=shop, source=sales, features=(Feature("n", "count"),))
    mixed = Project(name="m", sources=(payments, outcomes, sales), start_date=START.date(), feature_groups=(by_shop,))
    with pytest.raises(ModelError, match="feature group 'by_shop' describes entity 'shop', not 'buyer'"):
        spec(buyer, outcomes, features=("by_shop",)).feature_refs(mixed)


def test_the_demo_model_resolves_against_the_demo_project():
    from pipelines import project
    from pipelines.models import MODELS, churn

    assert (churn,) == MODELS
    refs = churn.feature_refs(project)
    assert refs[0] == "user_transactions.txn_count_24h"
    assert "user_engagement.active_7d" in refs and "user_profile.plan" in refs
    assert "user_profile.signed_up_at" not in refs


# The time split -------------------------------------------------------------------------


def times(*days: float) -> pa.Array:
    return pa.array([START + dt.timedelta(days=d) for d in days], pa.timestamp("us", tz="UTC"))


def test_holdout_is_the_last_window_before_the_latest_label_time():
    mask, split_time = Split("14d").holdout_mask(times(0, 6.999, 7, 7.001, 14, 21, 20.5, 21))
    assert split_time == START + dt.timedelta(days=7)
    # (split_time, latest]: a label exactly at the split time trains.
    assert mask.tolist() == [False, False, False, True, True, True, True, True]


def test_split_of_one_time_holds_everything_out():
    mask, split_time = Split("1h").holdout_mask(times(3, 3))
    assert mask.tolist() == [True, True]
    assert split_time == START + dt.timedelta(days=3, hours=-1)


# Training on landed data ----------------------------------------------------------------


def test_training_learns_a_planted_signal_on_the_time_holdout(store, lake, payments, outcomes, buyer):
    rows, labels = synthetic(1)
    land(lake, payments, rows, "p")
    land_labels(lake, outcomes, labels, "l")
    model = spec(buyer, outcomes)
    result = train(store, model, now=NOW)

    assert result.features == ["n_7d", "amount_7d", "last_amount", "avg_7d", "big_spender"]
    assert result.refs == model.feature_refs(store.project)
    # Weekly labels and a 14-day hold-out: the last two weeks are held out.
    assert (result.train_rows, result.holdout_rows) == ((WEEKS - 2) * USERS, 2 * USERS)
    assert result.split_time == START + dt.timedelta(weeks=WEEKS - 2)
    assert result.metrics["roc_auc"] > 0.8
    assert set(result.metrics) == {"roc_auc", "average_precision", "log_loss", "accuracy"}
    assert result.holdout.num_rows == result.holdout_rows
    assert result.holdout.column("prediction").to_pylist() == pytest.approx(result.predictions.tolist())
    assert result.params["random_state"] == 0 and result.params["n_estimators"] == 30
    assert set(result.training_set.snapshots) == {payments.table_name, outcomes.table_name}
    # The helpers score the same way train did.
    assert evaluate(result.model, model, result.holdout, result.features) == pytest.approx(result.metrics)
    assert predict(result.model, model, result.holdout, result.features) == pytest.approx(result.predictions)


def test_a_shuffled_label_scores_like_a_coin(store, lake, payments, outcomes, buyer):
    rows, labels = synthetic(2, shuffle=True)
    land(lake, payments, rows, "p")
    land_labels(lake, outcomes, labels, "l")
    result = train(store, spec(buyer, outcomes), now=NOW)
    assert 0.35 < result.metrics["roc_auc"] < 0.65


@pytest.mark.parametrize(
    "algorithm",
    ["lightgbm", "sklearn:sklearn.linear_model.LogisticRegression", "sklearn:sklearn.ensemble.RandomForestClassifier"],
)
def test_other_algorithms_learn_the_signal_too(store, lake, payments, outcomes, buyer, algorithm):
    rows, labels = synthetic(3)
    land(lake, payments, rows, "p")
    land_labels(lake, outcomes, labels, "l")
    params = {"n_estimators": 30} if "Forest" in algorithm or algorithm == "lightgbm" else {"max_iter": 500}
    result = train(store, spec(buyer, outcomes, algorithm=algorithm, params=params), now=NOW)
    assert result.metrics["roc_auc"] > 0.8


def test_string_and_bool_features_train_and_unseen_strings_predict(lake, payments, outcomes, buyer):
    spend, ratio = groups_for(payments)
    habits = FeatureGroup(
        name="habits",
        entity=buyer,
        source=payments,
        features=(Feature("last_currency", "last", "currency", window="7d"), Feature("n", "count", window="7d")),
    )
    project = Project(
        name="t", sources=(payments, outcomes), start_date=START.date(), feature_groups=(spend, ratio, habits)
    )
    rows, labels = synthetic(4)
    for i, row in enumerate(rows):
        row["currency"] = "USD" if i % 3 else "EUR"
    land(lake, payments, rows, "p")
    land_labels(lake, outcomes, labels, "l")
    for algorithm in ("xgboost", "lightgbm", "sklearn:sklearn.linear_model.LogisticRegression"):
        model = spec(buyer, outcomes, features=("habits", "spend_ratio.big_spender"), algorithm=algorithm, params={})
        result = train(FeatureStore(lake, project), model, now=NOW)
        assert result.metrics["roc_auc"] > 0.8, algorithm
        holdout = result.holdout
        unseen = holdout.set_column(
            holdout.schema.get_field_index("last_currency"), "last_currency", pa.array(["JPY"] * holdout.num_rows)
        )
        assert np.isfinite(predict(result.model, model, unseen, result.features)).all(), algorithm
        # Scoring rows of one currency alone must not re-code the category against another.
        usd = pc.fill_null(pc.equal(holdout.column("last_currency"), "USD"), False).to_numpy(zero_copy_only=False)
        alone = predict(result.model, model, holdout.filter(pa.array(usd)), result.features)
        assert alone == pytest.approx(result.predictions[usd]), algorithm


def test_model_frame_encodes_each_column_type():
    table = pa.table(
        {
            "s": pa.array(["b", None, "a"]),
            "f": pa.array([True, None, False]),
            "i": pa.array([1, None, 3], pa.int64()),
            "t": pa.array([START, None, START + dt.timedelta(seconds=1.5)], pa.timestamp("us", tz="UTC")),
            "d": pa.array([dt.date(1970, 1, 2), None, dt.date(1970, 1, 1)], pa.date32()),
        }
    )
    frame = model_frame(table, ["i", "s", "f", "t", "d"])
    assert list(frame.columns) == ["i", "s", "f", "t", "d"]
    assert list(frame["s"].cat.categories) == ["a", "b"] and frame["s"].isna().tolist() == [False, True, False]
    np.testing.assert_array_equal(frame["f"].to_numpy(), [1.0, np.nan, 0.0])
    np.testing.assert_array_equal(frame["i"].to_numpy(), [1.0, np.nan, 3.0])
    np.testing.assert_array_equal(frame["t"].to_numpy(), [START.timestamp(), np.nan, START.timestamp() + 1.5])
    np.testing.assert_array_equal(frame["d"].to_numpy(), [1.0, np.nan, 0.0])


def test_training_is_deterministic_and_reproducible_from_recorded_snapshots(store, lake, payments, outcomes, buyer):
    rows, labels = synthetic(5)
    land(lake, payments, rows, "p")
    land_labels(lake, outcomes, labels, "l")
    model = spec(buyer, outcomes, params={"n_estimators": 30, "subsample": 0.7, "colsample_bytree": 0.7})
    first = train(store, model, now=NOW)
    again = train(store, model, now=NOW)
    assert again.metrics == first.metrics
    assert np.array_equal(again.predictions, first.predictions)

    # New events and labels land (a later week and late payments in the old weeks).
    more_rows, more_labels = synthetic(6, weeks=WEEKS + 1, prefix="x")
    land(lake, payments, more_rows, "p2")
    land_labels(lake, outcomes, more_labels, "l2")
    moved = train(store, model, now=NOW)
    assert moved.training_set.table.num_rows != first.training_set.table.num_rows

    pinned = first.training_set.snapshots
    for _ in range(2):
        replay = train(store, model, as_of=pinned, now=NOW)
        assert replay.training_set.table.equals(first.training_set.table)
        assert replay.training_set.snapshots == pinned
        assert replay.metrics == first.metrics
        assert np.array_equal(replay.predictions, first.predictions)


def test_now_keeps_only_labels_timed_by_then(store, lake, payments, outcomes, buyer):
    rows, labels = synthetic(7)
    land(lake, payments, rows, "p")
    land_labels(lake, outcomes, labels, "l")
    result = train(store, spec(buyer, outcomes), now=START + dt.timedelta(weeks=5, hours=1))
    assert result.train_rows + result.holdout_rows == 5 * USERS
    assert result.split_time == START + dt.timedelta(weeks=3)


def test_training_errors_say_what_is_missing(store, lake, payments, outcomes, buyer):
    model = spec(buyer, outcomes)
    with pytest.raises(ModelError, match="label table 'raw.outcomes' does not exist yet; ingest it first"):
        train(store, model, now=NOW)
    rows, labels = synthetic(8, weeks=1)
    land_labels(lake, outcomes, labels, "l")
    with pytest.raises(ModelError, match="source table 'raw.payments' does not exist yet"):
        train(store, model, now=NOW)
    land(lake, payments, rows, "p")
    with pytest.raises(ModelError, match="the training side of the split is empty"):
        train(store, model, now=NOW)
    rows, labels = synthetic(8, weeks=4)
    land(lake, payments, rows, "p2")
    land_labels(lake, outcomes, [{**r, "churned": r["event_ts"] > START + dt.timedelta(weeks=2)} for r in labels], "l2")
    with pytest.raises(ModelError, match="the training side of the split has only label value 0"):
        train(store, model, now=NOW)
    with pytest.raises(ModelError, match="has no labelled rows at or before"):
        train(store, model, now=START)
    with pytest.raises(ModelError, match="as_of has no snapshot for label table 'raw.outcomes'"):
        train(store, model, as_of={payments.table_name: lake.head(payments.table_name)}, now=NOW)


def test_a_regression_model_reports_regression_metrics(store, lake, payments, outcomes, buyer):
    rows, labels = synthetic(9)
    land(lake, payments, rows, "p")
    land_labels(lake, outcomes, labels, "l")
    model = dataclasses.replace(spec(buyer, outcomes), task="regression", label="spend_next", metric="rmse")
    result = train(store, model, now=NOW)
    assert set(result.metrics) == {"rmse", "mae", "r2"}
    assert result.metrics["r2"] > 0.8
    assert result.metrics["rmse"] < 15


def test_the_demo_model_learns_the_planted_churn_signal(lake):
    from pipelines import project
    from pipelines.generate import generate
    from pipelines.models import churn

    tables = generate(days=60, users=300, seed=7)
    for source in project.sources:
        lake.ensure_table(source.table_name, source.arrow_schema(), day_column=source.timestamp)
        staged = wap.stage(
            lake, source.table_name, [tables[source.name]], run_id="demo", source=source.name, day_column="event_ts"
        )
        wap.publish(lake, staged)
    result = train(FeatureStore(lake, project), churn, now=NOW)
    # Labels every 7 days from day 7 to day 30: days 21 and 28 are held out.
    assert result.split_time == dt.datetime(2026, 1, 15, tzinfo=dt.UTC)
    assert result.holdout_rows > 200
    assert result.metrics["roc_auc"] > 0.85
