"""The model registry's test material: a synthetic churn table with its spec and a TrainResult
built on it without a lakehouse, and views of the roles MLflow holds (aliases, stages, tags)."""

import datetime as dt
import json

import numpy as np
import pyarrow as pa
import pytest
from mlflow import MlflowClient

from keel.dsl import Column, Entity, EventSource
from keel.models import role_types
from keel.models.role_types import ARCHIVED, PRODUCTION, RECORD_TAG, STAGING
from keel.models.roles import settle
from keel.models.spec import ModelSpec, Split
from keel.models.training import TrainResult, model_frame, predict, score
from keel.store import TrainingSet

N_TRAIN, N_HOLDOUT = 400, 300
SPLIT_TIME = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
SNAPSHOTS = {"features.user_demo": 1111, "raw.churn_labels": 2222}
ROLE_TAGS = {t for tags in role_types.ROLE_TAGS.values() for t in tags} | {"previous_champion"}


def demo_table(seed: int, n: int) -> pa.Table:
    """Features x1, x2 and segment carry the signal; noise does not."""
    rng = np.random.default_rng(seed)
    x1, x2, noise = rng.normal(size=n), rng.normal(size=n), rng.normal(size=n)
    segment = rng.choice(["a", "b", "c"], size=n)
    logit = 2.0 * x1 + 1.5 * x2 + np.where(segment == "a", 1.0, 0.0)
    churned = rng.random(n) < 1 / (1 + np.exp(-logit))
    x1_with_nulls = pa.array(x1, mask=rng.random(n) < 0.05)
    # Label times an hour apart, ending at SPLIT_TIME + the hold-out: rows past N_TRAIN are held out.
    end = SPLIT_TIME + dt.timedelta(hours=N_HOLDOUT)
    times = [end - dt.timedelta(hours=n - 1 - i) for i in range(n)]
    return pa.table(
        {
            "user_id": [f"u{i}" for i in range(n)],
            "x1": x1_with_nulls,
            "x2": x2,
            "noise": noise,
            "segment": segment,
            "churned": churned,
            "event_ts": pa.array(times, pa.timestamp("us", "UTC")),
        }
    )


def spec(algorithm: str = "xgboost", params: dict | None = None, metric: str = "roc_auc") -> ModelSpec:
    user = Entity(name="user", join_keys={"user_id": "string"})
    labels = EventSource(name="churn_labels", entity=user, columns=(Column("churned", "bool"),))
    return ModelSpec(
        name="churn",
        entity=user,
        features=("user_demo",),
        labels=labels,
        label="churned",
        algorithm=algorithm,
        params=params or {},
        metric=metric,
        split=Split("7d"),
        min_improvement=0.01,
        owner="ml-team",
        description="Churn in the next 30 days",
    )


def fit(model_spec: ModelSpec, model, features: list[str], data: pa.Table, params: dict | None = None) -> TrainResult:
    """A TrainResult as keel.models.training.train builds one, on a synthetic table (no lakehouse)."""
    train, holdout = data.slice(0, N_TRAIN), data.slice(N_TRAIN)
    model.fit(model_frame(train, features), np.asarray(train.column("churned"), dtype=int))
    predictions = predict(model, model_spec, holdout, features)
    y = np.asarray(holdout.column("churned"), dtype=int)
    return TrainResult(
        model=model,
        features=features,
        training_set=TrainingSet(data, features, snapshots=dict(SNAPSHOTS)),
        train_rows=N_TRAIN,
        holdout_rows=data.num_rows - N_TRAIN,
        metrics=score(model_spec, y, predictions),
        holdout=holdout.append_column("prediction", pa.array(predictions)),
        predictions=predictions,
        split_time=SPLIT_TIME,
        params=model.get_params() if params is None else params,
        algorithm=model_spec.algorithm,
    )


def xgb(**params):
    import xgboost

    return xgboost.XGBClassifier(
        n_estimators=25, max_depth=3, tree_method="hist", enable_categorical=True, nthread=1, random_state=0, **params
    )


def person_moves_stage(client: MlflowClient, name: str, version: int, stage: str) -> None:
    """What the MLflow UI's stage menu does; MLflow warns that stages are deprecated."""
    with pytest.warns(FutureWarning, match="transition_model_version_stage"):
        client.transition_model_version_stage(name, str(version), stage)


def registry_view(client: MlflowClient, name: str) -> dict:
    """Aliases, stages and role tags, read straight from MLflow."""
    model = client.get_registered_model(name)
    versions = {int(mv.version): mv for mv in client.search_model_versions(f"name = '{name}'")}
    return {
        "aliases": {a: int(v) for a, v in model.aliases.items()},
        "stages": {v: mv.current_stage for v, mv in versions.items()},
        "tags": {v: {k: t for k, t in mv.tags.items() if k in ROLE_TAGS} for v, mv in versions.items()},
        "record": json.loads(model.tags[RECORD_TAG]) if RECORD_TAG in model.tags else None,
    }


def assert_in_step(client: MlflowClient, name: str) -> dict:
    """Aliases and stages say the same roles, each version carries the tags of its role only,
    the record says what the registry says, and a settle finds nothing to write."""
    view = registry_view(client, name)
    aliases, stages, tags = view["aliases"], view["stages"], view["tags"]
    production = [v for v, s in stages.items() if s == PRODUCTION]
    staging = [v for v, s in stages.items() if s == STAGING]
    assert production == ([aliases["champion"]] if "champion" in aliases else []), view
    assert staging == ([aliases["challenger"]] if "challenger" in aliases else []), view
    for version, stage in stages.items():
        have = set(tags[version])
        if stage == PRODUCTION:
            assert {"promotion", "promoted_at"} <= have <= set(role_types.ROLE_TAGS["champion"]), (version, view)
            assert tags[version]["promotion"] in role_types.HOWS
        elif stage == STAGING:
            assert have == {"staging", "staged_at"}, (version, view)
        elif stage == ARCHIVED:
            # "retirement" (how) is unknown for a version retired before stages were kept.
            assert {"retired_at"} <= have <= set(role_types.ROLE_TAGS["retired"]), (version, view)
        else:
            assert have == set(), (version, view)
    record = view["record"]
    assert record is not None and not record["pending"]
    assert (record["champion"], record["challenger"]) == (aliases.get("champion"), aliases.get("challenger"))
    assert {int(v) for v in record["stages"].get(PRODUCTION, [])} == set(production)
    assert {int(v) for v in record["stages"].get(ARCHIVED, [])} == {v for v, s in stages.items() if s == ARCHIVED}
    assert settle(client, name).in_step
    return view
