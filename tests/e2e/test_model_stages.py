"""A stage transition made in MLflow reaches a running `keel serve`, before anything settles it.

A real `mlflow server` is KEEL_MLFLOW_URI; two versions are registered through it (v1 the
champion, v2 the challenger) and `keel serve` runs as a subprocess polling the registry every
0.3 s. Transitioning v2 to Production with MLflow's REST API, as its UI does, makes `keel serve`
answer with v2 within a poll; settling afterwards (`keel models sync`) moves the aliases to agree.
"""

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest

from keel.cli.main import main
from keel.config import Settings
from keel.devservers import free_port
from keel.models import promotion, registration, registry
from keel.models.registry_client import mlflow_client
from tests.factories.registry import N_HOLDOUT, N_TRAIN, demo_table, fit, spec, xgb

API_KEY = "e2e-key"


@pytest.fixture
def settings(keel_home, clean_mlflow_uri, monkeypatch) -> Settings:
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    monkeypatch.setenv("KEEL_MLFLOW_URI", clean_mlflow_uri)
    return Settings.from_env()


@pytest.fixture
def keel_serve(settings, keel_home, monkeypatch):
    """`keel serve` on a free port, serving 'churn' (v1 champion, v2 challenger), polling every 0.3 s."""
    data = demo_table(0, N_TRAIN + N_HOLDOUT)
    first, second = spec("xgboost"), spec("xgboost")
    registration.log_and_register(settings, first, fit(first, xgb(), ["x1", "segment"], data))
    promotion.promote(settings, "churn", 1)
    registration.log_and_register(settings, second, fit(second, xgb(), ["x1", "x2", "segment"], data))

    for name, value in {
        "KEEL_SERVE_MODELS": "churn",
        "KEEL_SERVE_POLL_S": "0.3",
        "KEEL_SERVE_API_KEYS": API_KEY,
    }.items():
        monkeypatch.setenv(name, value)
    port = free_port()
    log_path = keel_home / "serve.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("keel")), "serve", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    client = httpx2.Client(base_url=f"http://127.0.0.1:{port}", headers={"x-api-key": API_KEY}, timeout=5)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"keel serve exited: {log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"keel serve not ready: {log_path.read_text()[-3000:]}"
            try:
                if client.get("/health/ready").status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            time.sleep(0.1)
        yield client
    finally:
        client.close()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def served(client) -> dict:
    return client.get("/admin/models").json()["models"]["churn"]


def test_a_stage_transition_through_mlflows_rest_api_reaches_keel_serve(settings, keel_serve, capsys):
    client = keel_serve
    assert served(client) == {"champion": 1, "challenger": 2}
    assert client.post("/v1/models/churn/predict", json={"entity_id": "u1"}).json()["version"] == 1

    # What the MLflow UI's "Transition to Production" sends.
    answer = httpx2.post(
        f"{settings.mlflow_uri}/api/2.0/mlflow/model-versions/transition-stage",
        json={"name": "churn", "version": "2", "stage": "Production", "archive_existing_versions": False},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    moved_at = time.monotonic()

    deadline = moved_at + 30
    while served(client)["champion"] != 2:
        assert time.monotonic() < deadline, f"keel serve still serves {served(client)}"
        time.sleep(0.05)
    body = client.post("/v1/models/churn/predict", json={"entity_id": "u1"}).json()
    assert (body["version"], body["alias"]) == (2, "champion")
    assert served(client) == {"champion": 2}  # the challenger promoted is no longer one

    # Serving wrote nothing: the aliases still name v1 until the registry is settled.
    mlflow = mlflow_client(settings)
    aliases = mlflow.get_registered_model("churn").aliases
    assert {alias: int(version) for alias, version in aliases.items()} == {"champion": 1, "challenger": 2}
    capsys.readouterr()
    assert main(["models", "sync", "churn"]) == 0
    assert "v2 champion (mlflow-stage" in capsys.readouterr().out
    versions = {v.version: v for v in registry.list_versions(settings, "churn")}
    assert [(versions[v].aliases, versions[v].stage) for v in (1, 2)] == [
        ((), "Archived"),
        (("champion",), "Production"),
    ]
    assert versions[2].tags["promotion"] == "mlflow-stage" and versions[1].tags["retired_by"] == "2"
    assert json.loads(client.get("/health/ready").text)["models"]["churn"] == {"champion": 2}
