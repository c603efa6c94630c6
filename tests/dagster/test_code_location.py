"""The code location loads cleanly, and both dagster.yaml profiles are valid instance configs."""

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.instance.config import dagster_instance_config
from dagster._core.run_coordinator import DefaultRunCoordinator, QueuedRunCoordinator
from dagster._serdes import ConfigurableClassData

ROOT = Path(__file__).resolve().parents[2]


def test_definitions_load_without_warnings_and_hold_the_raw_assets(keel_home):
    sys.modules.pop("pipelines.definitions", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from pipelines.definitions import defs

        dg.Definitions.validate_loadable(defs)
        graph = defs.resolve_asset_graph()

    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    for source in ("signups", "clicks", "transactions", "churn_labels"):
        assert {f"landing/{source}", f"raw/{source}_staged", f"raw/{source}"} <= keys
        assert graph.get(dg.AssetKey(["raw", source])).partitions_def is not None
        checks = graph.get_check_keys_for_assets({dg.AssetKey(["raw", f"{source}_staged"])})
        assert [check.name for check in checks] == ["audit"]
    assert "ops/lakehouse_maintenance" in keys
    assert defs.resolve_schedule_def("daily_lakehouse_maintenance").cron_schedule == "0 3 * * *"


def test_dagster_definitions_validate_passes_with_no_warnings(keel_home):
    shutil.copy(ROOT / "dagster.yaml", keel_home / "dagster" / "dagster.yaml")  # as `make` does
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    out = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "All code locations passed validation" in text
    # The command itself says it is superseded by `dg check defs`; nothing else may warn.
    lines = [line for line in text.splitlines() if "warn" in line.lower() and "SupersessionWarning" not in line]
    assert lines == []


def test_a_bad_setting_stops_the_code_location_at_load_naming_the_variable(keel_home, monkeypatch):
    from keel.config import ConfigError

    monkeypatch.setenv("KEEL_WAREHOUSE", "ftp://files.example/warehouse")
    sys.modules.pop("pipelines.definitions", None)
    try:
        with pytest.raises(ConfigError, match=r"KEEL_WAREHOUSE='ftp://files.example/warehouse' is not usable"):
            import pipelines.definitions  # noqa: F401
    finally:
        sys.modules.pop("pipelines.definitions", None)


def test_embedded_profile_is_sqlite_under_dagster_home(keel_home):
    home = keel_home / "dagster"
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "SqliteRunStorage"
        assert (home / "history" / "runs.db").exists()
        assert isinstance(instance.run_coordinator, DefaultRunCoordinator)


@pytest.fixture
def postgres_env(monkeypatch):
    values = {
        "DAGSTER_PG_HOST": "db.internal",
        "DAGSTER_PG_PORT": "5432",
        "DAGSTER_PG_USER": "dagster",
        "DAGSTER_PG_PASSWORD": "secret",
        "DAGSTER_PG_DB": "dagster",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def test_production_profile_is_postgres_with_queued_runs_one_per_table(postgres_env):
    config, _ = dagster_instance_config(str(ROOT / "deploy" / "dagster"))

    storage = config["storage"]["postgres"]["postgres_db"]
    assert storage["hostname"] == {"env": "DAGSTER_PG_HOST"}
    assert set(storage) == {"hostname", "port", "username", "password", "db_name"}

    coordinator_cfg = config["run_coordinator"]
    coordinator = ConfigurableClassData(
        coordinator_cfg["module"], coordinator_cfg["class"], _yaml(coordinator_cfg["config"])
    ).rehydrate(as_type=QueuedRunCoordinator)
    queue = coordinator.get_run_queue_config()
    assert queue.max_concurrent_runs == 8
    limits = queue.tag_concurrency_limits
    assert limits == [{"key": "keel/table", "value": {"applyLimitPerUniqueValue": True}, "limit": 1}]


def test_production_profile_storage_builds_a_postgres_url_from_the_environment(postgres_env):
    from dagster_postgres.utils import get_conn_string, pg_url_from_config

    config, _ = dagster_instance_config(str(ROOT / "deploy" / "dagster"))
    resolved = {key: os.environ[value["env"]] for key, value in config["storage"]["postgres"]["postgres_db"].items()}
    url = pg_url_from_config({"postgres_db": resolved})
    assert url == get_conn_string("dagster", "secret", "db.internal", "dagster", "5432")


def test_production_profile_rejects_a_broken_config(tmp_path):
    # The loader validates the storage section against dagster-postgres's schema ...
    text = (ROOT / "deploy" / "dagster" / "dagster.yaml").read_text()
    (tmp_path / "dagster.yaml").write_text(text.replace("      hostname:", "      host:"))
    with pytest.raises(dg.DagsterInvalidConfigError, match='unexpected config entry "host"'):
        dagster_instance_config(str(tmp_path))
    # ... and the run coordinator validates its own section when it is built.
    config, _ = dagster_instance_config(str(ROOT / "deploy" / "dagster"))
    section = {**config["run_coordinator"]["config"], "max_concurrent_runs": "lots"}
    with pytest.raises(dg.DagsterInvalidConfigError, match="max_concurrent_runs"):
        ConfigurableClassData("dagster.core.run_coordinator", "QueuedRunCoordinator", _yaml(section)).rehydrate(
            as_type=QueuedRunCoordinator
        )


def _yaml(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config)
