"""`keel online sync|get` and `keel consistency` against the embedded (SQLite) online store."""

import datetime as dt
import json

import pytest

from keel.cli.main import main
from tests.factories.features import HISTORY, START, land
from tests.keel.cli import online_project


@pytest.fixture
def home(keel_home, monkeypatch, lake, capsys):
    monkeypatch.setenv("KEEL_PROJECT", "tests.keel.cli.online_project")
    land(lake, online_project.payments, HISTORY, "h")
    end = (START + dt.timedelta(days=9)).isoformat()
    for group in ("spend", "spend_ratio"):
        assert main(["backfill", group, "--start", START.isoformat(), "--end", end]) == 0
    capsys.readouterr()
    return keel_home


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_sync_get_and_consistency(home, capsys):
    code, out, err = run(capsys, "online", "sync")
    assert code == 0, err
    assert "spend: full," in out and "2 keys written" in out and "spend_ratio: full," in out
    code, out, _ = run(capsys, "online", "sync", "spend")
    assert code == 0 and "spend: up to date" in out

    code, out, _ = run(capsys, "online", "get", "spend", "alice", "nobody")
    assert code == 0
    assert "spend user_id=alice" in out and "n_7d" in out
    assert "spend user_id=nobody" in out and "missing" in out
    code, out, _ = run(capsys, "online", "get", "spend", "bob", "--features", "amount_7d", "--json")
    [row] = json.loads(out)
    assert (
        row["user_id"] == "bob" and row["features"] == {"amount_7d": 10.0} and row["status"]["amount_7d"] == "present"
    )

    code, out, _ = run(capsys, "consistency", "--sample", "5")
    assert code == 0
    assert "spend_ratio" in out and "100.00%" in out.splitlines()[-1]


def test_errors_name_the_problem(home, capsys):
    code, _, err = run(capsys, "online", "get", "spend", "alice", "--features", "nope")
    assert code == 1 and "feature 'nope'" in err
    code, _, err = run(capsys, "consistency", "--sample", "0")
    assert code == 2 and "--sample 0 must be at least 1" in err
    code, _, err = run(capsys, "online", "sync", "missing_group")
    assert code == 2 and "missing_group" in err
