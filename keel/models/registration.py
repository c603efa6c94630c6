"""Registering a trained model: one MLflow run and a new version of the registered model, with its lineage.

Each training run becomes one MLflow run in the experiment named after the model, holding
its parameters, hold-out metrics, the model in its native flavour (with signature and
input example), the ordered feature list, the training set's snapshot ids, the code
version and the baseline statistics for drift monitoring. The run's model is registered as
a new version of the registered model ``spec.name`` and becomes the challenger (alias
``challenger``, stage Staging).

Reading versions back lives in ``keel.models.registry``, promotion in ``keel.models.promotion``;
roles (champion, challenger, retired), their aliases, stages and tags in ``keel.models.roles``.

The signature and input example describe the native model's input (``keel.models.training.model_frame``'s
encoding). MLflow's pyfunc wrapper cannot score string categories through JSON, so for such
models it logs a warning when it checks the example; Keel serves the native flavour anyway.

MLflow is imported inside the functions: it costs seconds, and the CLI only needs it for
the ``keel models`` commands.
"""

from __future__ import annotations

import contextlib
import json
from typing import TYPE_CHECKING, Any

from keel.models.baseline import baseline_stats, prediction_stats
from keel.models.reference import log_reference
from keel.models.registry import ModelVersionInfo, version_info
from keel.models.registry_client import flavour, mlflow_client, tracking
from keel.models.role_types import Request
from keel.models.roles import settle
from keel.models.training import model_frame

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from keel.config import Settings
    from keel.models.spec import ModelSpec
    from keel.models.training import TrainResult

MODEL_ARTIFACT = "model"
# scikit-learn models are stored with skops (no pickle); its loader refuses types outside
# its allow-list, and the one-hot encoder keeps numpy dtypes, which are plain data.
SKOPS_TRUSTED_TYPES = ["numpy.dtype"]
# Rows of the hold-out stored with the model as its input example.
INPUT_EXAMPLE_ROWS = 5


def log_and_register(
    settings: Settings, spec: ModelSpec, result: TrainResult, *, code_version: str | None = None
) -> ModelVersionInfo:
    """Log ``result`` as one MLflow run, register it as a new version of ``spec.name`` and
    give that version the alias ``challenger``."""
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    code_version = code_version or settings.code_version
    features = list(result.features)
    # The signature describes what the native model takes (keel.models.training's encoding), and the
    # output is keel.models.training.predict's score (positive-class probability or regression value).
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
    with tracking(settings), mlflow.start_run(experiment_id=experiment_id) as run:
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
        model_flavour = flavour(spec.algorithm)
        extra = {"skops_trusted_types": SKOPS_TRUSTED_TYPES} if spec.algorithm.startswith("sklearn:") else {}
        model_info = model_flavour.log_model(
            result.model,
            **extra,
            name=MODEL_ARTIFACT,
            signature=signature,
            input_example=example,
            registered_model_name=spec.name,
            pip_requirements=_pip_requirements(spec.algorithm),
        )
    version = str(model_info.registered_model_version)
    for key, value in version_tags.items():
        client.set_model_version_tag(spec.name, version, key, value)
    settle(client, spec.name, Request("automatic", challenger=int(version)))
    if spec.description or spec.owner:
        client.update_registered_model(spec.name, description=spec.description or None)
        if spec.owner:
            client.set_registered_model_tag(spec.name, "owner", spec.owner)
    return version_info(client, client.get_model_version(spec.name, version), run.info.run_id)


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


def _iso(value: Any) -> str:
    return value.isoformat() if hasattr(value, "isoformat") else str(value)
