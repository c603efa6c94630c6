"""The lakehouse resource reads KEEL_* variables when a run starts, not when the code loads."""

import dagster as dg

from resources import lakehouse_resource


def test_settings_follow_the_environment_of_the_run(keel_home, tmp_path, monkeypatch):
    monkeypatch.setenv("KEEL_WAREHOUSE", "file:///somewhere/else")
    resource = lakehouse_resource()  # built at load, with KEEL_HOME = keel_home

    other = tmp_path / "other-home"
    monkeypatch.setenv("KEEL_HOME", str(other))
    monkeypatch.setenv("KEEL_WAREHOUSE", "s3://lake/keel")
    with dg.build_resources({"lakehouse": resource}) as built:
        settings = built.lakehouse.settings()

    assert settings.home == other
    assert settings.catalog_uri == f"sqlite:///{other / 'catalog.db'}"
    assert settings.landing == other / "landing"
    assert settings.warehouse == "s3://lake/keel"
    assert settings.code_version == "test-sha"


def test_a_bad_value_at_run_time_names_the_variable(keel_home, monkeypatch):
    import pytest

    from keel.config import ConfigError

    monkeypatch.setenv("KEEL_CATALOG_URI", "sqlite:///x.db")
    resource = lakehouse_resource()
    monkeypatch.setenv("KEEL_CATALOG_URI", "mongodb://catalog")
    with dg.build_resources({"lakehouse": resource}) as built, pytest.raises(ConfigError, match="KEEL_CATALOG_URI"):
        built.lakehouse.settings()


def test_the_mlflow_resource_carries_the_ui_address_for_report_links(keel_home, monkeypatch):
    from resources import mlflow_resource

    monkeypatch.setenv("KEEL_MLFLOW_UI_URL", "http://mlflow.internal:5000")
    resource = mlflow_resource()
    with dg.build_resources({"mlflow": resource}) as built:
        assert built.mlflow.settings().mlflow_ui_url == "http://mlflow.internal:5000"
    monkeypatch.delenv("KEEL_MLFLOW_UI_URL")
    with dg.build_resources({"mlflow": mlflow_resource()}) as built:
        assert built.mlflow.settings().mlflow_ui_url == "http://127.0.0.1:5000"


def test_a_secret_in_a_file_is_read_at_run_time_and_never_becomes_resource_config(keel_home, tmp_path, monkeypatch):
    from resources import mlflow_resource, online_resource

    secrets = {
        "KEEL_CATALOG_URI": "postgresql+psycopg2://keel:pg-secret@db:5432/keel_catalog",
        "KEEL_REDIS_URL": "redis://:redis-secret@cache:6379/0",
        "KEEL_MLFLOW_URI": "postgresql://mlflow:mlflow-secret@db:5432/mlflow",
    }
    for name, value in secrets.items():
        (tmp_path / name).write_text(value)
        monkeypatch.setenv(f"{name}_FILE", str(tmp_path / name))
    resources = {"lakehouse": lakehouse_resource(), "online": online_resource(), "mlflow": mlflow_resource()}
    # What Dagster keeps and shows of each resource: its configuration.
    shown = repr(list(resources.values()))
    assert not any(secret in shown for secret in ("pg-secret", "redis-secret", "mlflow-secret")), shown

    with dg.build_resources(resources) as built:
        assert built.lakehouse.settings().catalog_uri == secrets["KEEL_CATALOG_URI"]
        assert built.mlflow.settings().mlflow_uri == secrets["KEEL_MLFLOW_URI"]
