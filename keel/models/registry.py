"""The model registry: trained models to MLflow as versions, with their lineage.

Each training run becomes one MLflow run in the experiment named after the model, holding
its parameters, hold-out metrics, the model in its native flavour (with signature and
input example), the ordered feature list, the training set's snapshot ids, the code
version and the baseline statistics for drift monitoring. The run's model is registered as
a new version of the registered model ``spec.name`` and becomes the challenger (alias
``challenger``, stage Staging).

Promotion lives in ``keel.models.promotion``; roles (champion, challenger, retired), their aliases,
stages and tags in ``keel.models.roles``. ``champion`` and ``challenger`` given as a version
resolve to the effective roles, a stage a person moved in the MLflow UI included.

The signature and input example describe the native model's input (``keel.models.spec.model_frame``'s
encoding). MLflow's pyfunc wrapper cannot score string categories through JSON, so for such
models it logs a warning when it checks the example; Keel serves the native flavour anyway.

MLflow is imported inside the functions: it costs seconds, and the CLI only needs it for
the ``keel models`` commands.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from keel.models.baseline import baseline_stats, prediction_stats
from keel.models.reference import log_reference

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from keel.config import Settings
    from keel.models.spec import ModelSpec, TrainResult

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_ARTIFACT = "model"
# scikit-learn models are stored with skops (no pickle); its loader refuses types outside
# its allow-list, and the one-hot encoder keeps numpy dtypes, which are plain data.
SKOPS_TRUSTED_TYPES = ["numpy.dtype"]
# Rows of the hold-out stored with the model as its input example.
INPUT_EXAMPLE_ROWS = 5


class ModelRegistryError(LookupError):
    """A model, version or alias is missing from the registry; the message says how to fix it."""


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


# ---------------------------------------------------------------------------------------
# Logging and registration


def log_and_register(
    settings: Settings, spec: ModelSpec, result: TrainResult, *, code_version: str | None = None
) -> ModelVersionInfo:
    """Log ``result`` as one MLflow run, register it as a new version of ``spec.name`` and
    give that version the alias ``challenger``."""
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    from keel.models.spec import model_frame

    code_version = code_version or settings.code_version
    features = list(result.features)
    # The signature describes what the native model takes (keel.models.spec' encoding), and the
    # output is keel.models.spec.predict's score (positive-class probability or regression value).
    holdout_x = model_frame(result.holdout, features)
    example = holdout_x.head(INPUT_EXAMPLE_ROWS).copy()
    # MLflow compares the column index with a range, which pandas 3 deprecates for its
    # Arrow-backed string index (a warning per logged model); an object index compares quietly.
    example.columns = pd.Index(list(example.columns), dtype=object)
    signature = infer_signature(holdout_x, result.predictions)

    snapshots = dict(result.training_set.snapshots)
    split = {
        "split_time": _iso(result.split_time),
        "holdout": str(getattr(spec.split, "holdout", spec.split)),
        "train_rows": int(result.train_rows),
        "holdout_rows": int(result.holdout_rows),
    }
    # Features are summarised over the whole training set; predictions over the hold-out,
    # which is the model's out-of-sample behaviour and so what live scores should resemble.
    baseline = baseline_stats(result.training_set.table, None, features)
    baseline["prediction"] = prediction_stats(result.predictions)
    baseline["prediction_rows"] = "holdout"

    # The definitions the set was computed with: a reproduction under changed ones says so.
    definitions = {
        name: f"v{group['version']}-{group['fingerprint']}"
        for name, group in result.training_set.groups.items()
        if "version" in group and "fingerprint" in group
    }
    version_tags = {
        "features": json.dumps(features),
        "feature_refs": json.dumps(result.refs),
        "feature_definitions": json.dumps(definitions, sort_keys=True),
        "snapshot_ids": json.dumps(snapshots, sort_keys=True),
        "label_cutoff": _iso(result.cutoff) if result.cutoff else "",
        "training_set_digest": result.training_set.digest(),
        "training_set_rows": str(result.training_set.table.num_rows),
        "params": json.dumps(spec.params, sort_keys=True, default=repr),
        "code_version": code_version,
        "algorithm": spec.algorithm,
        "task": spec.task,
        "metric": spec.metric,
        "split_time": split["split_time"],
        "validation_status": "pending",
    }
    keel_params = {
        "keel.algorithm": spec.algorithm,
        "keel.task": spec.task,
        "keel.metric": spec.metric,
        "keel.min_improvement": spec.min_improvement,
        "keel.label": spec.label,
        "keel.feature_count": len(features),
        **{f"keel.{k}": v for k, v in split.items()},
    }
    client = mlflow_client(settings)
    experiment_id = _experiment(client, settings, spec.name)
    with _tracking(settings), mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_params({**_flat_params(result.params), **keel_params})
        mlflow.log_metrics({k: float(v) for k, v in result.metrics.items() if _is_number(v)})
        mlflow.set_tags(
            {
                "keel.model": spec.name,
                "mlflow.source.git.commit": code_version,
                "code_version": code_version,
                "features": version_tags["features"][:8000],
                **{f"snapshot.{group}": str(sid) for group, sid in snapshots.items()},
            }
        )
        mlflow.log_dict({"features": features}, "features.json")
        lineage = {
            "snapshots": snapshots,
            "features": features,
            "split": split,
            "training_set": result.training_set.metadata(),
        }
        # Group metadata may hold timestamps; they are recorded as ISO strings.
        mlflow.log_text(json.dumps(lineage, indent=1, default=_iso), "training_set.json")
        mlflow.log_dict(baseline, "baseline.json")
        log_reference(spec, result)
        flavour = _flavour(spec.algorithm)
        extra = {"skops_trusted_types": SKOPS_TRUSTED_TYPES} if spec.algorithm.startswith("sklearn:") else {}
        model_info = flavour.log_model(
            result.model,
            **extra,
            name=MODEL_ARTIFACT,
            signature=signature,
            input_example=example,
            registered_model_name=spec.name,
            pip_requirements=_pip_requirements(spec.algorithm),
        )
    from keel.models.roles import Request, settle

    version = str(model_info.registered_model_version)
    for key, value in version_tags.items():
        client.set_model_version_tag(spec.name, version, key, value)
    settle(client, spec.name, Request("automatic", challenger=int(version)))
    if spec.description or spec.owner:
        client.update_registered_model(spec.name, description=spec.description or None)
        if spec.owner:
            client.set_registered_model_tag(spec.name, "owner", spec.owner)
    return version_info(client, client.get_model_version(spec.name, version), run.info.run_id)


# ---------------------------------------------------------------------------------------
# Reading


def list_versions(settings: Settings, name: str) -> list[ModelVersionInfo]:
    """Every version of ``name``, newest first, with aliases, hold-out metrics and lineage."""
    client = mlflow_client(settings)
    # search_model_versions leaves aliases out; the registered model has them all.
    aliases: dict[str, list[str]] = {}
    for alias, version in registered_model(client, name).aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    versions = client.search_model_versions(f"name = '{_quote(name)}'")
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


# ---------------------------------------------------------------------------------------
# MLflow plumbing


def mlflow_client(settings: Settings) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=settings.mlflow_uri, registry_uri=settings.mlflow_uri)


@contextlib.contextmanager
def _tracking(settings: Settings) -> Iterator[None]:
    """Point MLflow's fluent API (which ``log_model`` uses) at Keel's store for a block."""
    import mlflow

    tracking, registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(settings.mlflow_uri)
    mlflow.set_registry_uri(settings.mlflow_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(tracking)
        mlflow.set_registry_uri(registry)


def _experiment(client: MlflowClient, settings: Settings, name: str) -> str:
    """The experiment named after the model, created with its artifacts under KEEL_HOME
    (MLflow would otherwise put a local store's artifacts under the working directory)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = None
        if not settings.mlflow_uri.startswith(("http:", "https:", "databricks")):
            location = (settings.home / "mlartifacts" / name).as_uri()
        try:
            return client.create_experiment(name, artifact_location=location, tags={"keel.model": name})
        except MlflowException:
            # Created by a concurrent run between the lookup and the create.
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def _flavour(algorithm: str):
    if algorithm == "xgboost":
        import mlflow.xgboost

        return mlflow.xgboost
    if algorithm == "lightgbm":
        import mlflow.lightgbm

        return mlflow.lightgbm
    if algorithm.startswith("sklearn:"):
        import mlflow.sklearn

        return mlflow.sklearn
    raise ValueError(
        f"algorithm {algorithm!r} has no MLflow flavour (use 'xgboost', 'lightgbm' or 'sklearn:<module.Class>')"
    )


def _pip_requirements(algorithm: str) -> list[str]:
    """Pinned requirements, stated so MLflow need not infer them (a subprocess that reloads the model)."""
    from importlib.metadata import PackageNotFoundError, version

    packages = ["mlflow", "scikit-learn", "numpy", "pandas", "pyarrow"]
    if algorithm in ("xgboost", "lightgbm"):
        packages.append(algorithm)
    out = []
    for package in packages:
        with contextlib.suppress(PackageNotFoundError):
            out.append(f"{package}=={version(package)}")
    return out


def load_native(settings: Settings, mv: ModelVersion) -> tuple[Any, list[str]]:
    algorithm = mv.tags.get("algorithm")
    if algorithm is None:
        raise ModelRegistryError(
            f"model '{mv.name}' version {mv.version} has no 'algorithm' tag: it was not registered by Keel; "
            "register models with keel.models.registry.log_and_register"
        )
    with _tracking(settings):
        model = _flavour(algorithm).load_model(f"models:/{mv.name}/{mv.version}")
    return model, json.loads(mv.tags["features"])


def registered_model(client: MlflowClient, name: str):
    """The registered model ``name``; a ModelRegistryError naming the known ones when there is none."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        known = sorted(m.name for m in client.search_registered_models())
        raise ModelRegistryError(
            f"model '{name}' is not registered (registered: {', '.join(known) or 'none'}); "
            "train it first, or check the name with `keel models list`"
        ) from None


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
            known = sorted(int(v.version) for v in client.search_model_versions(f"name = '{_quote(name)}'"))
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
    from keel.models.roles import read_roles

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


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


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


def _flat_params(params: dict[str, Any]) -> dict[str, str]:
    return {
        str(k): json.dumps(v, default=str) if isinstance(v, dict | list | tuple) else str(v)
        for k, v in (params or {}).items()
    }


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _quote(name: str) -> str:
    return name.replace("'", "\\'")


def _iso(value: Any) -> str:
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
