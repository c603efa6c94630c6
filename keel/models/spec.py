"""Model declarations: what a model predicts, from which features, with what estimator.

A ``ModelSpec`` names an entity, its features (whole groups or ``group.feature``), a source
of delayed labels and an estimator; it is checked when declared, and the error names the
model and the fix. ``load_models`` reads the models a project declares. Training them is
``keel.models.training``.
"""

from __future__ import annotations

import datetime as dt
import importlib
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from keel.dsl import DeclarationError, Entity, EventSource, FeatureGroup, check_name, window_seconds
from keel.project import Project

TASKS = ("classification", "regression")
ALGORITHMS = ("xgboost", "lightgbm", "sklearn:<module.Class>")


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
        check_name("model", self.name)
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
        cls = sklearn_class(where, self.algorithm)
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


def sklearn_class(where: str, algorithm: str) -> type:
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
