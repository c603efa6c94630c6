"""The drift report in MLflow: ranking by how far past its threshold, logging into the version's run,
the UI link, and the report served over http by a real ``mlflow server`` on a loopback port."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import numpy as np
import pytest

from keel.config import Settings
from keel.devservers import DevServerError, free_port
from keel.devservers.storage import MlflowServer
from keel.models.registry_client import mlflow_client
from keel.monitoring import report as drift_report
from keel.monitoring.declarations import Threshold
from keel.monitoring.drift import TargetDrift
from keel.monitoring.statistics import categorical_drift, numeric_drift

MODEL = "churn"
WINDOW = dt.datetime(2026, 5, 11, tzinfo=dt.UTC)
# The MLflow UI's run page reads the preselected artifact from its route with this expression
# (server/js/build, the run page's artifact view).
UI_ARTIFACT_ROUTE = re.compile(r"/(?:artifactPath|artifacts)/(.+)")


# Most drifted ---------------------------------------------------------------------------------


def _numeric(statistic: str, value: float, threshold: float, name: str) -> TargetDrift:
    rng = np.random.default_rng(0)
    stats = dataclasses.replace(numeric_drift(rng.normal(size=200), rng.normal(size=200)), **{statistic: value})
    return TargetDrift("feature", name, "numeric", Threshold(statistic, threshold), stats)


def _categorical(value: float, threshold: float, name: str) -> TargetDrift:
    stats = dataclasses.replace(categorical_drift(np.array(["a", "b"] * 50), np.array(["a"] * 100)), js=value)
    return TargetDrift("feature", name, "categorical", Threshold("js", threshold), stats)


def test_most_drifted_ranks_by_times_past_the_threshold_across_statistics():
    features = [
        _numeric("psi", 0.6, 0.2, "amount"),  # 3x
        _categorical(0.25, 0.1, "currency"),  # 2.5x
        _numeric("ks_pvalue", 0.001, 0.05, "items"),  # a p-value: 0.05 / 0.001 = 50x
        _numeric("psi", 0.2, 0.2, "at_threshold"),  # 1x
        _numeric("ks_pvalue", 0.0, 0.05, "gone"),  # past any threshold
        _numeric("wasserstein_norm", 0.75, 0.25, "also_3x"),  # 3x as well (but for float noise): by name
        _numeric("psi", 0.0, 0.0, "zero_threshold"),  # a zero threshold reached by zero: at it
    ]

    ranked = drift_report.most_drifted(features)

    assert [t.name for t in ranked] == [
        "gone",
        "items",
        "also_3x",
        "amount",
        "currency",
        "at_threshold",
        "zero_threshold",
    ]
    times = [drift_report.times_threshold(t.threshold.statistic, t.value, t.threshold.threshold) for t in ranked]
    assert times[0] == float("inf")
    assert times[1:] == pytest.approx([50.0, 3.0, 3.0, 2.5, 1.0, 1.0])
    assert drift_report.times_threshold("psi", None, 0.2) is None


# Logging into the version's run ---------------------------------------------------------------


def register_versions(settings: Settings, model: str, n: int) -> list[tuple[str, str]]:
    """``n`` versions of ``model``, each in its own run: [(experiment id, run id)] by version.

    The experiment is made as ``keel.models.registry`` makes it: artifacts under KEEL_HOME for a
    local store, the server's default (proxied) artifact root for a tracking server.
    """
    client = mlflow_client(settings)
    local = not settings.mlflow_uri.startswith("http")
    location = (settings.home / "mlartifacts" / model).as_uri() if local else None
    experiment_id = client.create_experiment(model, artifact_location=location)
    client.create_registered_model(model)
    out = []
    for _ in range(n):
        run_id = client.create_run(experiment_id).info.run_id
        client.set_terminated(run_id)
        client.create_model_version(model, source=f"runs:/{run_id}/model", run_id=run_id)
        out.append((experiment_id, run_id))
    return out


def write_page(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<!doctype html><html><body><h1>{text}</h1></body></html>", encoding="utf-8")
    return path


def read_artifact(settings: Settings, run_id: str, artifact: str, folder: Path) -> str:
    return Path(mlflow_client(settings).download_artifacts(run_id, artifact, str(folder))).read_text(encoding="utf-8")


@pytest.fixture
def local_store(tmp_path) -> Settings:
    return Settings.from_env({"KEEL_HOME": str(tmp_path / "home"), "KEEL_CODE_VERSION": "test-sha"})


def test_the_report_goes_into_the_judged_versions_run_and_a_rerun_replaces_it(local_store, tmp_path):
    settings = local_store
    (_, first_run), (experiment_id, second_run) = register_versions(settings, MODEL, 2)
    path = write_page(drift_report.report_path(settings.home, MODEL, WINDOW), "first run")

    logged = drift_report.log_report(settings, path, model=MODEL, version=2, window_start=WINDOW)

    assert (logged.run_id, logged.experiment_id) == (second_run, experiment_id)
    assert logged.artifact_path == "drift_reports/churn/2026-05-11T0000.html"
    assert logged.artifact_uri == f"runs:/{second_run}/drift_reports/churn/2026-05-11T0000.html"
    client = mlflow_client(settings)
    assert [f.path for f in client.list_artifacts(second_run, "drift_reports/churn")] == [logged.artifact_path]
    assert client.list_artifacts(first_run) == []
    assert read_artifact(settings, second_run, logged.artifact_path, tmp_path / "a") == path.read_text()

    write_page(path, "second run")
    again = drift_report.log_report(settings, path, model=MODEL, version=2, window_start=WINDOW)

    assert again == logged
    assert [f.path for f in client.list_artifacts(second_run, "drift_reports/churn")] == [logged.artifact_path]
    assert "second run" in read_artifact(settings, second_run, logged.artifact_path, tmp_path / "b")


def test_the_link_is_the_mlflow_ui_run_page_open_on_the_artifact(local_store):
    settings = dataclasses.replace(local_store, mlflow_ui_url="https://mlflow.example.com/ui")
    ((experiment_id, run_id),) = register_versions(settings, MODEL, 1)
    path = write_page(drift_report.report_path(settings.home, MODEL, WINDOW), "report")

    logged = drift_report.log_report(settings, path, model=MODEL, version=1, window_start=WINDOW)

    url = urlsplit(logged.url)
    assert (url.scheme, url.netloc, url.path, url.query) == ("https", "mlflow.example.com", "/ui/", "")
    route = re.fullmatch(r"/experiments/([^/]+)/runs/([^/]+)/(.+)", url.fragment)
    assert route is not None, logged.url
    assert route.groups() == (experiment_id, run_id, "artifacts/drift_reports/churn/2026-05-11T0000.html")
    assert UI_ARTIFACT_ROUTE.search(url.fragment).group(1) == logged.artifact_path


def test_a_report_that_cannot_be_logged_says_which_what_and_the_fix(local_store):
    settings = local_store
    ((_, run_id),) = register_versions(settings, MODEL, 1)
    path = write_page(drift_report.report_path(settings.home, MODEL, WINDOW), "report")

    with pytest.raises(drift_report.ReportLogError) as missing:
        drift_report.log_report(settings, path, model=MODEL, version=7, window_start=WINDOW)
    message = str(missing.value)
    assert message.startswith("drift report of model 'churn' v7, window 2026-05-11 00:00: could not log ")
    assert f"the report is still at {path}" in message and "then rerun the window" in message

    # An artifact store that refuses the write (here a file where the report's folder must go).
    artifacts = Path(urlsplit(mlflow_client(settings).get_run(run_id).info.artifact_uri).path)
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / drift_report.ARTIFACT_FOLDER).write_text("in the way")
    with pytest.raises(drift_report.ReportLogError, match=rf"model 'churn' v1 \(run {run_id}\)"):
        drift_report.log_report(settings, path, model=MODEL, version=1, window_start=WINDOW)


def test_an_unreachable_tracking_server_is_named_without_its_password(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    port = free_port()
    settings = Settings.from_env(
        {
            "KEEL_HOME": str(tmp_path),
            "KEEL_CODE_VERSION": "t",
            "KEEL_MLFLOW_URI": f"http://keel:s3cr3t@127.0.0.1:{port}",
        }
    )
    path = write_page(drift_report.report_path(settings.home, MODEL, WINDOW), "report")

    with pytest.raises(drift_report.ReportLogError) as caught:
        drift_report.log_report(settings, path, model=MODEL, version=1, window_start=WINDOW)

    message = str(caught.value)
    assert f"to MLflow at http://127.0.0.1:{port} (" in message
    assert "s3cr3t" not in message


# Served over http by MLflow ---------------------------------------------------------------------


def get(url: str, timeout: float = 10) -> tuple[int, Message, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.headers, response.read()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``mlflow server`` over a Keel home's embedded store (as ``make mlflow-ui`` runs it), and the home."""
    home = tmp_path_factory.mktemp("served")
    server = MlflowServer(f"sqlite:///{home / 'mlflow.db'}", (home / "served-artifacts").as_uri())
    try:
        server.start(timeout=90)
    except DevServerError as exc:
        pytest.fail(str(exc))
    yield server, home
    server.stop()


def served_artifact(ui_url: str, logged: drift_report.LoggedReport) -> tuple[int, Message, bytes]:
    """What the MLflow UI's artifact view fetches to show a file (its ``get-artifact`` request)."""
    query = urlencode({"path": logged.artifact_path, "run_uuid": logged.run_id})
    return get(f"{ui_url}/get-artifact?{query}")


def test_mlflow_serves_the_linked_report_over_http(served):
    """Keel's embedded store, and the UI `make mlflow-ui` starts over it (here on a free port)."""
    mlflow_server, home = served
    settings = Settings.from_env(
        {
            "KEEL_HOME": str(home),
            "KEEL_CODE_VERSION": "test-sha",
            "KEEL_MLFLOW_UI_URL": mlflow_server.url,
        }
    )
    ((experiment_id, run_id),) = register_versions(settings, MODEL, 1)
    path = write_page(drift_report.report_path(settings.home, MODEL, WINDOW), "served from the embedded store")

    logged = drift_report.log_report(settings, path, model=MODEL, version=1, window_start=WINDOW)

    assert logged.url.startswith(f"{mlflow_server.url}/#/experiments/{experiment_id}/runs/{run_id}/artifacts/")
    status, headers, body = served_artifact(mlflow_server.url, logged)
    assert status == 200 and headers.get_content_type() == "text/html"
    assert body == path.read_bytes()
    # The link's base is the UI itself: the page that loads MLflow's JavaScript app.
    status, _, page = get(f"{mlflow_server.url}/")
    assert status == 200 and re.search(rb"static-files/static/js/main\.[0-9a-f]+\.js", page), page[:500]


def test_through_a_tracking_server_the_server_is_the_ui_and_stores_the_report(served, tmp_path):
    mlflow_server, _ = served
    """The production shape: KEEL_MLFLOW_URI is the server, artifacts go through it (proxied)."""
    settings = Settings.from_env(
        {"KEEL_HOME": str(tmp_path / "client"), "KEEL_CODE_VERSION": "test-sha", "KEEL_MLFLOW_URI": mlflow_server.url}
    )
    assert settings.mlflow_ui_url == mlflow_server.url
    ((experiment_id, run_id),) = register_versions(settings, "spend", 1)
    assert mlflow_client(settings).get_run(run_id).info.artifact_uri.startswith("mlflow-artifacts:")
    path = write_page(drift_report.report_path(settings.home, "spend", WINDOW), "served through the tracking server")

    logged = drift_report.log_report(settings, path, model="spend", version=1, window_start=WINDOW)

    assert urlsplit(logged.url).fragment == (
        f"/experiments/{experiment_id}/runs/{run_id}/artifacts/drift_reports/spend/2026-05-11T0000.html"
    )
    status, _, body = served_artifact(mlflow_server.url, logged)
    assert status == 200 and body == path.read_bytes()
    assert not (settings.home / "mlartifacts").exists(), "the client wrote no artifacts of its own"
