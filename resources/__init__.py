"""Dagster resources wrapping keel's clients, configured from keel.config's variables."""

import os

import dagster as dg

from keel.config import VARIABLES, Settings
from keel.lakehouse.tables import Lakehouse
from keel.online.store import OnlineStore
from keel.project import Project
from keel.store import FeatureStore


def _setting(key: str, default: str | None = None) -> str | dg.EnvVar | None:
    # An EnvVar when the variable is set, so the UI shows where the value comes from and the
    # value is read when a run starts; otherwise the default (dg.EnvVar fails on an unset variable).
    var = VARIABLES[key].name
    return dg.EnvVar(var) if os.environ.get(var, "").strip() else default


def _variables(values: dict[str, str | None]) -> dict[str, str]:
    """A resource's fields as ``KEEL_*`` variables. A field left unset takes its ``KEEL_*_FILE``
    from the run's environment: a secret in a file is read when the run starts, and never
    becomes resource configuration the UI would show."""
    out = {}
    for key, value in values.items():
        name = VARIABLES[key].name
        if value:
            out[name] = value
        elif os.environ.get(f"{name}_FILE", "").strip():
            out[f"{name}_FILE"] = os.environ[f"{name}_FILE"]
    return out


class LakehouseResource(dg.ConfigurableResource):
    """The Iceberg lakehouse: catalog, warehouse (and its object store's endpoint) and the code
    version stamped on snapshots.

    A setting left unset is derived from ``home`` when a run starts, as keel.config does.
    """

    home: str
    catalog_uri: str | None = None
    warehouse: str | None = None
    s3_endpoint: str | None = None
    landing: str | None = None
    code_version: str | None = None
    # Where entity shards of backfills and training sets run (keel.compute), and how many.
    compute: str | None = None
    max_memory: str | None = None
    shards: str | None = None
    project: str | None = None

    def settings(self) -> Settings:
        values = {
            "home": self.home,
            "catalog_uri": self.catalog_uri,
            "warehouse": self.warehouse,
            "s3_endpoint": self.s3_endpoint,
            "landing": self.landing,
            "code_version": self.code_version,
            "compute": self.compute,
            "max_memory": self.max_memory,
            "shards": self.shards,
            "project": self.project,
        }
        return Settings.from_env(_variables(values))

    def lakehouse(self) -> Lakehouse:
        return Lakehouse.from_settings(self.settings())

    def feature_store(self, project: Project) -> FeatureStore:
        """The feature store of ``project`` over this lakehouse, its shards on the configured compute engine."""
        return FeatureStore(self.lakehouse(), project, settings=self.settings())


def lakehouse_resource(settings: Settings | None = None) -> LakehouseResource:
    """The resource for ``settings`` (the environment's by default; a bad value fails here, at load)."""
    s = settings or Settings.from_env()
    if settings is not None:  # explicit settings, e.g. a test's: use them as they are
        return LakehouseResource(
            home=str(s.home),
            catalog_uri=s.catalog_uri,
            warehouse=s.warehouse,
            s3_endpoint=s.s3_endpoint,
            landing=str(s.landing),
            code_version=s.code_version,
            compute=s.compute,
            max_memory=str(s.max_memory) if s.max_memory else None,
            shards=str(s.shards) if s.shards else None,
            project=s.project,
        )
    return LakehouseResource(
        home=_setting("home", str(s.home)),
        catalog_uri=_setting("catalog_uri"),
        warehouse=_setting("warehouse"),
        # KEEL_S3_ENDPOINT, else the AWS endpoint variables keel.config falls back to.
        s3_endpoint=_setting("s3_endpoint", s.s3_endpoint),
        landing=_setting("landing"),
        code_version=_setting("code_version", s.code_version),
        compute=_setting("compute"),
        max_memory=_setting("max_memory"),
        shards=_setting("shards"),
        project=_setting("project"),
    )


class OnlineStoreResource(dg.ConfigurableResource):
    """The online store: Redis when ``redis_url`` is set, else SQLite under ``home``."""

    home: str
    redis_url: str | None = None

    def store(self) -> OnlineStore:
        values = {"home": self.home, "redis_url": self.redis_url}
        return OnlineStore.from_settings(Settings.from_env(_variables(values)))


def online_resource(settings: Settings | None = None) -> OnlineStoreResource:
    s = settings or Settings.from_env()
    if settings is not None:
        return OnlineStoreResource(home=str(s.home), redis_url=s.redis_url)
    return OnlineStoreResource(home=_setting("home", str(s.home)), redis_url=_setting("redis_url"))


class MlflowResource(dg.ConfigurableResource):
    """MLflow tracking and registry: ``mlflow_uri``, or SQLite under ``home`` when unset; its UI at ``mlflow_ui_url``."""

    home: str
    mlflow_uri: str | None = None
    mlflow_ui_url: str | None = None
    code_version: str | None = None

    def settings(self) -> Settings:
        values = {
            "home": self.home,
            "mlflow_uri": self.mlflow_uri,
            "mlflow_ui_url": self.mlflow_ui_url,
            "code_version": self.code_version,
        }
        return Settings.from_env(_variables(values))


def mlflow_resource(settings: Settings | None = None) -> MlflowResource:
    s = settings or Settings.from_env()
    if settings is not None:
        return MlflowResource(
            home=str(s.home), mlflow_uri=s.mlflow_uri, mlflow_ui_url=s.mlflow_ui_url, code_version=s.code_version
        )
    return MlflowResource(
        home=_setting("home", str(s.home)),
        mlflow_uri=_setting("mlflow_uri"),
        mlflow_ui_url=_setting("mlflow_ui_url"),
        code_version=_setting("code_version", s.code_version),
    )


def resource_definitions(settings: Settings | None = None) -> dg.Definitions:
    from resources.kafka import kafka_resource

    return dg.Definitions(
        resources={
            "lakehouse": lakehouse_resource(settings),
            "online": online_resource(settings),
            "mlflow": mlflow_resource(settings),
            "kafka": kafka_resource(settings),
        }
    )
