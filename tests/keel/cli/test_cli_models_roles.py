"""`keel models list` (aligned columns with the stage) and `keel models sync` against a real
(SQLite) MLflow registry; versions without artifacts, as roles never load a model."""

import logging

import pytest

from keel.cli.main import main
from keel.config import Settings
from keel.models.registry_client import mlflow_client
from keel.models.role_types import Request
from keel.models.roles import settle
from tests.factories.registry import assert_in_step, person_moves_stage


@pytest.fixture
def client(keel_home, capsys):
    """'churn' (declared by the default project) with v1 champion, v2 challenger, v3 in no role."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    client = mlflow_client(Settings.from_env())
    client.create_registered_model("churn")
    experiment = client.create_experiment("churn")
    for _ in range(3):
        run = client.create_run(experiment)
        client.log_metric(run.info.run_id, "roc_auc", 0.8125)
        mv = client.create_model_version("churn", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
        client.set_model_version_tag("churn", mv.version, "metric", "roc_auc")
    settle(client, "churn", Request("automatic", champion=1))
    settle(client, "churn", Request("automatic", challenger=2))
    capsys.readouterr()
    return client


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_list_prints_aligned_columns_with_the_stage(client, capsys):
    code, out, err = run(capsys, "models", "list", "churn")
    assert code == 0, err
    lines = out.splitlines()
    header, rows = lines[0], [lines[1], lines[3], lines[5]]
    assert header.split() == ["version", "aliases", "stage", "status", "metric", "created", "code"]
    assert [row.split()[:3] for row in rows] == [
        ["3", "-", "None"],
        ["2", "challenger", "Staging"],
        ["1", "champion", "Production"],
    ]
    # Every column starts where its header does.
    for name in ("aliases", "stage", "status", "metric", "created"):
        column = header.index(name)
        assert all(row[column - 1] == " " and row[column] != " " for row in rows), (name, out)
    assert "roc_auc 0.8125" in rows[0]
    assert "churn: champion v1, challenger v2" in out and "not yet settled" not in out


def test_list_says_what_mlflow_changed_and_sync_settles_it(client, capsys):
    person_moves_stage(client, "churn", 3, "Production")
    code, out, _ = run(capsys, "models", "list", "churn")
    assert code == 0
    assert "churn: champion v3, challenger v2" in out
    assert "not yet settled in MLflow (already served):" in out and "v3 champion (mlflow-stage" in out
    assert "`keel models sync churn` writes them now" in out

    code, out, _ = run(capsys, "models", "sync", "churn")
    assert code == 0
    assert out.startswith("churn: champion v3, challenger v2: wrote 1 alias move(s), 1 stage transition(s)")
    assert "v3 champion (mlflow-stage" in out and "retiring v1" in out
    assert assert_in_step(client, "churn")["aliases"] == {"champion": 3, "challenger": 2}

    # Without a name: every model the project declares.
    code, out, _ = run(capsys, "models", "sync")
    assert code == 0 and out == "churn: champion v3, challenger v2: in step\n"


def test_sync_names_an_unknown_model(client, capsys):
    code, _, err = run(capsys, "models", "sync", "nope")
    assert code == 1 and "model 'nope' is not registered (registered: churn)" in err
