"""The MLflow registry as the models modules reach it: the client, MLflow's tracking URIs
pointed at Keel's store for a block, a registered model or an alias looked up, and a model's
MLflow flavour.

MLflow is imported inside the functions: it costs seconds, and the CLI only needs it for
the ``keel models`` commands.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from keel.config import Settings


class ModelRegistryError(LookupError):
    """A model, version or alias is missing from the registry; the message says how to fix it."""


def mlflow_client(settings: Settings) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=settings.mlflow_uri, registry_uri=settings.mlflow_uri)


@contextlib.contextmanager
def tracking(settings: Settings) -> Iterator[None]:
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


def flavour(algorithm: str):
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


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def quote(name: str) -> str:
    return name.replace("'", "\\'")


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
