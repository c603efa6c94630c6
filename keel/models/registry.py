"""Reading the model registry: a model's versions, one version's lineage, its baseline and
its native model.

A version (registered by ``keel.models.registration``) records its hold-out metrics, its
features in order, the training set's snapshot ids and the code version. ``champion`` and
``challenger`` given as a version resolve to the effective roles (``keel.models.roles``), a
stage a person moved in the MLflow UI included.

MLflow is imported inside the functions: it costs seconds, and the CLI only needs it for
the ``keel models`` commands.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from keel.models.registry_client import (
    ModelRegistryError,
    alias_version,
    flavour,
    mlflow_client,
    quote,
    registered_model,
    tracking,
)
from keel.models.role_types import CHALLENGER, CHAMPION
from keel.models.roles import read_roles

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from keel.config import Settings


@dataclass(frozen=True)
class ModelVersionInfo:
    """One registered version and its lineage, as recorded when it was trained."""

    name: str
    version: int
    run_id: str
    aliases: tuple[str, ...]
    metrics: dict[str, float]
    tags: dict[str, str]
    created: dt.datetime
    features: list[str]
    snapshots: dict[str, int | None]
    code_version: str
    status: str
    stage: str = "None"

    def as_row(self) -> dict[str, Any]:
        """A flat, JSON-friendly row for listings."""
        row = asdict(self)
        row["aliases"] = list(self.aliases)
        row["created"] = self.created.isoformat(timespec="seconds")
        del row["tags"]
        return row


def list_versions(settings: Settings, name: str) -> list[ModelVersionInfo]:
    """Every version of ``name``, newest first, with aliases, hold-out metrics and lineage."""
    client = mlflow_client(settings)
    # search_model_versions leaves aliases out; the registered model has them all.
    aliases: dict[str, list[str]] = {}
    for alias, version in registered_model(client, name).aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    versions = client.search_model_versions(f"name = '{quote(name)}'")
    infos = [version_info(client, v, aliases=aliases.get(str(v.version), [])) for v in versions]
    return sorted(infos, key=lambda info: info.version, reverse=True)


def show(settings: Settings, name: str, version: int | str) -> dict[str, Any]:
    """The lineage of one version (a number or an alias): features in order, snapshot ids,
    code version, run, metrics, parameters and the time split."""
    client = mlflow_client(settings)
    mv = resolve_version(client, name, version)
    run = client.get_run(mv.run_id)
    info = version_info(client, mv, run=run)
    params = dict(run.data.params)
    split = {key: params.pop(f"keel.{key}", None) for key in ("split_time", "holdout", "train_rows", "holdout_rows")}
    for key in ("train_rows", "holdout_rows"):
        if split[key] is not None:
            split[key] = int(split[key])
    keel_params = {key.removeprefix("keel."): params.pop(key) for key in list(params) if key.startswith("keel.")}
    return {
        "name": name,
        "version": info.version,
        "aliases": list(info.aliases),
        "stage": info.stage,
        "status": info.status,
        "created": info.created.isoformat(timespec="seconds"),
        "run_id": info.run_id,
        "experiment_id": run.info.experiment_id,
        "model_uri": f"models:/{name}/{info.version}",
        "artifact_uri": run.info.artifact_uri,
        "features": info.features,
        "feature_refs": json.loads(info.tags.get("feature_refs", "[]")),
        "feature_definitions": json.loads(info.tags.get("feature_definitions", "{}")),
        "snapshots": info.snapshots,
        "training_set": {
            "digest": info.tags.get("training_set_digest"),
            "rows": int(info.tags["training_set_rows"]) if "training_set_rows" in info.tags else None,
            "label_cutoff": info.tags.get("label_cutoff"),
        },
        "code_version": info.code_version,
        "metrics": info.metrics,
        "params": params,
        "training": keel_params,
        "split": split,
        "tags": info.tags,
    }


def get_version(settings: Settings, name: str, alias_or_version: int | str) -> ModelVersionInfo:
    """One version (a number or an alias) with its recorded lineage."""
    client = mlflow_client(settings)
    return version_info(client, resolve_version(client, name, alias_or_version))


def load_baseline(settings: Settings, run_id: str) -> dict:
    """The baseline statistics a version's run logged (``baseline.json``): per-feature
    distributions and serving defaults, and the prediction distribution."""
    import tempfile

    client = mlflow_client(settings)
    with tempfile.TemporaryDirectory() as folder:
        path = client.download_artifacts(run_id, "baseline.json", folder)
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)


def load_model(
    settings: Settings, name: str, alias_or_version: int | str = CHAMPION
) -> tuple[Any, list[str], ModelVersionInfo]:
    """The native model of a version (a number or an alias such as ``champion``), its
    features in input order, and the version's info."""
    client = mlflow_client(settings)
    mv = resolve_version(client, name, alias_or_version)
    model, features = load_native(settings, mv)
    return model, features, version_info(client, mv)


def load_native(settings: Settings, mv: ModelVersion) -> tuple[Any, list[str]]:
    algorithm = mv.tags.get("algorithm")
    if algorithm is None:
        raise ModelRegistryError(
            f"model '{mv.name}' version {mv.version} has no 'algorithm' tag: it was not registered by Keel; "
            "register models with keel.models.registration.log_and_register"
        )
    with tracking(settings):
        model = flavour(algorithm).load_model(f"models:/{mv.name}/{mv.version}")
    return model, json.loads(mv.tags["features"])


def resolve_version(client: MlflowClient, name: str, alias_or_version: int | str) -> ModelVersion:
    """A version by number (``3`` or ``v3``), by role (``champion``, ``challenger``: the effective
    roles of keel.models.roles) or by any other alias."""
    from mlflow.exceptions import MlflowException

    ref = str(alias_or_version)
    if ref in (CHAMPION, CHALLENGER):
        return _role_version(client, name, ref)
    registered_model(client, name)
    if ref.startswith("v") and ref[1:].isdigit():
        ref = ref[1:]
    if ref.isdigit():
        try:
            return client.get_model_version(name, ref)
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            known = sorted(int(v.version) for v in client.search_model_versions(f"name = '{quote(name)}'"))
            raise ModelRegistryError(
                f"model '{name}' has no version {ref} (versions: {', '.join(map(str, known)) or 'none'}); "
                f"see `keel models list {name}`"
            ) from None
    mv = alias_version(client, name, ref)
    if mv is None:
        fix = f"give a version number or an alias it has (aliases: {', '.join(_aliases(client, name)) or 'none'})"
        raise ModelRegistryError(f"model '{name}' has no version with alias '{ref}': {fix}")
    return mv


def _role_version(client: MlflowClient, name: str, role: str) -> ModelVersion:
    roles = read_roles(client, name)
    version = roles.champion if role == CHAMPION else roles.challenger
    if version is None:
        if role == CHALLENGER:
            fix = "no challenger: train the model to register one (a promoted challenger is the champion)"
        elif roles.previous_champion is not None:
            fix = (
                f"no champion: v{roles.previous_champion} was taken out ({roles.how}, {roles.at}); "
                f"promote a version with `keel models promote {name} VERSION`"
            )
        else:
            fix = f"no champion yet: promote a version with `keel models promote {name} VERSION`"
        raise ModelRegistryError(f"model '{name}' has no version with alias '{role}': {fix}")
    return client.get_model_version(name, str(version))


def _aliases(client: MlflowClient, name: str) -> list[str]:
    return sorted(client.get_registered_model(name).aliases)


def version_info(
    client: MlflowClient, mv: ModelVersion, run_id: str | None = None, *, run=None, aliases=None
) -> ModelVersionInfo:
    run = run or client.get_run(run_id or mv.run_id)
    tags = dict(mv.tags)
    return ModelVersionInfo(
        name=mv.name,
        version=int(mv.version),
        run_id=run.info.run_id,
        aliases=tuple(sorted(mv.aliases if aliases is None else aliases)),
        metrics=dict(run.data.metrics),
        tags=tags,
        created=dt.datetime.fromtimestamp(mv.creation_timestamp / 1000, dt.UTC),
        features=json.loads(tags.get("features", "[]")),
        snapshots=json.loads(tags.get("snapshot_ids", "{}")),
        code_version=tags.get("code_version", ""),
        status=tags.get("validation_status", "unknown"),
        stage=mv.current_stage or "None",
    )
