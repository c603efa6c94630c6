"""Models as the server holds them: each name's champion (and challenger), loaded natively
from MLflow, and swapped whole when their roles move in the registry.

Roles are read with ``keel.models.roles.read_roles``, which writes nothing: an alias moved or
a stage transitioned in the MLflow UI is served at the next poll, before anything settles
it. A model whose champion was taken out with nothing to roll back to stops being served
(its predictions answer 404 and ``/health/ready`` says why) rather than serve a version a
person archived.

A ``ServedVersion`` knows its features in input order, where each is read online
(``group.feature``), what a request may give for each (its declared type and bounds,
``serving.inputs``), the value to use when one is missing (the baseline's median or mode),
and how to score rows of raw values. An XGBoost booster scores a ready float vector
(categories as the booster's own codes) with one thread, the fast path STYLE.md measures,
and a single row through ``serving.booster.OneRow`` (the C call without the Python
wrapper's per-call work); other flavours go through ``keel.models.training``' encoding.

``ModelSet`` holds one immutable ``ServedModel`` per name. A request reads it once and
uses that object to the end, and a new version is loaded completely before the mapping is
replaced, so a swap never fails a request nor mixes two versions in one answer.
"""

from __future__ import annotations

import datetime as dt
import functools
import gc
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from keel.models import registry
from keel.models.registry_client import mlflow_client
from keel.models.role_types import CHALLENGER, CHAMPION, Roles
from keel.models.roles import read_roles
from keel.models.training import model_frame, predict_frame
from serving.booster import OneRow
from serving.inputs import BadInput, InputSpec, input_specs

if TYPE_CHECKING:
    from keel.config import Settings
    from keel.project import Project

log = logging.getLogger("keel.serving")

NUMBER, CATEGORY, BOOL, TIMESTAMP = "number", "category", "bool", "timestamp"


@dataclass(frozen=True)
class ServedVersion:
    """One registered version, ready to score."""

    name: str
    version: int
    alias: str
    run_id: str
    task: str
    features: tuple[str, ...]
    refs: tuple[str, ...]
    kinds: tuple[str, ...]
    inputs: tuple[InputSpec, ...]  # what a request may give for each feature (serving.inputs)
    defaults: tuple[Any, ...]
    score: Callable[[list[list[Any]]], np.ndarray]

    @functools.cached_property
    def _inputs_by_name(self) -> dict[str, InputSpec]:
        return {spec.name: spec for spec in self.inputs}

    def checked(self, given: dict[str, Any]) -> dict[str, Any]:
        """Request-time values as the model takes them; BadInput names the first that does not fit."""
        specs = self._inputs_by_name
        unknown = sorted(set(given) - specs.keys())
        if unknown:
            raise BadInput(
                f"features: {unknown} are not inputs of model '{self.name}' v{self.version} "
                f"(it takes: {', '.join(self.features)})"
            )
        return {name: specs[name].check(value, f"features.{name}") for name, value in given.items()}

    def checked_columns(self, columns: dict[str, list[Any]], datatypes: dict[str, str]) -> dict[str, list[Any]]:
        """Open Inference Protocol inputs (one list per feature) as the model takes them."""
        specs = self._inputs_by_name
        unknown = sorted(set(columns) - specs.keys())
        if unknown:
            raise BadInput(
                f"inputs: {unknown} are not inputs of model '{self.name}' v{self.version} "
                f"(it takes: {', '.join(self.features)})"
            )
        out = {}
        for name, values in columns.items():
            spec = specs[name]
            if name in datatypes:
                spec.check_datatype(datatypes[name], f"inputs.{name}")
            out[name] = spec.check_column(values, f"inputs.{name}")
        return out

    def with_defaults(self, row: Sequence[Any]) -> tuple[list[Any], list[str]]:
        """The row with each missing value replaced by its default, and the names replaced."""
        out, missing = list(row), []
        for i, value in enumerate(out):
            if value is None or (isinstance(value, float) and value != value):
                missing.append(self.features[i])
                out[i] = self.defaults[i]
        return out, missing


@dataclass(frozen=True)
class ServedModel:
    name: str
    champion: ServedVersion
    challenger: ServedVersion | None

    @property
    def versions(self) -> dict[str, int]:
        out = {CHAMPION: self.champion.version}
        if self.challenger is not None:
            out[CHALLENGER] = self.challenger.version
        return out


def load_version(
    settings: Settings, project: Project, name: str, alias: str, version: int | None = None
) -> ServedVersion:
    """``version`` (by default the one in the role ``alias``), loaded natively with its baseline
    defaults, served as ``alias``."""
    model, features, info = registry.load_model(settings, name, alias if version is None else version)
    baseline = registry.load_baseline(settings, info.run_id).get("features", {})
    kinds = tuple(_kind(baseline.get(f, {}).get("dtype", "double")) for f in features)
    defaults = tuple(
        _default(baseline.get(f, {}).get("default"), kind) for f, kind in zip(features, kinds, strict=True)
    )
    recorded = info.tags.get("feature_refs")
    refs = tuple(_resolve(project, name, features, recorded))
    task = info.tags.get("task", "classification")
    algorithm = info.tags.get("algorithm", "")
    dtypes = tuple(baseline.get(f, {}).get("dtype", "double") for f in features)
    inputs = input_specs(project, refs, dtypes)
    if algorithm == "xgboost":
        score = xgboost_scorer(model, features, kinds)
    else:
        score = _generic_scorer(model, task, features, dtypes)
    return ServedVersion(
        name=name,
        version=info.version,
        alias=alias,
        run_id=info.run_id,
        task=task,
        features=tuple(features),
        refs=refs,
        kinds=kinds,
        inputs=inputs,
        defaults=defaults,
        score=score,
    )


class ModelSet:
    """The served models by name, each replaced whole when its roles move in the registry."""

    def __init__(self, settings: Settings, project: Project, names: Sequence[str]) -> None:
        self.settings = settings
        self.project = project
        self.names = tuple(names)
        self._models: dict[str, ServedModel] = {}
        self._lock = threading.Lock()  # one refresh at a time; readers never take it
        self.errors: dict[str, str] = {}
        self.swaps = 0

    def get(self, name: str) -> ServedModel | None:
        return self._models.get(name)

    @property
    def ready(self) -> bool:
        return all(name in self._models for name in self.names)

    def snapshot(self) -> dict[str, ServedModel]:
        return self._models

    def refresh(self) -> list[str]:
        """Load any version whose role moved since the last refresh; returns what changed."""
        changes = []
        with self._lock:
            client = mlflow_client(self.settings)
            for name in self.names:
                try:
                    roles = read_roles(client, name)
                    current = self._models.get(name)
                    if roles.champion is None:
                        self.errors[name] = _no_champion(roles)
                        if current is not None:
                            self._models = {n: m for n, m in self._models.items() if n != name}
                            changes.append(f"{name}: no champion")
                            log.warning("stopped serving %s: %s", name, self.errors[name])
                        continue
                    wanted = {CHAMPION: roles.champion}
                    if roles.challenger is not None:
                        wanted[CHALLENGER] = roles.challenger
                    if current is not None and current.versions == wanted:
                        continue
                    champion = self._version(current, name, CHAMPION, wanted)
                    challenger = self._version(current, name, CHALLENGER, wanted) if CHALLENGER in wanted else None
                    served = ServedModel(name, champion, challenger)
                except Exception as exc:  # noqa: BLE001 - a failed load keeps the loaded version serving
                    self.errors[name] = f"model '{name}': {exc}"
                    log.warning("could not load %s: %s", name, exc)
                    continue
                self.errors.pop(name, None)
                self._models = {**self._models, name: served}
                self.swaps += current is not None
                changes.append(f"{name}: {served.versions}")
                log.info("serving %s %s", name, served.versions)
        return changes

    def _version(self, current: ServedModel | None, name: str, alias: str, roles: dict[str, int]) -> ServedVersion:
        """Reuse a loaded version when it keeps a role (a champion that was the challenger before)."""
        wanted = roles[alias]
        for loaded in (current.champion, current.challenger) if current else ():
            if loaded is not None and loaded.version == wanted:
                return loaded if loaded.alias == alias else _realias(loaded, alias)
        return load_version(self.settings, self.project, name, alias, wanted)


class RegistryPoller:
    """Refreshes a ModelSet every ``interval_s`` on a daemon thread until stopped."""

    def __init__(self, models: ModelSet, interval_s: float) -> None:
        self.models = models
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="keel-registry-poll", daemon=True)
        self.last_poll: dt.datetime | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if self.models.refresh():
                    # A new version's objects live as long as it serves: keep full collections off them.
                    gc.freeze()
            except Exception as exc:  # noqa: BLE001 - the registry may be briefly unreachable
                log.warning("registry poll failed: %s", exc)
            self.last_poll = dt.datetime.now(dt.UTC)


def _no_champion(roles: Roles) -> str:
    if roles.previous_champion is None:
        return f"model '{roles.name}' has no champion yet: train it, or `keel models promote {roles.name} VERSION`"
    return (
        f"model '{roles.name}' has no champion: v{roles.previous_champion} was taken out ({roles.how}, {roles.at}) "
        f"and had replaced no version to roll back to; `keel models promote {roles.name} VERSION`"
    )


def _realias(version: ServedVersion, alias: str) -> ServedVersion:
    from dataclasses import replace

    return replace(version, alias=alias)


def _resolve(project: Project, name: str, features: Sequence[str], recorded: str | None) -> list[str]:
    """``group.feature`` for each feature: as the version recorded, else the one group with that name."""
    import json

    if recorded:
        refs = json.loads(recorded)
        if len(refs) == len(features):
            return refs
    out = []
    for feature in features:
        owners = [g.name for g in project.feature_groups if any(f.name == feature for f in g.features)]
        out.append(f"{owners[0]}.{feature}" if len(owners) == 1 else feature)
    return out


def _kind(dtype: str) -> str:
    if dtype in ("string", "large_string"):
        return CATEGORY
    if dtype == "bool":
        return BOOL
    if dtype.startswith("timestamp"):
        return TIMESTAMP
    return NUMBER


def _default(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == BOOL:
        return value in (True, "true", "True", 1)
    return value


def xgboost_scorer(model, features: Sequence[str], kinds: Sequence[str]) -> Callable[[list[list[Any]]], np.ndarray]:
    """Rows of raw values -> the booster's scores, on a float matrix with the booster's own category codes."""
    booster = model.get_booster() if hasattr(model, "get_booster") else model
    booster.set_param({"nthread": 1})
    codes: dict[int, dict[str, int]] = {}
    stored = dict(booster.get_categories(export_to_arrow=True).to_arrow() or [])
    for i, (feature, kind) in enumerate(zip(features, kinds, strict=True)):
        if kind == CATEGORY:
            values = stored.get(feature)
            codes[i] = {v: c for c, v in enumerate(values.to_pylist())} if values is not None else {}
    one_row = OneRow.for_booster(booster, len(features))

    def encode(row: Sequence[Any]) -> list[float]:
        out = []
        for i, value in enumerate(row):
            if value is None:
                out.append(np.nan)
            elif i in codes:
                code = codes[i].get(value)
                out.append(np.nan if code is None else code)
            elif isinstance(value, dt.datetime):
                out.append(value.timestamp())
            else:
                out.append(float(value))
        return out

    def score(rows: list[list[Any]]) -> np.ndarray:
        encoded = [encode(row) for row in rows]
        if len(encoded) == 1 and one_row is not None:
            scores = one_row.try_score(encoded[0])
            if scores is not None:
                return scores
        matrix = np.asarray(encoded, dtype=np.float64).reshape(len(encoded), len(features))
        return np.asarray(booster.inplace_predict(matrix, validate_features=False), dtype=np.float64).reshape(-1)

    return score


def _generic_scorer(model, task: str, features: Sequence[str], dtypes: Sequence[str]) -> Callable:
    """Rows of raw values -> scores through keel.models.training' own encoding (any flavour)."""
    types = [_arrow_type(d) for d in dtypes]

    def score(rows: list[list[Any]]) -> np.ndarray:
        columns = {f: pa.array([row[i] for row in rows], types[i]) for i, f in enumerate(features)}
        return predict_frame(model, task, model_frame(pa.table(columns), features))

    return score


def _arrow_type(dtype: str) -> pa.DataType:
    if dtype.startswith("timestamp"):
        return pa.timestamp("us", tz="UTC")
    try:
        return pa.type_for_alias(dtype)
    except ValueError:
        return pa.float64()
