"""`keel models list|show|promote` against a real (SQLite) MLflow registry."""

import json
import logging

import pytest

from keel.cli.main import main
from keel.config import Settings
from keel.models import promotion, registration
from keel.models.gates import gate_outcomes
from tests.factories.registry import N_HOLDOUT, N_TRAIN, demo_table, fit, spec, xgb


@pytest.fixture
def home(tmp_path, monkeypatch, capsys):
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    monkeypatch.setenv("KEEL_HOME", str(tmp_path))
    monkeypatch.setenv("KEEL_CODE_VERSION", "sha-cli")
    settings = Settings.from_env()
    data = demo_table(0, N_TRAIN + N_HOLDOUT)
    for features in (["x1", "segment"], ["x1", "x2", "segment"]):
        s = spec("xgboost")
        registration.log_and_register(settings, s, fit(s, xgb(), features, data))
    promotion.promote_if_better(settings, spec("xgboost"), data, version=1)
    capsys.readouterr()
    return tmp_path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_list_show_and_promote(home, capsys):
    code, out, err = run(capsys, "models", "list", "churn")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[1].split()[:2] == ["2", "challenger"] and lines[3].split()[:2] == ["1", "champion"]
    assert "3 features; read features.user_demo@1111, raw.churn_labels@2222" in out

    code, out, _ = run(capsys, "models", "show", "churn", "champion")
    info = json.loads(out)
    assert code == 0 and info["features"] == ["x1", "segment"] and info["code_version"] == "sha-cli"

    code, out, _ = run(capsys, "models", "promote", "churn", "2")
    assert code == 0 and "churn v2 is now" in out and "champion" in out
    rows = json.loads(run(capsys, "models", "list", "churn", "--json")[1])
    assert [(r["version"], "champion" in r["aliases"]) for r in rows] == [(2, True), (1, False)]


def test_a_version_that_failed_its_gates_is_promoted_by_hand_only_when_told(home, capsys):
    settings = Settings.from_env()
    s = spec("xgboost")
    failed = fit(s, xgb(), ["x1", "x2", "segment"], demo_table(0, N_TRAIN + N_HOLDOUT))
    info = registration.log_and_register(settings, s, failed)
    promotion.record_gates(settings, "churn", info.version, gate_outcomes(s, failed, floor=1.01))

    code, _, err = run(capsys, "models", "promote", "churn", str(info.version))
    assert code == 1 and f"'churn' v{info.version} did not pass its promotion gates (hold-out roc_auc=" in err
    assert f"keel models promote churn {info.version} --ignore-gates" in err
    assert json.loads(run(capsys, "models", "show", "churn", "champion")[1])["version"] == 1

    code, out, _ = run(capsys, "models", "promote", "churn", str(info.version), "--ignore-gates")
    assert code == 0 and f"churn v{info.version} is now champion" in out


def test_unknown_models_and_versions_are_named(home, capsys):
    code, _, err = run(capsys, "models", "list", "nope")
    assert code == 1 and "nope" in err
    code, _, err = run(capsys, "models", "promote", "churn", "9")
    assert code == 1 and "9" in err
