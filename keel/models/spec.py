"""Model declarations and their training: point-in-time training sets, a time split, fit, evaluate.

A ``ModelSpec`` names an entity, its features (whole groups or ``group.feature``), a source
of delayed labels and an estimator. ``train`` builds the training set from the label
source's rows (each row's features as computable at the label row's timestamp), holds out
the most recent ``Split.holdout`` of label times, fits and scores on the hold-out.

Feature encoding is part of the fitted model, so ``predict`` needs nothing but the model
and the feature columns: booleans become 0/1, timestamps epoch seconds, numbers float64
(NULL as NaN), and strings a pandas ``category``. XGBoost (``enable_categorical``) and
LightGBM split on categories natively and remember the training categories; a
scikit-learn estimator is wrapped in a pipeline that one-hot encodes the strings (unseen
values ignored) and fills missing numbers with the training median.
"""

from __future__ import annotations

import datetime as dt
import importlib
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.expressions import LessThanOrEqual

from keel.dsl import DeclarationError, Entity, EventSource, FeatureGroup, _check_name, window_seconds
from keel.features.training_sets import OfflineStore, TrainingSet, TrainingSetError
from keel.project import Project

TASKS = ("classification", "regression")
ALGORITHMS = ("xgboost", "lightgbm", "sklearn:<module.Class>")
SEED = 0


class ModelError(ValueError):
    """A model declaration or a training run is invalid; the message names the model and the fix."""


@dataclass(frozen=True)
class Metric:
    task: str
    higher_is_better: bool


METRICS: dict[str, Metric] = {
    "roc_auc": Metric("classification", True),
    "average_precision": Metric("classification", True),
    "log_loss": Metric("classification", False),
    "accuracy": Metric("classification", True),
    "rmse": Metric("regression", False),
    "mae": Metric("regression", False),
    "r2": Metric("regression", True),
}


@dataclass(frozen=True)
class Split:
    """Time-based split: label rows whose time lies in ``(latest - holdout, latest]`` are the hold-out."""

    holdout: str = "14d"

    def __post_init__(self) -> None:
        try:
            seconds = window_seconds(self.holdout)
        except ValueError:
            seconds = None
        if seconds is None:
            raise ModelError(f"split: holdout {self.holdout!r} is not a duration (use e.g. '14d', '2w' or '36h')")

    @property
    def holdout_delta(self) -> dt.timedelta:
        return dt.timedelta(seconds=window_seconds(self.holdout))

    def holdout_mask(self, times: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, dt.datetime]:
        """Which rows are held out, and the split time (rows after it are held out)."""
        latest = pc.max(times).as_py()
        if latest is None:
            raise ModelError("split: there are no label rows to split")
        split_time = latest - self.holdout_delta
        cut = pa.scalar(split_time, times.type)
        mask = pc.greater(times, cut).to_numpy(zero_copy_only=False)
        return mask.astype(bool), split_time


@dataclass(frozen=True)
class ModelSpec:
    """A model: what it predicts (a label of a source of delayed labels), from which features, with what."""

    name: str
    entity: Entity
    features: tuple[str, ...]
    labels: EventSource
    label: str
    algorithm: str = "xgboost"
    params: dict[str, Any] = field(default_factory=dict)
    task: str = "classification"
    metric: str = "roc_auc"
    split: Split = field(default_factory=Split)
    min_improvement: float = 0.0
    owner: str = ""
    description: str = ""
    tags: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_name("model", self.name)
        where = f"model {self.name!r}"
        if not isinstance(self.entity, Entity):
            raise ModelError(f"{where}: entity {self.entity!r} is not a keel.dsl.Entity")
        if self.task not in TASKS:
            raise ModelError(f"{where}: task {self.task!r} is not known (use one of {', '.join(TASKS)})")
        self._check_features(where)
        self._check_labels(where)
        self._check_algorithm(where)
        fitting = [m for m, info in METRICS.items() if info.task == self.task]
        if self.metric not in fitting:
            raise ModelError(
                f"{where}: metric {self.metric!r} does not fit task {self.task!r} (use one of {', '.join(fitting)})"
            )
        if isinstance(self.split, str):
            try:
                object.__setattr__(self, "split", Split(self.split))
            except ModelError as exc:
                raise ModelError(f"{where}: {exc}") from None
        if not isinstance(self.split, Split):
            raise ModelError(f"{where}: split {self.split!r} is not a Split (use e.g. split=Split(holdout='14d'))")
        gain = self.min_improvement
        if isinstance(gain, bool) or not isinstance(gain, int | float) or not gain >= 0:
            raise ModelError(
                f"{where}: min_improvement {gain!r} must be a number >= 0 (the margin on {self.metric!r} "
                "a challenger must beat the champion by, e.g. 0.005)"
            )

    def _check_features(self, where: str) -> None:
        items = (self.features,) if isinstance(self.features, str | FeatureGroup) else tuple(self.features)
        if not items:
            raise ModelError(f"{where}: features is empty (give groups or group.feature, e.g. ('user_transactions',))")
        names = []
        for item in items:
            if isinstance(item, FeatureGroup):
                if item.entity.join_keys != self.entity.join_keys:
                    raise ModelError(_other_entity(where, item.name, item.entity, self.entity))
                item = item.name
            if not isinstance(item, str) or item.count(".") > 1 or not all(item.split(".")):
                raise ModelError(
                    f"{where}: feature {item!r} is not a group or group.feature (e.g. 'user_clicks.click_count_7d')"
                )
            if item in names:
                raise ModelError(f"{where}: feature {item!r} is listed twice; list each once")
            names.append(item)
        object.__setattr__(self, "features", tuple(names))

    def _check_labels(self, where: str) -> None:
        if not isinstance(self.labels, EventSource):
            raise ModelError(f"{where}: labels {self.labels!r} is not an EventSource of delayed labels")
        if self.labels.entity.join_keys != self.entity.join_keys:
            raise ModelError(
                f"{where}: label source {self.labels.name!r} is keyed by {self.labels.entity.join_keys}, "
                f"not by entity {self.entity.name!r}'s {self.entity.join_keys}; use a label source of that entity"
            )
        columns = {c.name: c.type for c in self.labels.columns}
        if self.label not in columns:
            raise ModelError(
                f"{where}: label {self.label!r} is not a column of label source {self.labels.name!r} "
                f"(columns: {', '.join(columns) or 'none'})"
            )
        wanted = ("bool", "int64") if self.task == "classification" else ("int64", "float64")
        if columns[self.label] not in wanted:
            raise ModelError(
                f"{where}: label {self.label!r} is {columns[self.label]}, but a {self.task} label must be "
                f"{' or '.join(wanted)}"
            )

    def _check_algorithm(self, where: str) -> None:
        if not isinstance(self.params, Mapping) or not all(isinstance(k, str) for k in self.params):
            raise ModelError(f"{where}: params {self.params!r} must be a dict of parameter name -> value")
        if self.algorithm in ("xgboost", "lightgbm"):
            return
        if not isinstance(self.algorithm, str) or not self.algorithm.startswith("sklearn:"):
            raise ModelError(
                f"{where}: algorithm {self.algorithm!r} is not known (use one of {', '.join(ALGORITHMS)}, "
                "e.g. 'sklearn:sklearn.linear_model.LogisticRegression')"
            )
        cls = _sklearn_class(where, self.algorithm)
        from sklearn.base import ClassifierMixin, RegressorMixin

        mixin = ClassifierMixin if self.task == "classification" else RegressorMixin
        if not issubclass(cls, mixin):
            raise ModelError(
                f"{where}: algorithm {self.algorithm!r} is not a {'classifier' if self.task == 'classification' else 'regressor'}"
                f" but task is {self.task!r}; use an estimator for that task"
            )
        if self.task == "classification" and not hasattr(cls, "predict_proba"):
            raise ModelError(
                f"{where}: algorithm {self.algorithm!r} has no predict_proba, which {self.metric!r} needs; "
                "use a probabilistic classifier (e.g. LogisticRegression, HistGradientBoostingClassifier)"
            )
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(set(self.params) - accepted)
        if unknown:
            raise ModelError(
                f"{where}: params {unknown} are not parameters of {cls.__name__} (it takes: {', '.join(sorted(accepted))})"
            )

    def feature_refs(self, project: Project) -> list[str]:
        """Every feature as ``group.feature``, in order: whole groups expand to their features as declared."""
        where = f"model {self.name!r}"
        refs: list[str] = []
        owner: dict[str, str] = {}
        for item in self.features:
            group_name, _, name = item.partition(".")
            try:
                group = project.group(group_name)
                names = [group.feature(name).name] if name else [f.name for f in group.features]
            except DeclarationError as exc:
                raise ModelError(f"{where}: {exc}") from None
            if group.entity.join_keys != self.entity.join_keys:
                raise ModelError(_other_entity(where, group.name, group.entity, self.entity))
            for feature in names:
                if feature in owner:
                    raise ModelError(
                        f"{where}: feature name {feature!r} comes from both {owner[feature]!r} and {group.name!r}; "
                        "list only one of them (each becomes one column of the training set)"
                    )
                owner[feature] = group.name
                refs.append(f"{group.name}.{feature}")
        return refs

    def __hash__(self) -> int:
        return hash(self.name)


def resolve_refs(project: Project, spec: ModelSpec, names: Sequence[str]) -> list[str]:
    """``group.feature`` for each feature name a version recorded: the model's declared ref,
    else the one group of the project that has a feature of that name."""
    declared = {ref.split(".", 1)[1]: ref for ref in spec.feature_refs(project)}
    out = []
    for name in names:
        if name in declared or "." in name:
            out.append(declared.get(name, name))
            continue
        owners = [g.name for g in project.feature_groups if any(f.name == name for f in g.features)]
        if len(owners) != 1:
            raise ModelError(
                f"model {spec.name!r}: recorded feature {name!r} is in "
                + (f"groups {', '.join(owners)}" if owners else "no feature group of the project")
                + "; retrain the model so its version records group.feature references"
            )
        out.append(f"{owners[0]}.{name}")
    return out


def load_models(module: str = "pipelines") -> dict[str, ModelSpec]:
    """The models declared in ``<module>.models`` (its ``MODELS``), by name."""
    path = f"{module}.models"
    try:
        mod = importlib.import_module(path)
    except ModuleNotFoundError as exc:
        if exc.name and path.startswith(exc.name):
            raise ModelError(
                f"KEEL_PROJECT={module!r}: there is no module {path!r}; declare MODELS = (ModelSpec(...), ...) in it"
            ) from None
        raise
    models = getattr(mod, "MODELS", None)
    if not isinstance(models, tuple | list) or not all(isinstance(m, ModelSpec) for m in models):
        raise ModelError(f"module {path!r} has no MODELS: declare MODELS = (ModelSpec(...), ...) in it")
    return {m.name: m for m in models}


def model_named(models: Mapping[str, ModelSpec], name: str) -> ModelSpec:
    if name not in models:
        raise ModelError(f"model {name!r} is not declared (declared: {', '.join(sorted(models)) or 'none'})")
    return models[name]


def _other_entity(where: str, group: str, theirs: Entity, ours: Entity) -> str:
    return (
        f"{where}: feature group {group!r} describes entity {theirs.name!r}, not {ours.name!r}; "
        "a model reads features of its own entity only"
    )


def _sklearn_class(where: str, algorithm: str) -> type:
    path = algorithm.removeprefix("sklearn:")
    module_name, _, class_name = path.rpartition(".")
    if not module_name:
        raise ModelError(
            f"{where}: algorithm {algorithm!r} needs a dotted path (e.g. 'sklearn:sklearn.linear_model.LogisticRegression')"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ModelError(f"{where}: algorithm {algorithm!r}: module {module_name!r} cannot be imported") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type) or not hasattr(cls, "fit"):
        raise ModelError(f"{where}: algorithm {algorithm!r}: {module_name} has no estimator class {class_name!r}")
    return cls


# Training ------------------------------------------------------------------------------


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
    model, params = _estimator(spec, frame)
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


def _estimator(spec: ModelSpec, frame: pd.DataFrame) -> tuple[Any, dict[str, Any]]:
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

    cls = _sklearn_class(f"model {spec.name!r}", spec.algorithm)
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
