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
from dagster._core.run_coordinator import QueuedRunCoordinator

ROOT = Path(__file__).resolve().parents[2]


def test_definitions_load_without_warnings_and_hold_the_raw_assets(keel_home):
    sys.modules.pop("pipelines.definitions", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from pipelines.definitions import defs

        dg.Definitions.validate_loadable(defs)
        graph = defs.resolve_asset_graph()

    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert not [k for k in keys if k.endswith("_staged")]  # one asset per table
    for source in ("signups", "clicks", "transactions", "churn_labels"):
        assert {f"landing/{source}", f"raw/{source}"} <= keys
        assert graph.get(dg.AssetKey(["raw", source])).partitions_def is not None
        checks = graph.get_check_keys_for_assets({dg.AssetKey(["raw", source])})
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


def test_every_step_writing_a_table_claims_that_tables_pool(keel_home):
    """With pools counted per run (dagster.yaml), this is what keeps two runs off one table."""
    sys.modules.pop("pipelines.definitions", None)
    from pipelines.definitions import defs

    job = defs.resolve_implicit_global_asset_job_def()
    steps = {op.name: op.pool for op in job.all_node_defs if getattr(op, "pool", None)}
    assert steps["raw__clicks_stage"] == steps["raw__clicks_audit"] == steps["raw__clicks_publish"] == "raw.clicks"
    assert steps["features__user_profile_publish"] == "features.user_profile"
    assert steps["predictions__churn_stage"] == "predictions.churn"
    assert steps["monitoring__inference_log_publish"] == "monitoring.inference_log"


def test_the_pools_exist_on_the_instance_before_the_first_run_queues(keel_home):
    """Dagster's queue does not limit a pool in the pass that first meets it: pools are declared up front."""
    from pipelines.definitions import defs
    from pipelines.pools import ensure_pools, table_pools

    home = keel_home / "dagster"
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    pools = table_pools(defs)
    assert {"raw.clicks", "features.user_profile", "monitoring.drift", "monitoring.quality"} <= pools
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert ensure_pools(instance, pools) == sorted(pools)
        assert ensure_pools(instance, pools) == []
        info = instance.event_log_storage.get_concurrency_info("raw.clicks")
        assert info.slot_count == 1


def test_embedded_profile_is_sqlite_under_dagster_home_with_runs_queued_one_per_table(keel_home):
    home = keel_home / "dagster"
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "SqliteRunStorage"
        assert (home / "history" / "runs.db").exists()
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        pools = instance.get_concurrency_config().pool_config
        assert (pools.pool_granularity.value, pools.default_pool_limit) == ("run", 1)
        assert instance.event_log_storage.supports_global_concurrency_limits


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
    assert set(storage) == {"hostname", "port", "username", "password", "db_name", "scheme"}
    # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, which is not installed.
    assert storage["scheme"] == "postgresql+psycopg2"

    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert config["concurrency"] == {
        "runs": {"max_concurrent_runs": 8},
        "pools": {"granularity": "run", "default_limit": 1},
    }


def test_production_profile_storage_builds_a_postgres_url_from_the_environment(postgres_env):
    from dagster_postgres.utils import get_conn_string, pg_url_from_config

    config, _ = dagster_instance_config(str(ROOT / "deploy" / "dagster"))
    storage = config["storage"]["postgres"]["postgres_db"]
    resolved = {key: os.environ[value["env"]] if isinstance(value, dict) else value for key, value in storage.items()}
    url = pg_url_from_config({"postgres_db": resolved})
    assert url == get_conn_string("dagster", "secret", "db.internal", "dagster", "5432", scheme="postgresql+psycopg2")


def test_production_profile_rejects_a_broken_config(tmp_path):
    # The loader validates the storage section against dagster-postgres's schema ...
    text = (ROOT / "deploy" / "dagster" / "dagster.yaml").read_text()
    (tmp_path / "dagster.yaml").write_text(text.replace("      hostname:", "      host:"))
    with pytest.raises(dg.DagsterInvalidConfigError, match='unexpected config entry "host"'):
        dagster_instance_config(str(tmp_path))
    # ... and the queue's limits against theirs.
    (tmp_path / "dagster.yaml").write_text(text.replace("max_concurrent_runs: 8", "max_concurrent_runs: lots"))
    with pytest.raises(dg.DagsterInvalidConfigError, match="max_concurrent_runs"):
        dagster_instance_config(str(tmp_path))
