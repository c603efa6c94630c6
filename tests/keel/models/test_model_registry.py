"""The model registry against a real file-backed MLflow (SQLite + artifacts under a tmp KEEL_HOME).

MLflow costs seconds per import and per logged model, so one module fixture plays the whole
champion/challenger story once and records what each step returned; the tests check those records.
"""

import dataclasses
import datetime as dt
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from keel.config import Settings
from keel.models import gates, promotion, reference, registration, registry
from keel.models.registry_client import ModelRegistryError, mlflow_client
from keel.models.training import estimator, model_frame, predict
from keel.store import TrainingSet
from tests.factories.registry import (
    N_HOLDOUT,
    N_TRAIN,
    SNAPSHOTS,
    assert_in_step,
    demo_table,
    fit,
    registry_view,
    spec,
    xgb,
)


def catch(fn, *args):
    with pytest.raises(ModelRegistryError) as info:
        fn(*args)
    return str(info.value)


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    home = tmp_path_factory.mktemp("keel")
    settings = Settings.from_env({"KEEL_HOME": str(home), "KEEL_CODE_VERSION": "sha-test"})
    data = demo_table(0, N_TRAIN + N_HOLDOUT)
    recent = demo_table(1, 400)  # the "same recent hold-out" champion and challenger are compared on
    out = {"settings": settings, "home": home, "recent": recent}

    # v1: XGBoost on one of the two signal features.
    s1 = spec("xgboost")
    r1 = fit(s1, xgb(), ["x1", "segment"], data)
    out["r1"], out["v1"] = r1, registration.log_and_register(settings, s1, r1, code_version="sha-v1")
    out["no_champion_error"] = catch(registry.load_model, settings, "churn", "champion")
    out["gate_failed"] = promotion.promote_if_better(
        settings, s1, recent, gates_passed=False, gate_reason="roc_auc below floor"
    )
    out["first"] = promotion.promote_if_better(settings, s1, recent)
    out["first_view"] = registry_view(mlflow_client(settings), "churn")
    out["first_again_error"] = catch(promotion.promote_if_better, settings, s1, recent)

    # v2: a scikit-learn pipeline (keel.models.spec' encoding) on noise only: worse, not promoted.
    s2 = spec("sklearn:sklearn.linear_model.LogisticRegression")
    pipeline, params = estimator(s2, model_frame(data, ["noise", "segment"]))
    r2 = fit(s2, pipeline, ["noise", "segment"], data, params)
    out["r2"], out["v2"] = r2, registration.log_and_register(settings, s2, r2, code_version="sha-v2")
    out["worse"] = promotion.promote_if_better(settings, s2, recent)
    out["after_worse"] = {v.version: v for v in registry.list_versions(settings, "churn")}

    # v3: XGBoost on every signal feature: better, promoted over v1.
    s3 = spec("xgboost")
    r3 = fit(s3, xgb(), ["x1", "x2", "segment"], data)
    out["r3"], out["v3"] = r3, registration.log_and_register(settings, s3, r3, code_version="sha-v3")
    out["comparison_features"] = promotion.comparison_features(settings, "churn")
    out["better"] = promotion.promote_if_better(settings, s3, recent)
    out["after_better"] = {v.version: v for v in registry.list_versions(settings, "churn")}
    out["better_view"] = assert_in_step(mlflow_client(settings), "churn")
    out["show_v3"] = registry.show(settings, "churn", 3)
    out["loaded_champion"] = registry.load_model(settings, "churn", "champion")
    out["loaded_v2"] = registry.load_model(settings, "churn", 2)

    # A rollback by hand: v1 is champion again, v3 is the retired one.
    out["manual"] = promotion.promote(settings, "churn", 1)
    out["after_manual"] = {v.version: v for v in registry.list_versions(settings, "churn")}
    out["manual_view"] = assert_in_step(mlflow_client(settings), "churn")
    with pytest.raises(ValueError) as missing:
        promotion.promote_if_better(settings, s3, recent.drop(["x1"]), version=2)
    out["missing_column_error"] = str(missing.value)
    out["unknown_model_error"] = catch(registry.list_versions, settings, "nope")
    out["unknown_version_error"] = catch(registry.show, settings, "churn", 9)
    out["unknown_alias_error"] = catch(registry.load_model, settings, "churn", "staging")

    # The same comparison on a lower-is-better metric (log loss), champion v1.
    by_log_loss = spec("xgboost", metric="log_loss")
    out["log_loss_worse"] = promotion.promote_if_better(settings, by_log_loss, recent, version=2)
    out["log_loss_better"] = promotion.promote_if_better(settings, by_log_loss, recent, version=3)
    out["log_loss_view"] = assert_in_step(mlflow_client(settings), "churn")
    return out


def test_log_and_register_records_lineage_and_sets_challenger(story):
    v1 = story["v1"]
    assert (v1.name, v1.version, v1.aliases, v1.status) == ("churn", 1, ("challenger",), "pending")
    assert v1.features == ["x1", "segment"]
    assert v1.snapshots == SNAPSHOTS
    assert v1.code_version == "sha-v1"
    assert v1.metrics["roc_auc"] == pytest.approx(story["r1"].metrics["roc_auc"])
    assert story["v2"].version == 2 and story["v2"].aliases == ("challenger",)


def test_artifacts_live_under_keel_home(story, tmp_path_factory):
    show = story["show_v3"]
    artifacts = Path(show["artifact_uri"].removeprefix("file://"))
    assert artifacts.is_relative_to(story["home"] / "mlartifacts" / "churn")
    assert not (Path.cwd() / "mlruns").exists()
    baseline = json.loads((artifacts / "baseline.json").read_text())
    assert list(baseline["features"]) == ["x1", "x2", "segment"]
    assert baseline["row_count"] == N_TRAIN + N_HOLDOUT
    assert baseline["features"]["x1"]["null_rate"] > 0
    assert baseline["features"]["segment"]["default"] in ("a", "b", "c")
    assert baseline["prediction"]["count"] == N_HOLDOUT
    assert json.loads((artifacts / "features.json").read_text()) == {"features": ["x1", "x2", "segment"]}
    training_set = json.loads((artifacts / "training_set.json").read_text())
    assert training_set["snapshots"] == SNAPSHOTS
    assert training_set["split"]["train_rows"] == N_TRAIN


def test_reference_sample_splits_at_the_training_split_and_keeps_the_holdout_scores(story):
    v3 = story["v3"]
    sample = reference.load_reference(story["settings"], "churn", v3.version, v3.run_id)
    assert sample.num_rows == N_TRAIN + N_HOLDOUT
    split = np.asarray(sample.column(reference.SPLIT))
    assert (split == reference.HOLDOUT).sum() == N_HOLDOUT
    assert (split[:N_TRAIN] == reference.TRAIN).all()
    holdout_scores = np.asarray(sample.column(reference.PREDICTION))[split == reference.HOLDOUT]
    assert holdout_scores == pytest.approx(story["r3"].predictions)
    assert set(sample.column_names) >= {"x1", "x2", "segment", reference.LABEL, reference.LABEL_TS}


def test_reference_sample_without_a_label_time_names_the_column():
    s1 = spec("xgboost")
    result = fit(s1, xgb(), ["x1", "segment"], demo_table(3, N_TRAIN + N_HOLDOUT).drop_columns(["event_ts"]))
    with pytest.raises(reference.ReferenceSampleError, match="no label time column 'event_ts'"):
        reference.reference_sample(s1, result)


def test_failed_gates_reject_and_first_passing_version_becomes_champion(story):
    assert "no champion yet" in story["no_champion_error"]
    assert "keel models promote churn VERSION" in story["no_champion_error"]
    gate = story["gate_failed"]
    assert not gate.promoted and "roc_auc below floor" in gate.reason
    first = story["first"]
    assert first.promoted and first.champion_version is None and first.challenger_version == 1
    assert "first version" in first.reason
    assert (first.roles.champion, first.roles.challenger, first.roles.how) == (1, None, "automatic")
    view = story["first_view"]
    assert view["aliases"] == {"champion": 1} and view["stages"] == {1: "Production"}
    assert "previous_champion_version" not in view["tags"][1]
    # A promoted challenger is the champion, no longer a challenger: there is nothing to compare.
    again = story["first_again_error"]
    assert "model 'churn' has no version with alias 'challenger'" in again
    assert "a promoted challenger is the champion" in again


def test_worse_challenger_is_rejected_with_reason(story):
    worse = story["worse"]
    assert not worse.promoted
    assert (worse.challenger_version, worse.champion_version) == (2, 1)
    assert worse.challenger_metric < worse.champion_metric
    assert "below the required 0.01" in worse.reason
    versions = story["after_worse"]
    assert versions[1].aliases == ("champion",)
    assert versions[2].aliases == ("challenger",)
    assert versions[2].status == "rejected"
    assert versions[2].tags["validation_reason"] == worse.reason
    assert versions[2].tags["validation.champion_version"] == "1"


def test_better_challenger_is_promoted_and_previous_champion_stays_findable(story):
    assert story["comparison_features"] == ["x1", "x2", "segment"]
    better = story["better"]
    assert better.promoted and (better.challenger_version, better.champion_version) == (3, 1)
    assert better.challenger_metric - better.champion_metric >= 0.01
    versions = story["after_better"]
    assert versions[3].aliases == ("champion",)
    assert (versions[3].stage, versions[1].stage, versions[2].stage) == ("Production", "Archived", "None")
    assert versions[3].status == "passed"
    assert versions[3].tags["promotion"] == "automatic"
    assert versions[3].tags["previous_champion_version"] == "1"
    assert versions[3].tags["promotion_reason"] == better.reason
    assert versions[1].aliases == ()
    assert versions[1].tags["retired_by"] == "3" and versions[1].tags["retirement"] == "automatic"
    assert dt.datetime.fromisoformat(versions[1].tags["retired_at"]).tzinfo is not None
    # v1 was the champion: nothing of that role is left on it.
    assert not {"promotion", "promoted_at", "promotion_reason", "previous_champion"} & set(versions[1].tags)
    assert story["better_view"]["aliases"] == {"champion": 3}


def test_manual_promotion_moves_the_alias_back(story):
    manual = story["manual"]
    assert manual.version == 1 and "champion" in manual.aliases
    assert manual.stage == "Production"
    versions = story["after_manual"]
    assert not {"retired_at", "retired_by", "retirement"} & set(versions[1].tags)
    assert versions[1].tags["promotion"] == "manual" and versions[1].tags["previous_champion_version"] == "3"
    assert versions[3].tags["retired_by"] == "1" and versions[3].tags["retirement"] == "manual"
    assert "promotion" not in versions[3].tags and "champion" not in versions[3].aliases
    assert (versions[1].stage, versions[3].stage) == ("Production", "Archived")
    # The comparison v1 passed when it was first promoted is kept: it is not a role.
    assert versions[1].status == "passed"


def test_show_reports_lineage(story):
    show = story["show_v3"]
    assert show["name"] == "churn" and show["version"] == 3
    assert show["features"] == ["x1", "x2", "segment"]
    assert show["snapshots"] == SNAPSHOTS
    assert show["code_version"] == "sha-v3"
    assert show["run_id"] == story["v3"].run_id
    assert show["metrics"]["roc_auc"] == pytest.approx(story["r3"].metrics["roc_auc"])
    assert show["split"] == {
        "split_time": "2026-11-01T00:00:00+00:00",
        "holdout": "7d",
        "train_rows": 400,
        "holdout_rows": 300,
    }
    assert show["training"]["algorithm"] == "xgboost"
    assert show["params"]["max_depth"] == "3"
    r3 = story["r3"]
    assert show["training_set"] == {
        "digest": r3.training_set.digest(),
        "rows": r3.training_set.table.num_rows,
        "label_cutoff": "",
    }


def test_list_versions_newest_first_with_metrics(story):
    rows = [v.as_row() for v in story["after_manual"].values()]
    assert [r["version"] for r in sorted(rows, key=lambda r: -r["version"])] == [3, 2, 1]
    assert all(0.0 <= r["metrics"]["roc_auc"] <= 1.0 and r["run_id"] and r["snapshots"] == SNAPSHOTS for r in rows)
    json.dumps(rows)


def test_load_model_round_trips_predictions(story):
    model, features, info = story["loaded_champion"]
    assert info.version == 3 and features == ["x1", "x2", "segment"]
    r3 = story["r3"]
    np.testing.assert_allclose(predict(model, spec(), r3.holdout, features), r3.predictions, rtol=1e-6)
    sk_model, sk_features, sk_info = story["loaded_v2"]
    assert sk_info.version == 2 and sk_features == ["noise", "segment"]
    assert type(sk_model).__name__ == "Pipeline"
    r2_holdout = story["recent"]
    np.testing.assert_allclose(
        predict(sk_model, spec(), r2_holdout, sk_features), predict(story["r2"].model, spec(), r2_holdout, sk_features)
    )


def test_errors_name_the_model_and_the_fix(story):
    assert "model 'nope' is not registered (registered: churn)" in story["unknown_model_error"]
    assert "model 'churn' has no version 9 (versions: 1, 2, 3)" in story["unknown_version_error"]
    assert "alias 'staging'" in story["unknown_alias_error"] and "champion" in story["unknown_alias_error"]


def test_holdout_missing_a_feature_names_the_fix(story):
    # The challenger (v2: noise, segment) could be scored; the champion (v1) also reads x1.
    message = story["missing_column_error"]
    assert "model 'churn' version 1: the hold-out lacks column(s) ['x1']" in message
    assert "comparison_features(settings, 'churn')" in message


def test_lower_is_better_metric(story):
    worse, better = story["log_loss_worse"], story["log_loss_better"]
    assert not worse.promoted and worse.challenger_metric > worse.champion_metric
    assert better.promoted and better.champion_metric - better.challenger_metric >= 0.01
    assert (better.challenger_version, better.champion_version) == (3, 1)
    # A retired version promoted again: Production, its retired tags gone, v1 retired by it.
    view = story["log_loss_view"]
    assert view["aliases"] == {"champion": 3} and view["stages"] == {1: "Archived", 2: "None", 3: "Production"}
    assert view["tags"][1]["retired_by"] == "3" and "retired_by" not in view["tags"][3]


def test_metric_direction_comes_from_keel_models():
    assert promotion.higher_is_better("roc_auc") and not promotion.higher_is_better("log_loss")
    with pytest.raises(ValueError, match="not known"):
        promotion.higher_is_better("f7")


def failed(outcomes: dict) -> list[str]:
    return [name for name, (ok, _) in outcomes.items() if not ok]


def test_each_promotion_gate_holds_back_its_own_defect():
    s = spec("xgboost")
    data = demo_table(0, N_TRAIN + N_HOLDOUT)
    good = fit(s, xgb(), ["x1", "x2", "segment"], data)
    assert gates.metric_floor(s) == gates.DEFAULT_FLOORS["roc_auc"] and gates.metric_floor(s, {"churn": 0.9}) == 0.9
    assert gates.metric_floor(spec("xgboost", metric="log_loss")) is None
    assert gates.gates_verdict(gates.gate_outcomes(s, good, gates.metric_floor(s))) == (True, "all gates passed")
    unfloored = gates.gate_outcomes(s, good, None)
    assert not failed(unfloored) and "(no floor declared)" in unfloored["metric_floor"][1]

    low = gates.gate_outcomes(s, good, 0.999)
    assert failed(low) == ["metric_floor"] and "needs >= 0.999" in low["metric_floor"][1]

    empty_x2 = data.set_column(data.schema.get_field_index("x2"), "x2", pa.nulls(data.num_rows, pa.float64()))
    all_null = dataclasses.replace(good, training_set=TrainingSet(empty_x2, good.features, snapshots={}))
    null_gates = gates.gate_outcomes(s, all_null, 0.6)
    assert failed(null_gates) == ["no_all_null_feature"]
    assert null_gates["no_all_null_feature"][1] == "features NULL in every training row: x2"

    constant = dataclasses.replace(good, predictions=np.full(good.holdout_rows, 0.5))
    flat = gates.gate_outcomes(s, constant, 0.6)
    assert (
        failed(flat) == ["prediction_distribution"]
        and "not constant, within [0, 1])" in flat["prediction_distribution"][1]
    )

    passed, why = gates.gates_verdict({**low, "prediction_distribution": flat["prediction_distribution"]})
    assert not passed and why == f"{low['metric_floor'][1]}; {flat['prediction_distribution'][1]}"
