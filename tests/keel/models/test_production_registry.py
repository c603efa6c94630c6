"""The model registry on the production profile's backends: an ``mlflow server`` process with
its tracking store in PostgreSQL and its artifacts on S3-compatible storage, as a team runs it."""

import logging
import uuid

import numpy as np
import pytest

from keel.config import Settings
from keel.devservers import DevServerError
from keel.devservers.storage import MlflowServer
from keel.models import registration, registry
from keel.models.registry_client import mlflow_client
from keel.models.training import predict
from tests.factories.registry import N_HOLDOUT, N_TRAIN, demo_table, fit, spec, xgb


@pytest.fixture
def production_mlflow(keel_home, postgres_server, s3_server):
    """``mlflow server`` on a fresh PostgreSQL database and a fresh bucket, and both names."""
    suffix = uuid.uuid4().hex[:12]
    database = f"mlflow_{suffix}"
    store = postgres_server.create_database(database)
    bucket = s3_server.create_bucket(f"keel-mlflow-{suffix}")
    server = MlflowServer(store, f"{bucket}/artifacts", s3_server.environment())
    try:
        # Importing MLflow and creating its tables in PostgreSQL takes tens of seconds here.
        server.start(timeout=180)
    except DevServerError as exc:
        pytest.fail(str(exc))
    yield server, database, bucket.removeprefix("s3://")
    server.stop()


def test_a_model_registers_and_loads_through_mlflow_on_postgresql_and_object_storage(
    production_mlflow, postgres_server, s3_server, monkeypatch
):
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    server, database, bucket = production_mlflow
    monkeypatch.setenv("KEEL_MLFLOW_URI", server.url)
    settings = Settings.from_env()
    model_spec = spec("xgboost")
    result = fit(model_spec, xgb(), ["x1", "x2", "segment"], demo_table(0, N_TRAIN + N_HOLDOUT))

    info = registration.log_and_register(settings, model_spec, result)

    assert [v.version for v in registry.list_versions(settings, "churn")] == [info.version]
    # The model came back from the bucket through the server and predicts as it did when trained.
    version = mlflow_client(settings).get_model_version("churn", str(info.version))
    model, features = registry.load_native(settings, version)
    assert features == result.features
    np.testing.assert_allclose(
        predict(model, model_spec, result.holdout, features), result.predictions, rtol=0, atol=1e-12
    )

    # The run and the registered model are rows in PostgreSQL; the artifacts objects in the bucket.
    connection = postgres_server.connect(database)
    with connection.cursor() as cursor:
        cursor.execute("SELECT name FROM registered_models")
        assert cursor.fetchall() == [("churn",)]
        cursor.execute("SELECT count(*) FROM runs")
        assert cursor.fetchone()[0] >= 1
    connection.close()
    keys = s3_server.keys(bucket, prefix="artifacts/")
    assert any(key.endswith("MLmodel") for key in keys), keys
    assert not (settings.home / "mlflow.db").exists()
