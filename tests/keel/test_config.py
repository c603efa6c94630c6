"""Configuration: embedded defaults under KEEL_HOME, production URIs, and errors that name the variable."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from keel.config import VARIABLES, ConfigError, ServingSettings, Settings, git_sha, hide_password


def test_defaults_live_under_keel_home(keel_home):
    settings = Settings.from_env()

    assert settings.home == keel_home.resolve()
    assert settings.catalog_uri == f"sqlite:///{keel_home.resolve() / 'catalog.db'}"
    assert settings.warehouse == (keel_home.resolve() / "warehouse").as_uri()
    assert settings.warehouse.startswith("file:///")
    assert settings.mlflow_uri == f"sqlite:///{keel_home.resolve() / 'mlflow.db'}"
    assert settings.landing == keel_home.resolve() / "landing"
    assert settings.dagster_home == keel_home.resolve() / "dagster"
    assert settings.redis_url is None
    assert settings.kafka_bootstrap is None
    assert settings.project == "pipelines"
    assert settings.code_version == "test-sha"
    assert settings.alert_webhook is None
    assert settings.alert_file == keel_home.resolve() / "alerts.jsonl"
    assert settings.dagster_url == "http://127.0.0.1:3000"


def test_keel_home_defaults_to_dot_keel_in_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    settings = Settings.from_env({})

    assert settings.home == tmp_path.resolve() / ".keel"
    assert settings.catalog_uri == f"sqlite:///{tmp_path.resolve() / '.keel' / 'catalog.db'}"
    assert not settings.home.exists(), "reading the settings must not create folders"


def test_keel_home_is_expanded_and_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))

    assert Settings.from_env({"KEEL_HOME": "state/here"}).home == tmp_path.resolve() / "state" / "here"
    assert Settings.from_env({"KEEL_HOME": "~/keel"}).home == (tmp_path / "user" / "keel").resolve()


def test_explicit_mapping_ignores_the_process_environment(keel_home, tmp_path):
    other = tmp_path / "other"

    settings = Settings.from_env({"KEEL_HOME": str(other), "KEEL_CODE_VERSION": "abc123"})

    assert settings.home == other.resolve()
    assert settings.code_version == "abc123"
    assert settings.catalog_uri == f"sqlite:///{other.resolve() / 'catalog.db'}"


def test_blank_values_count_as_unset(tmp_path):
    settings = Settings.from_env(
        {
            "KEEL_HOME": str(tmp_path),
            "KEEL_REDIS_URL": "   ",
            "KEEL_KAFKA_BOOTSTRAP": "",
            "KEEL_PROJECT": " ",
            "KEEL_CODE_VERSION": "v1",
        }
    )

    assert settings.redis_url is None
    assert settings.kafka_bootstrap is None
    assert settings.project == "pipelines"


def test_values_are_stripped(tmp_path):
    settings = Settings.from_env(
        {"KEEL_HOME": str(tmp_path), "KEEL_PROJECT": "  myproject.defs ", "KEEL_REDIS_URL": " redis://cache:6379/0\n"}
    )

    assert settings.project == "myproject.defs"
    assert settings.redis_url == "redis://cache:6379/0"


def test_production_backends_are_accepted(tmp_path):
    env = {
        "KEEL_HOME": str(tmp_path),
        "KEEL_CATALOG_URI": "postgresql+psycopg2://keel:secret@db.internal:5432/catalog",
        "KEEL_WAREHOUSE": "s3://lake-bucket/keel",
        "KEEL_REDIS_URL": "rediss://cache.internal:6380/2",
        "KEEL_KAFKA_BOOTSTRAP": "broker-1:9092, broker-2:9092,10.0.0.3:9093",
        "KEEL_MLFLOW_URI": "http://mlflow.internal:5000",
        "KEEL_PROJECT": "acme_features",
        "KEEL_LANDING": str(tmp_path / "drop"),
        "KEEL_CODE_VERSION": "0123abcd",
    }

    settings = Settings.from_env(env)

    assert settings.catalog_uri == env["KEEL_CATALOG_URI"]
    assert settings.warehouse == "s3://lake-bucket/keel"
    assert settings.redis_url == "rediss://cache.internal:6380/2"
    assert settings.kafka_bootstrap == "broker-1:9092, broker-2:9092,10.0.0.3:9093"
    assert settings.mlflow_uri == "http://mlflow.internal:5000"
    assert settings.project == "acme_features"
    assert settings.landing == (tmp_path / "drop").resolve()
    assert settings.code_version == "0123abcd"


@pytest.mark.parametrize(
    "uri",
    [
        "postgresql://keel@localhost/catalog",
        "postgresql+psycopg://u:p@10.1.2.3:6543/c",
        "https://rest-catalog.internal/api/catalog",
        "http://localhost:8181",
        "sqlite:////abs/path/catalog.db",
    ],
)
def test_other_catalog_uris_are_accepted(tmp_path, uri):
    assert Settings.from_env({"KEEL_HOME": str(tmp_path), "KEEL_CATALOG_URI": uri}).catalog_uri == uri


@pytest.mark.parametrize("warehouse", ["s3a://bucket/p", "gs://bucket/p", "abfss://c@acct.dfs.core.windows.net/p"])
def test_other_object_stores_are_accepted(tmp_path, warehouse):
    assert Settings.from_env({"KEEL_HOME": str(tmp_path), "KEEL_WAREHOUSE": warehouse}).warehouse == warehouse


@pytest.mark.parametrize(
    ("variable", "value", "fix"),
    [
        ("KEEL_CATALOG_URI", "sqlite://", "give an absolute file path"),
        ("KEEL_CATALOG_URI", "sqlite:///", "give an absolute file path"),
        ("KEEL_CATALOG_URI", "postgresql+psycopg2:///catalog", "give a host"),
        ("KEEL_CATALOG_URI", "postgresql://", "give a host"),
        ("KEEL_CATALOG_URI", "mysql://db:3306/catalog", "use sqlite:///..., postgresql+psycopg2://"),
        ("KEEL_CATALOG_URI", "/var/lib/keel/catalog.db", "use sqlite:///..., postgresql+psycopg2://"),
        ("KEEL_WAREHOUSE", "ftp://files/warehouse", "use file:///absolute/path or s3://bucket/prefix"),
        ("KEEL_WAREHOUSE", "/data/warehouse", "use file:///absolute/path or s3://bucket/prefix"),
        ("KEEL_REDIS_URL", "http://cache:6379", "use redis://host:6379/0"),
        ("KEEL_REDIS_URL", "cache:6379", "use redis://host:6379/0"),
        ("KEEL_KAFKA_BOOTSTRAP", "broker", "use host:port"),
        ("KEEL_KAFKA_BOOTSTRAP", "broker:9092,broker-2", "use host:port"),
        ("KEEL_KAFKA_BOOTSTRAP", "kafka://broker:9092", "use host:port"),
        ("KEEL_MLFLOW_URI", "ftp://mlflow", "use sqlite:///path.db"),
        ("KEEL_MLFLOW_URI", "mlruns", "use sqlite:///path.db"),
        ("KEEL_PROJECT", "my-project", "importable module name"),
        ("KEEL_PROJECT", "1pipelines", "importable module name"),
        ("KEEL_PROJECT", "pipelines/defs", "importable module name"),
        ("KEEL_DAGSTER_URL", "dagster.internal:3000", "use the UI's http(s) address"),
        ("KEEL_DAGSTER_URL", "grpc://dagster:4000", "use the UI's http(s) address"),
        ("KEEL_DAGSTER_URL", "http://", "use the UI's http(s) address"),
        ("KEEL_MLFLOW_UI_URL", "mlflow.internal:5000", "use the UI's http(s) address"),
        ("KEEL_MLFLOW_UI_URL", "file:///var/lib/mlflow", "use the UI's http(s) address"),
        ("KEEL_MLFLOW_UI_URL", "https://", "use the UI's http(s) address"),
        ("KEEL_S3_ENDPOINT", "objects:9000", "use the object store's http(s) address"),
    ],
)
def test_bad_value_names_the_variable_the_value_and_the_fix(tmp_path, variable, value, fix):
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"KEEL_HOME": str(tmp_path), variable: value})

    message = str(caught.value)
    assert message.startswith(f"{variable}={value!r} is not usable: ")
    assert fix in message
    help_text = next(v.help for v in VARIABLES.values() if v.name == variable)
    assert message.endswith(f"({help_text})")


@pytest.mark.parametrize(
    ("url", "accepted"),
    [
        ("redis+cluster://cache-0:7000,cache-1:7000,cache-2:7000/0", True),
        ("rediss+cluster://:secret@cache-0:7000", True),
        ("redis+cluster://[::1]:7000,10.0.0.2:7000/", True),
        ("redis+cluster://:secret@cache-0:7000/1", False),
        ("redis+cluster://cache-0,cache-1:7000/0", False),
        ("redis+cluster://cache-0:7000/0?ssl=true", False),
    ],
)
def test_a_redis_cluster_url_is_taken_with_database_0_only(tmp_path, url, accepted):
    env = {"KEEL_HOME": str(tmp_path), "KEEL_REDIS_URL": url}
    if accepted:
        assert Settings.from_env(env).redis_url == url
        return
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    message = str(caught.value)
    assert message.startswith(f"KEEL_REDIS_URL={hide_password(url)!r} is not usable: ")
    assert "redis+cluster://host:6379[,host:6379...]/0" in message and "database 0 only" in message
    assert "secret" not in message


def test_the_s3_endpoint_falls_back_to_the_aws_variables(tmp_path):
    base = {"KEEL_HOME": str(tmp_path), "KEEL_WAREHOUSE": "s3://bucket/prefix"}
    assert Settings.from_env(base).s3_endpoint is None
    assert Settings.from_env(base | {"AWS_ENDPOINT_URL": "http://a:1/"}).s3_endpoint == "http://a:1"
    both = base | {"AWS_ENDPOINT_URL": "http://a:1", "AWS_ENDPOINT_URL_S3": "http://s3:2"}
    assert Settings.from_env(both).s3_endpoint == "http://s3:2"
    assert Settings.from_env(both | {"KEEL_S3_ENDPOINT": "http://keel:3"}).s3_endpoint == "http://keel:3"


def test_bad_value_in_the_process_environment_fails_too(keel_home, monkeypatch):
    monkeypatch.setenv("KEEL_REDIS_URL", "memcached://cache:11211")

    with pytest.raises(ConfigError, match=r"KEEL_REDIS_URL='memcached://cache:11211'"):
        Settings.from_env()


def test_keel_home_pointing_at_a_file_fails(tmp_path):
    not_a_folder = tmp_path / "keel.txt"
    not_a_folder.write_text("oops")

    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"KEEL_HOME": str(not_a_folder)})

    message = str(caught.value)
    assert message.startswith(f"KEEL_HOME={str(not_a_folder.resolve())!r} is not usable")
    assert "point it at a folder" in message


def test_config_error_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="KEEL_PROJECT"):
        Settings.from_env({"KEEL_HOME": str(tmp_path), "KEEL_PROJECT": "no spaces allowed"})


def test_as_env_round_trips(tmp_path):
    original = Settings.from_env(
        {
            "KEEL_HOME": str(tmp_path / "home"),
            "KEEL_CATALOG_URI": "postgresql+psycopg2://keel:pw@db:5432/catalog",
            "KEEL_WAREHOUSE": "s3://bucket/prefix",
            "KEEL_S3_ENDPOINT": "http://objects:9000",
            "KEEL_REDIS_URL": "redis://cache:6379/1",
            "KEEL_KAFKA_BOOTSTRAP": "k1:9092,k2:9092",
            "KEEL_MLFLOW_URI": "http://mlflow:5000",
            "KEEL_PROJECT": "acme.features",
            "KEEL_LANDING": str(tmp_path / "landing"),
            "KEEL_CODE_VERSION": "deadbeef",
            "KEEL_ALERT_WEBHOOK": "https://hooks.slack.com/services/T0/B0/token",
            "KEEL_ALERT_FILE": str(tmp_path / "logs" / "alerts.jsonl"),
            "KEEL_DAGSTER_URL": "https://dagster.internal",
            "KEEL_MLFLOW_UI_URL": "https://mlflow.example.com/ui",
            "KEEL_SENSOR_INTERVAL_S": "15",
            "KEEL_COMPUTE": "tcp://scheduler:8786",
            "KEEL_MAX_MEMORY": "4GB",
            "KEEL_SHARDS": "8",
        }
    )

    env = original.as_env()

    assert set(env) == {v.name for v in VARIABLES.values()}
    assert env["KEEL_HOME"] == str((tmp_path / "home").resolve())
    assert env["KEEL_LANDING"] == str((tmp_path / "landing").resolve())
    assert Settings.from_env(env) == original


def test_as_env_leaves_out_unset_backends_and_round_trips(keel_home):
    original = Settings.from_env()

    env = original.as_env()

    assert "KEEL_REDIS_URL" not in env and "KEEL_KAFKA_BOOTSTRAP" not in env and "KEEL_ALERT_WEBHOOK" not in env
    assert env["KEEL_CATALOG_URI"] == original.catalog_uri
    assert env["KEEL_CODE_VERSION"] == "test-sha"
    assert Settings.from_env(env) == original


def test_every_settings_field_has_a_documented_variable():
    assert set(VARIABLES) == {f for f in Settings.__dataclass_fields__}
    assert all(v.name.startswith("KEEL_") and v.help for v in VARIABLES.values())


def test_code_version_defaults_to_the_git_sha(tmp_path):
    expected = subprocess.run(
        ["git", "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent,
    ).stdout.strip()

    settings = Settings.from_env({"KEEL_HOME": str(tmp_path)})

    assert settings.code_version == git_sha() == (expected or "unknown")
    if expected:
        assert len(settings.code_version) == 40


def test_serving_settings_read_their_variables_and_name_a_bad_one():
    from keel.config import ServingSettings

    assert ServingSettings.from_env({}) == ServingSettings()
    got = ServingSettings.from_env(
        {
            "KEEL_SERVE_MODELS": "churn, ltv",
            "KEEL_SERVE_CANARY": "0.1",
            "KEEL_SERVE_SHADOW": "yes",
            "KEEL_SERVE_API_KEYS": "a,b",
            "KEEL_SERVE_MAX_ENTITIES": "50",
            "KEEL_SERVE_POLL_S": "2.5",
        }
    )
    assert (got.models, got.canary, got.shadow, got.api_keys, got.max_entities, got.poll_s) == (
        ("churn", "ltv"),
        0.1,
        True,
        ("a", "b"),
        50,
        2.5,
    )
    for env, message in [
        ({"KEEL_SERVE_CANARY": "1.5"}, "KEEL_SERVE_CANARY='1.5' is not usable: give a number from 0 to 1"),
        ({"KEEL_SERVE_SHADOW": "maybe"}, "KEEL_SERVE_SHADOW='maybe' is not usable: use true or false"),
        ({"KEEL_SERVE_MAX_ENTITIES": "0"}, "KEEL_SERVE_MAX_ENTITIES='0' is not usable: give a positive int"),
        (
            {"KEEL_SERVE_ONLINE_TIMEOUT_MS": "soon"},
            "KEEL_SERVE_ONLINE_TIMEOUT_MS='soon' is not usable: give a positive float",
        ),
    ]:
        with pytest.raises(ConfigError) as err:
            ServingSettings.from_env(env)
        assert message in str(err.value)


# Alerts ---------------------------------------------------------------------------------------


def test_alert_settings_are_read_and_the_dagster_url_loses_its_trailing_slash(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = Settings.from_env(
        {
            "KEEL_HOME": str(tmp_path / "home"),
            "KEEL_ALERT_WEBHOOK": " https://hooks.slack.com/services/T0/B0/token ",
            "KEEL_ALERT_FILE": "logs/alerts.jsonl",
            "KEEL_DAGSTER_URL": "https://dagster.internal:3000/",
        }
    )

    assert settings.alert_webhook == "https://hooks.slack.com/services/T0/B0/token"
    assert settings.alert_file == tmp_path.resolve() / "logs" / "alerts.jsonl"
    assert not settings.alert_file.parent.exists(), "reading the settings must not create folders"
    assert settings.dagster_url == "https://dagster.internal:3000"


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("hooks.slack.com/services/T0/B0/s3cr3t", "<37 characters, hidden>"),
        ("ftp://hooks.example/services/T0/B0/s3cr3t", "ftp://hooks.example/***"),
        ("https:///services/T0/B0/s3cr3t", "<30 characters, hidden>"),
    ],
)
def test_a_bad_alert_webhook_is_named_without_printing_its_secret(tmp_path, value, shown):
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"KEEL_HOME": str(tmp_path), "KEEL_ALERT_WEBHOOK": value})

    message = str(caught.value)
    assert message.startswith(f"KEEL_ALERT_WEBHOOK={shown!r} is not usable: use an http(s) URL")
    assert "s3cr3t" not in message
    assert message.endswith(f"({VARIABLES['alert_webhook'].help})")


def test_an_alert_file_that_is_a_folder_fails(tmp_path):
    folder = tmp_path / "alerts"
    folder.mkdir()

    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"KEEL_HOME": str(tmp_path), "KEEL_ALERT_FILE": str(folder)})

    assert str(caught.value).startswith(f"KEEL_ALERT_FILE={str(folder.resolve())!r} is not usable: give a file path")


# The MLflow UI -------------------------------------------------------------------------------


def test_the_mlflow_ui_of_the_embedded_store_is_where_make_mlflow_ui_serves_it(tmp_path):
    settings = Settings.from_env({"KEEL_HOME": str(tmp_path)})

    assert settings.mlflow_uri.startswith("sqlite:///")
    assert settings.mlflow_ui_url == "http://127.0.0.1:5000"
    assert "--port 5000" in (Path(__file__).resolve().parents[2] / "Makefile").read_text()


@pytest.mark.parametrize(
    ("tracking", "ui"),
    [
        ("http://mlflow.internal:5000", "http://mlflow.internal:5000"),
        ("https://mlflow.example.com/mlflow/", "https://mlflow.example.com/mlflow"),
        # Credentials in the tracking URI stay out of the links put on materializations.
        ("https://keel:s3cr3t@mlflow.example.com", "https://mlflow.example.com"),
        ("postgresql://keel@db.internal/mlflow", "http://127.0.0.1:5000"),
    ],
)
def test_a_tracking_server_is_its_own_mlflow_ui(tmp_path, tracking, ui):
    settings = Settings.from_env({"KEEL_HOME": str(tmp_path), "KEEL_MLFLOW_URI": tracking})

    assert settings.mlflow_ui_url == ui


def test_an_explicit_mlflow_ui_url_wins_and_loses_its_trailing_slash(tmp_path):
    settings = Settings.from_env(
        {
            "KEEL_HOME": str(tmp_path),
            "KEEL_MLFLOW_URI": "http://mlflow.svc.cluster.local:5000",
            "KEEL_MLFLOW_UI_URL": " https://mlflow.example.com/ ",
        }
    )

    assert settings.mlflow_uri == "http://mlflow.svc.cluster.local:5000"
    assert settings.mlflow_ui_url == "https://mlflow.example.com"


def test_keel_config_shows_the_mlflow_ui_url(keel_home, monkeypatch, capsys):
    from keel.cli.main import main

    monkeypatch.setenv("KEEL_MLFLOW_UI_URL", "https://mlflow.example.com/")

    assert main(["config"]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert "KEEL_MLFLOW_UI_URL=https://mlflow.example.com" in lines


def test_a_variable_can_come_from_a_file_named_by_its_file_twin(tmp_path):
    secret = tmp_path / "catalog-uri"
    secret.write_text("postgresql+psycopg2://keel:s3cret@db:5432/catalog\n")
    keys = tmp_path / "api-keys"
    keys.write_text("key-one,key-two")
    env = {"KEEL_HOME": str(tmp_path), "KEEL_CATALOG_URI_FILE": str(secret), "KEEL_SERVE_API_KEYS_FILE": str(keys)}

    assert Settings.from_env(env).catalog_uri == "postgresql+psycopg2://keel:s3cret@db:5432/catalog"
    assert ServingSettings.from_env(env).api_keys == ("key-one", "key-two")


@pytest.mark.parametrize(
    ("content", "also_set", "message"),
    [
        (None, False, "KEEL_REDIS_URL_FILE='{path}' cannot be read (No such file or directory)"),
        ("  \n", False, "KEEL_REDIS_URL_FILE='{path}' is empty: write the value of KEEL_REDIS_URL into it"),
        ("redis://:pw@r:6379/0", True, "KEEL_REDIS_URL and KEEL_REDIS_URL_FILE are both set: keep one"),
    ],
)
def test_a_secret_file_that_cannot_be_used_is_named_without_its_content(tmp_path, content, also_set, message):
    path = tmp_path / "redis-url"
    if content is not None:
        path.write_text(content)
    env = {"KEEL_HOME": str(tmp_path), "KEEL_REDIS_URL_FILE": str(path)}
    if also_set:
        env["KEEL_REDIS_URL"] = "redis://:other@r:6379/0"

    with pytest.raises(ConfigError) as raised:
        Settings.from_env(env)
    assert message.format(path=path) in str(raised.value)
    assert "pw@" not in str(raised.value) and "other@" not in str(raised.value)


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("postgresql+psycopg2://keel:s3cret@db:5432/catalog", "postgresql+psycopg2://keel:***@db:5432/catalog"),
        ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
        (
            "rediss://default:s3cret@cache:6380/1?ssl_cert_reqs=none",
            "rediss://default:***@cache:6380/1?ssl_cert_reqs=none",
        ),
        ("postgresql://db/catalog?user=keel&password=s3cret", "postgresql://db/catalog?user=keel&password=***"),
        ("postgresql+psycopg2://keel@db:5432/catalog", "postgresql+psycopg2://keel@db:5432/catalog"),
        ("sqlite:////home/keel/catalog.db", "sqlite:////home/keel/catalog.db"),
        ("/home/keel/.keel", "/home/keel/.keel"),
    ],
)
def test_hide_password_hides_only_the_password(uri, shown):
    assert hide_password(uri) == shown


def test_a_bad_uri_is_named_with_its_password_hidden(tmp_path):
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"KEEL_HOME": str(tmp_path), "KEEL_REDIS_URL": "http://:s3cret@cache:6379"})
    assert "KEEL_REDIS_URL='http://:***@cache:6379' is not usable" in str(raised.value)
    assert "s3cret" not in str(raised.value)


def test_keel_config_shows_no_secret_of_a_production_setup(keel_home, monkeypatch, capsys, tmp_path):
    from keel.cli.main import main

    webhook = tmp_path / "webhook"
    webhook.write_text("https://hooks.slack.com/services/T0/B0/hook-secret")
    production = {
        "KEEL_CATALOG_URI": "postgresql+psycopg2://keel:pg-secret@db:5432/keel_catalog",
        "KEEL_MLFLOW_URI": "postgresql://mlflow:mlflow-secret@db:5432/mlflow",
        "KEEL_REDIS_URL": "redis://:redis-secret@cache:6379/0",
        "KEEL_ALERT_WEBHOOK_FILE": str(webhook),
        "KEEL_SERVE_API_KEYS": "api-secret-1,api-secret-2",
    }
    for name, value in production.items():
        monkeypatch.setenv(name, value)

    assert main(["config"]) == 0
    out = capsys.readouterr().out
    for secret in ("pg-secret", "mlflow-secret", "redis-secret", "hook-secret", "api-secret"):
        assert secret not in out, secret
    assert "KEEL_CATALOG_URI=postgresql+psycopg2://keel:***@db:5432/keel_catalog" in out
    assert "KEEL_REDIS_URL=redis://:***@cache:6379/0" in out
    assert "KEEL_ALERT_WEBHOOK=https://hooks.slack.com/***" in out
    assert "KEEL_SERVE_API_KEYS=<2 key(s)>" in out


@pytest.mark.parametrize("variable", ["KEEL_MLFLOW_UI_URL", "KEEL_DAGSTER_URL"])
def test_a_ui_address_with_credentials_is_refused_as_links_would_show_them(tmp_path, variable):
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"KEEL_HOME": str(tmp_path), variable: "https://admin:s3cret@ui.internal"})
    assert f"{variable}='https://admin:***@ui.internal' is not usable: give the address without" in str(raised.value)


def test_the_sensor_interval_is_whole_seconds_and_unset_by_default(tmp_path):
    assert Settings.from_env({"KEEL_HOME": str(tmp_path)}).sensor_interval_s is None
    assert Settings.from_env({"KEEL_HOME": str(tmp_path), "KEEL_SENSOR_INTERVAL_S": "10"}).sensor_interval_s == 10
    for bad in ("0", "1.5", "-3", "ten", "86401"):
        with pytest.raises(ConfigError, match=f"KEEL_SENSOR_INTERVAL_S='{bad}' is not usable: give whole seconds"):
            Settings.from_env({"KEEL_HOME": str(tmp_path), "KEEL_SENSOR_INTERVAL_S": bad})


def test_compute_memory_and_shards_are_checked(tmp_path):
    env = {"KEEL_HOME": str(tmp_path)}
    settings = Settings.from_env(
        {**env, "KEEL_COMPUTE": "tcp://10.0.0.5:8786", "KEEL_MAX_MEMORY": "1.5G", "KEEL_SHARDS": "16"}
    )
    assert (settings.compute, settings.max_memory, settings.shards) == ("tcp://10.0.0.5:8786", 3 << 29, 16)
    assert Settings.from_env({**env, "KEEL_MAX_MEMORY": "512MB"}).max_memory == 512 << 20
    assert Settings.from_env({**env, "KEEL_MAX_MEMORY": str(1 << 30)}).max_memory == 1 << 30
    for name, bad, fix in [
        ("KEEL_COMPUTE", "scheduler:8786", "give the Dask scheduler's address"),
        ("KEEL_COMPUTE", "http://scheduler:8786", "give the Dask scheduler's address"),
        ("KEEL_MAX_MEMORY", "lots", "give at least 64MB"),
        ("KEEL_MAX_MEMORY", "10MB", "give at least 64MB"),
        ("KEEL_SHARDS", "3", "give a power of two from 1 to 4096"),
        ("KEEL_SHARDS", "0", "give a power of two from 1 to 4096"),
        ("KEEL_SHARDS", "8192", "give a power of two from 1 to 4096"),
    ]:
        with pytest.raises(ConfigError, match=f"{name}='{bad}' is not usable: {fix}"):
            Settings.from_env({**env, name: bad})
