"""Dagster resources wrapping keel's clients, configured from keel.config's variables."""

import os

import dagster as dg

from keel.config import VARIABLES, Settings
from keel.lakehouse import Lakehouse


def _setting(key: str, default: str) -> str | dg.EnvVar:
    # An EnvVar when the variable is set, so the UI shows where the value comes from; the
    # embedded default otherwise (dg.EnvVar fails on an unset variable).
    var = VARIABLES[key].name
    return dg.EnvVar(var) if os.environ.get(var, "").strip() else default


class LakehouseResource(dg.ConfigurableResource):
    """The Iceberg lakehouse: catalog, warehouse and the code version stamped on snapshots."""

    home: str
    catalog_uri: str
    warehouse: str
    landing: str
    code_version: str

    def settings(self) -> Settings:
        env = {
            VARIABLES["home"].name: self.home,
            VARIABLES["catalog_uri"].name: self.catalog_uri,
            VARIABLES["warehouse"].name: self.warehouse,
            VARIABLES["landing"].name: self.landing,
            VARIABLES["code_version"].name: self.code_version,
        }
        return Settings.from_env(env)

    def lakehouse(self) -> Lakehouse:
        return Lakehouse.from_settings(self.settings())


def lakehouse_resource(settings: Settings | None = None) -> LakehouseResource:
    """The resource for ``settings`` (the environment's by default; a bad value fails here, at load)."""
    s = settings or Settings.from_env()
    return LakehouseResource(
        home=_setting("home", str(s.home)),
        catalog_uri=_setting("catalog_uri", s.catalog_uri),
        warehouse=_setting("warehouse", s.warehouse),
        landing=_setting("landing", str(s.landing)),
        code_version=_setting("code_version", s.code_version),
    )


def resource_definitions(settings: Settings | None = None) -> dg.Definitions:
    return dg.Definitions(resources={"lakehouse": lakehouse_resource(settings)})
