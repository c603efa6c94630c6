"""Training a declared model: point-in-time training sets, a time split, fit, evaluate.

``train`` builds the training set from the label source's rows (each row's features as
computable at the label row's timestamp), holds out the most recent ``Split.holdout`` of
label times, fits and scores on the hold-out.

Feature encoding is part of the fitted model, so ``predict`` needs nothing but the model
and the feature columns: booleans become 0/1, timestamps epoch seconds, numbers float64
(NULL as NaN), and strings a pandas ``category``. XGBoost (``enable_categorical``) and
LightGBM split on categories natively and remember the training categories; a
scikit-learn estimator is wrapped in a pipeline that one-hot encodes the strings (unseen
values ignored) and fills missing numbers with the training median.
"""

from __future__ import annotations

import datetime as dt
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.expressions import LessThanOrEqual

from keel.features.training_sets import OfflineStore, TrainingSet, TrainingSetError
from keel.models.spec import ModelError, ModelSpec, sklearn_class

SEED = 0


@dataclass
class TrainResult:
    """A fitted model, what it was trained on, and how it scored on the hold-out."""

    model: Any
    features: list[str]
    training_set: TrainingSet
    train_rows: int
    holdout_rows: int
    metrics: dict[str, float]
    holdout: pa.Table
    predictions: np.ndarray
    split_time: dt.datetime
    params: dict[str, Any]
    algorithm: str
    refs: list[str] = field(default_factory=list)
    cutoff: dt.datetime | None = None  # label rows timed after it were left out


def train(
    store: OfflineStore,
    spec: ModelSpec,
    *,
    as_of: Mapping[str, int] | TrainingSet | None = None,
    now: dt.datetime | None = None,
) -> TrainResult:
    """Build the point-in-time training set from the label rows, split by time, fit and score.

    ``as_of``: the snapshots of an earlier result's training set (labels included); the same
    label and event rows are then read, so the set and the fitted model are the same.
    ``now``: only label rows timed at or before it are used (default: the present).
    """
    where = f"model {spec.name!r}"
    refs = spec.feature_refs(store.project)
    pinned = dict(as_of.snapshots if isinstance(as_of, TrainingSet) else as_of or {})
    now = now or dt.datetime.now(dt.UTC)
    labels_table = _read_labels(store, spec, pinned, now)
    ts = spec.labels.timestamp
    try:
        training_set = store.get_training_set(labels_table, refs, timestamp=ts, as_of=pinned or None)
    except TrainingSetError as exc:
        raise ModelError(f"{where}: {exc}") from None
    training_set.snapshots[spec.labels.table_name] = pinned.get(spec.labels.table_name) or store.lake.head(
        spec.labels.table_name
    )
    table = training_set.table
    features = list(training_set.features)

    mask, split_time = spec.split.holdout_mask(table.column(ts))
    y = label_values(spec, table.column(spec.label))
    for side, rows in (("training", ~mask), ("hold-out", mask)):
        if not rows.any():
            raise ModelError(
                f"{where}: the {side} side of the split is empty (label times up to {split_time.isoformat()} train, "
                f"later ones are held out; holdout={spec.split.holdout!r}); land more labels or change the holdout"
            )
        if spec.task == "classification" and len(np.unique(y[rows])) < 2:
            raise ModelError(
                f"{where}: the {side} side of the split has only label value {int(y[rows][0])} "
                f"({int(rows.sum())} rows, holdout={spec.split.holdout!r}); it needs both classes"
            )
    frame = model_frame(table, features)
    train_idx, hold_idx = np.flatnonzero(~mask), np.flatnonzero(mask)
    model, params = estimator(spec, frame)
    model.fit(frame.iloc[train_idx], y[train_idx])

    holdout = table.take(pa.array(hold_idx))
    predictions = predict(model, spec, holdout, features)
    holdout = holdout.append_column("prediction", pa.array(predictions, pa.float64()))
    return TrainResult(
        model=model,
        features=features,
        training_set=training_set,
        train_rows=len(train_idx),
        holdout_rows=len(hold_idx),
        metrics=score(spec, y[hold_idx], predictions),
        holdout=holdout,
        predictions=predictions,
        split_time=split_time,
        params=params,
        algorithm=spec.algorithm,
        refs=refs,
        cutoff=now,
    )


def _read_labels(store: OfflineStore, spec: ModelSpec, pinned: dict, now: dt.datetime) -> pa.Table:
    """The label rows (keys, timestamp, label) known at ``now``, in a fixed order whatever the file layout."""
    source, name = spec.labels, spec.labels.table_name
    if not store.lake.exists(name):
        raise ModelError(
            f"model {spec.name!r}: label table {name!r} does not exist yet; ingest it first "
            f"(keel ingest FILE --source {source.name})"
        )
    if now.tzinfo is None:
        raise ModelError(f"model {spec.name!r}: now={now!r} has no time zone (use e.g. datetime.now(UTC))")
    snapshot = pinned.get(name) if pinned else store.lake.head(name)
    if pinned and name not in pinned:
        raise ModelError(
            f"model {spec.name!r}: as_of has no snapshot for label table {name!r} (it has: {', '.join(pinned)})"
        )
    columns = [*source.key_columns, source.timestamp, spec.label]
    order = [*columns[:-1], *([source.event_id] if source.event_id else [])]
    data = (
        store.lake.read(name, snapshot_id=snapshot, row_filter=LessThanOrEqual(source.timestamp, now.isoformat()))
        if snapshot is not None
        else source.arrow_schema().empty_table()
    )
    data = data.filter(pc.is_valid(data.column(spec.label))).sort_by([(c, "ascending") for c in order])
    if not data.num_rows:
        raise ModelError(
            f"model {spec.name!r}: label table {name!r} has no labelled rows at or before {now.isoformat()}"
        )
    return data.select(columns)


def label_values(spec: ModelSpec, column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Labels as the estimator takes them: 0/1 for classification, float64 for regression."""
    if spec.task == "regression":
        return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
    values = pc.cast(column, pa.int64()).to_numpy(zero_copy_only=False)
    other = sorted(set(np.unique(values).tolist()) - {0, 1})
    if other:
        raise ModelError(
            f"model {spec.name!r}: label {spec.label!r} has values {other[:5]}; a classification label is 0/1 or bool"
        )
    return values


def model_frame(table: pa.Table, features: Sequence[str]) -> pd.DataFrame:
    """The feature columns as the model takes them (see the module docstring for the encoding)."""
    out = {}
    for name in features:
        col = table.column(name)
        typ = col.type
        if pa.types.is_string(typ) or pa.types.is_large_string(typ):
            out[name] = pd.Categorical(col.to_numpy(zero_copy_only=False))
            continue
        if pa.types.is_timestamp(typ):
            col, scale = pc.cast(col, pa.int64()), 1e6
        elif pa.types.is_date(typ):
            col, scale = pc.cast(col, pa.int32()), 1.0
        else:
            scale = 1.0
        out[name] = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False) / scale
    return pd.DataFrame(out, columns=list(features))


def estimator(spec: ModelSpec, frame: pd.DataFrame) -> tuple[Any, dict[str, Any]]:
    """An unfitted estimator for the spec (seeded), and the parameters it was given."""
    params = dict(spec.params)
    classify = spec.task == "classification"
    if spec.algorithm == "xgboost":
        import xgboost

        params = {"tree_method": "hist", "enable_categorical": True, "random_state": SEED, **params}
        cls = xgboost.XGBClassifier if classify else xgboost.XGBRegressor
        return cls(**params), params
    if spec.algorithm == "lightgbm":
        try:
            import lightgbm
        except ImportError:
            raise ModelError(
                f"model {spec.name!r}: algorithm 'lightgbm' needs the lightgbm package installed"
            ) from None
        params = {"random_state": SEED, "deterministic": True, "verbose": -1, **params}
        cls = lightgbm.LGBMClassifier if classify else lightgbm.LGBMRegressor
        return cls(**params), params

    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder

    cls = sklearn_class(f"model {spec.name!r}", spec.algorithm)
    if "random_state" in inspect.signature(cls.__init__).parameters:
        params = {"random_state": SEED, **params}
    strings = [c for c in frame.columns if isinstance(frame[c].dtype, pd.CategoricalDtype)]
    numbers = [c for c in frame.columns if c not in strings]
    encode = ColumnTransformer(
        [
            ("strings", OneHotEncoder(handle_unknown="ignore"), strings),
            ("numbers", SimpleImputer(strategy="median", keep_empty_features=True), numbers),
        ]
    )
    return Pipeline([("encode", encode), ("estimator", cls(**params))]), params


def predict(model: Any, spec: ModelSpec, table: pa.Table, features: Sequence[str]) -> np.ndarray:
    """Predictions for the table's rows: the positive class's probability, or the regression value."""
    return predict_frame(model, spec.task, model_frame(table, features))


def predict_frame(model: Any, task: str, frame: pd.DataFrame) -> np.ndarray:
    """Scores of rows already encoded by ``model_frame``."""
    if task == "classification":
        return np.asarray(model.predict_proba(frame)[:, 1], dtype=np.float64)
    return np.asarray(model.predict(frame), dtype=np.float64)


def evaluate(model: Any, spec: ModelSpec, table: pa.Table, features: Sequence[str]) -> dict[str, float]:
    """The model's metrics on a table holding its features and the label column."""
    return score(spec, label_values(spec, table.column(spec.label)), predict(model, spec, table, features))


def score(spec: ModelSpec, y: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    """The task's standard metrics (the spec's metric among them); NaN where a metric is undefined."""
    from sklearn import metrics

    if spec.task == "regression":
        return {
            "rmse": float(np.sqrt(metrics.mean_squared_error(y, predictions))),
            "mae": float(metrics.mean_absolute_error(y, predictions)),
            "r2": float(metrics.r2_score(y, predictions)) if len(y) > 1 else float("nan"),
        }
    both = len(np.unique(y)) == 2
    return {
        "roc_auc": float(metrics.roc_auc_score(y, predictions)) if both else float("nan"),
        "average_precision": float(metrics.average_precision_score(y, predictions)) if both else float("nan"),
        "log_loss": float(metrics.log_loss(y, np.clip(predictions, 1e-15, 1 - 1e-15), labels=[0, 1])),
        "accuracy": float(metrics.accuracy_score(y, predictions >= 0.5)),
    }
