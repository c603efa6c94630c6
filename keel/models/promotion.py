"""Champion/challenger promotion over the model registry, and the train job's two steps.

``promote_if_better`` scores the challenger and the champion on the same hold-out and
promotes the challenger only when it is better by the model's declared margin.
``holdout_from_lineage`` rebuilds that hold-out from what the challenger recorded when it
was trained (label snapshot, split time, feature snapshots), so both versions are judged on
rows neither was fitted on, with every feature either of them reads.

The comparison is recorded on the challenger (``validation_status`` passed or rejected, the
reason and both metrics). A promotion itself, automatic or by hand (``promote``, i.e.
``keel models promote NAME VERSION``), goes through ``keel.models.roles.settle``, which moves
the aliases and stages (the champion to Production, the one it replaces to Archived with
``retired_by``, so a rollback can find it) and rewrites the role tags. A promotion by hand
is a person's decision (a rollback, say): it skips the comparison, but refuses a version whose
recorded gate verdict (the version tag ``keel.gates``) failed unless told to ignore it.

The train job runs ``train_challenger`` (train, register, judge by ``keel.models.gates`` and
record the verdict on the version) and then ``promote_challenger`` (compare on the rebuilt hold-out, promote when better, reject
when the gates failed); a notebook can run the same two steps.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from keel.models.gates import gate_outcomes, gates_verdict
from keel.models.registration import log_and_register
from keel.models.registry import ModelVersionInfo, list_versions, load_native, resolve_version, version_info
from keel.models.registry_client import ModelRegistryError, mlflow_client, utc_now
from keel.models.role_types import CHALLENGER, Request, Roles
from keel.models.roles import read_roles, settle
from keel.models.spec import METRICS, resolve_refs
from keel.models.training import TrainResult, evaluate, train

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from keel.config import Settings
    from keel.features.training_sets import OfflineStore
    from keel.models.spec import ModelSpec


@dataclass(frozen=True)
class PromotionDecision:
    """The outcome of comparing a challenger with the champion on the same hold-out."""

    promoted: bool
    reason: str
    challenger_version: int
    champion_version: int | None
    metric: str
    challenger_metric: float | None = None
    champion_metric: float | None = None
    holdout_rows: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    roles: Roles | None = None  # the model's roles after the decision


# The version tag holding the promotion gates' verdict: "passed", or GATES_FAILED and why.
GATES_TAG = "keel.gates"
GATES_FAILED = "failed: "


def higher_is_better(metric: str) -> bool:
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not known (use one of {', '.join(METRICS)})")
    return METRICS[metric].higher_is_better


def promote_if_better(
    settings: Settings,
    spec: ModelSpec,
    holdout: pa.Table,
    *,
    gates_passed: bool = True,
    gate_reason: str = "",
    version: int | str | None = None,
) -> PromotionDecision:
    """Score the challenger (``version``, or the alias ``challenger``) and the champion on
    the same ``holdout`` with ``keel.models.training.evaluate`` and move ``champion`` when the
    challenger is better on ``spec.metric`` by at least ``spec.min_improvement``.

    ``holdout`` holds the label and every feature either version reads. The first version
    of a model becomes champion when ``gates_passed``; a failed gate rejects the challenger
    with ``gate_reason``. The decision is also recorded as tags on the challenger.
    """
    client = mlflow_client(settings)
    challenger = resolve_version(client, spec.name, CHALLENGER if version is None else version)
    roles = read_roles(client, spec.name)
    champion = client.get_model_version(spec.name, str(roles.champion)) if roles.champion is not None else None
    metric = spec.metric
    decision = dict(
        challenger_version=int(challenger.version), metric=metric, holdout_rows=holdout.num_rows, roles=roles
    )

    if champion is not None and champion.version == challenger.version:
        return PromotionDecision(
            False,
            f"version {challenger.version} is already the champion",
            champion_version=int(champion.version),
            **decision,
        )
    champion_version = int(champion.version) if champion is not None else None
    if not gates_passed:
        reason = f"promotion gates failed: {gate_reason}" if gate_reason else "promotion gates failed"
        _reject(client, challenger, reason, metric, None, None, champion_version)
        return PromotionDecision(False, reason, champion_version=champion_version, **decision)

    _check_holdout(holdout, spec, [mv for mv in (challenger, champion) if mv is not None])
    challenger_model, challenger_features = load_native(settings, challenger)
    challenger_value = _metric(evaluate(challenger_model, spec, holdout, challenger_features), metric, challenger)
    if champion is None:
        reason = f"first version of '{spec.name}' to pass the gates ({metric}={challenger_value:.6g})"
        decision["roles"] = _promote(client, challenger, reason, metric=metric, value=challenger_value)
        return PromotionDecision(True, reason, champion_version=None, challenger_metric=challenger_value, **decision)

    champion_model, champion_features = load_native(settings, champion)
    champion_value = _metric(evaluate(champion_model, spec, holdout, champion_features), metric, champion)
    improvement = (challenger_value - champion_value) * (1 if higher_is_better(metric) else -1)
    values = dict(challenger_metric=challenger_value, champion_metric=champion_value, champion_version=champion_version)
    comparison = (
        f"{metric} {challenger_value:.6g} (v{challenger.version}) vs {champion_value:.6g} (champion v{champion.version}) "
        f"on {holdout.num_rows} hold-out rows"
    )
    if math.isnan(improvement):
        reason = f"{comparison}: the metric is undefined on this hold-out (e.g. one class only)"
    elif improvement > 0 and improvement >= spec.min_improvement:
        reason = f"{comparison}: better by {improvement:.6g} (needs {spec.min_improvement:g})"
        decision["roles"] = _promote(client, challenger, reason, metric=metric, value=challenger_value)
        return PromotionDecision(True, reason, **values, **decision)
    else:
        reason = f"{comparison}: improvement {improvement:.6g} is below the required {spec.min_improvement:g}"
    _reject(client, challenger, reason, metric, challenger_value, champion_value, champion_version)
    return PromotionDecision(False, reason, **values, **decision)


def _check_holdout(holdout: pa.Table, spec: ModelSpec, versions: list[ModelVersion]) -> None:
    for mv in versions:
        missing = [c for c in [*json.loads(mv.tags.get("features", "[]")), spec.label] if c not in holdout.column_names]
        if missing:
            raise ValueError(
                f"model '{spec.name}' version {mv.version}: the hold-out lacks column(s) {missing}; build it with "
                f"the label and keel.models.promotion.comparison_features(settings, '{spec.name}')"
            )


def promote(settings: Settings, name: str, version: int | str, *, ignore_gates: bool = False) -> ModelVersionInfo:
    """Make ``version`` the champion by hand (e.g. a rollback): ``promotion=manual``.

    A version whose promotion gates failed (its ``keel.gates`` tag) is refused with
    ``ModelRegistryError`` unless ``ignore_gates``; a version with no recorded verdict (logged
    outside the train job) is a person's call."""
    client = mlflow_client(settings)
    target = resolve_version(client, name, version)
    verdict = target.tags.get(GATES_TAG, "")
    if verdict.startswith(GATES_FAILED) and not ignore_gates:
        raise ModelRegistryError(
            f"'{name}' v{target.version} did not pass its promotion gates ({verdict.removeprefix(GATES_FAILED)}); "
            f"to make it the champion anyway: keel models promote {name} {target.version} --ignore-gates"
        )
    champion = read_roles(client, name).champion
    reason = f"promoted by hand over v{champion}" if champion is not None else "promoted by hand"
    settle(client, name, Request("manual", champion=int(target.version), reason=reason))
    return version_info(client, client.get_model_version(name, target.version))


def _promote(client: MlflowClient, new: ModelVersion, reason: str, *, metric: str, value: float) -> Roles:
    """Record the passed comparison on ``new`` and make it the champion (``promotion=automatic``)."""
    tags = {
        "validation_status": "passed",
        "validation_reason": reason,
        "validated_at": utc_now(),
        f"validation.{metric}": repr(value),
    }
    for key, value_ in tags.items():
        client.set_model_version_tag(new.name, new.version, key, value_)
    return settle(client, new.name, Request("automatic", champion=int(new.version), reason=reason))


def _reject(
    client: MlflowClient,
    version: ModelVersion,
    reason: str,
    metric: str,
    challenger_value: float | None,
    champion_value: float | None,
    champion_version: int | None,
) -> None:
    tags = {"validation_status": "rejected", "validation_reason": reason, "validated_at": utc_now()}
    if challenger_value is not None:
        tags[f"validation.{metric}"] = repr(challenger_value)
    if champion_value is not None:
        tags[f"validation.champion_{metric}"] = repr(champion_value)
    if champion_version is not None:
        tags["validation.champion_version"] = str(champion_version)
    for key, value in tags.items():
        client.set_model_version_tag(version.name, version.version, key, value)


def _metric(metrics: dict[str, float], metric: str, mv: ModelVersion) -> float:
    if metric not in metrics:
        raise ValueError(
            f"model '{mv.name}' version {mv.version}: evaluation gave no {metric!r} (got {sorted(metrics)}); "
            "set the model's metric to one of those"
        )
    return float(metrics[metric])


def comparison_features(settings: Settings, name: str) -> list[str]:
    """The features a hold-out needs so ``promote_if_better`` can score both the challenger
    and the champion: the union of their feature lists, challenger's order first."""
    client = mlflow_client(settings)
    roles = read_roles(client, name)
    out: list[str] = []
    for version in (roles.challenger, roles.champion):
        if version is not None:
            mv = client.get_model_version(name, str(version))
            out += [f for f in json.loads(mv.tags.get("features", "[]")) if f not in out]
    return out


def holdout_from_lineage(store: OfflineStore, spec: ModelSpec, settings: Settings) -> pa.Table:
    """The challenger's hold-out, rebuilt from its recorded lineage: the label rows after its
    split time (up to when it was registered) at its label snapshot, with every feature the
    challenger or the champion reads, point-in-time at the snapshots each recorded."""
    from pyiceberg.expressions import And, GreaterThan, LessThanOrEqual

    versions = {v.version: v for v in list_versions(settings, spec.name)}
    roles = read_roles(mlflow_client(settings), spec.name)
    challenger = versions.get(roles.challenger)
    if challenger is None:
        raise ValueError(
            f"model '{spec.name}' has no challenger to compare (a promoted challenger is the champion); "
            "train it to register one"
        )
    champion = versions.get(roles.champion)
    snapshots = {**(champion.snapshots if champion else {}), **challenger.snapshots}
    split_time = dt.datetime.fromisoformat(challenger.tags["split_time"])
    cutoff = challenger.tags.get("label_cutoff")
    until = dt.datetime.fromisoformat(cutoff) if cutoff else challenger.created
    source, name = spec.labels, spec.labels.table_name
    labels = store.lake.read(
        name,
        snapshot_id=snapshots.get(name),
        row_filter=And(
            GreaterThan(source.timestamp, split_time.isoformat()), LessThanOrEqual(source.timestamp, until.isoformat())
        ),
    )
    order = [*source.key_columns, source.timestamp, *([source.event_id] if source.event_id else [])]
    labels = labels.filter(pc.is_valid(labels.column(spec.label))).sort_by([(c, "ascending") for c in order])
    labels = labels.select([*source.key_columns, source.timestamp, spec.label])
    refs = resolve_refs(store.project, spec, comparison_features(settings, spec.name))
    return store.get_training_set(labels, refs, timestamp=source.timestamp, as_of=snapshots).table


# The train job's two steps ------------------------------------------------------------


@dataclass(frozen=True)
class Challenger:
    """A challenger just trained and registered, and each gate's verdict on it."""

    result: TrainResult
    version: ModelVersionInfo
    gates: dict[str, tuple[bool, str]]

    @property
    def passed(self) -> bool:
        return gates_verdict(self.gates)[0]

    @property
    def verdict(self) -> str:
        """``all gates passed``, or the failed gates' sentences."""
        return gates_verdict(self.gates)[1]


def train_challenger(
    store: OfflineStore, settings: Settings, spec: ModelSpec, *, floor: float | None, now: dt.datetime | None = None
) -> Challenger:
    """Train ``spec`` (on the label rows up to ``now``), register the version as the challenger
    and judge it by the promotion gates with the metric ``floor`` (see ``keel.models.gates``)."""
    result = train(store, spec, now=now)
    version = log_and_register(settings, spec, result)
    challenger = Challenger(result, version, gate_outcomes(spec, result, floor))
    record_gates(settings, spec.name, version.version, challenger.gates)
    return challenger


def record_gates(settings: Settings, name: str, version: int, gates: dict[str, tuple[bool, str]]) -> None:
    """Record the gates' verdict on the version (``keel.gates``: ``passed``, or ``failed: `` and
    why), so a promotion by hand sees it too."""
    passed, why = gates_verdict(gates)
    verdict = "passed" if passed else f"{GATES_FAILED}{why}"
    mlflow_client(settings).set_model_version_tag(name, str(version), GATES_TAG, verdict[:5000])


def promote_challenger(
    store: OfflineStore, settings: Settings, spec: ModelSpec, *, gates_passed: bool = True, gate_reason: str = ""
) -> PromotionDecision:
    """Compare the challenger with the champion on the challenger's hold-out rebuilt from its
    lineage, and promote it when better (rejected when ``gates_passed`` is False)."""
    holdout = holdout_from_lineage(store, spec, settings)
    return promote_if_better(settings, spec, holdout, gates_passed=gates_passed, gate_reason=gate_reason)
