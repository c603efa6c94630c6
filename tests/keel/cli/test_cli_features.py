"""`keel backfill`, `keel training-set` and `keel features ...` on a small project."""

import datetime as dt

import pyarrow.parquet as pq
import pytest

from keel.cli.main import main
from tests.factories.features import HISTORY, SPINE, START, land
from tests.keel.cli import feature_project


@pytest.fixture
def home(keel_home, monkeypatch, lake):
    monkeypatch.setenv("KEEL_PROJECT", "tests.keel.cli.feature_project")
    land(lake, feature_project.payments, HISTORY, "h")
    return keel_home


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_backfill_then_list_show_and_lineage(home, capsys, lake):
    end = (START + dt.timedelta(days=9)).isoformat()
    code, out, err = run(capsys, "backfill", "spend", "--start", START.isoformat(), "--end", end)
    assert code == 0, err
    assert "backfilling spend v1 for 10 day(s)" in out
    assert "  shards: 1 shard(s) on in-process, 1 task(s) on 1 worker(s); peak memory " in out
    assert f"published features.spend snapshot {lake.head('features.spend')}" in out

    code, out, _ = run(capsys, "features", "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[1].split()[:3] == ["spend", "1", "buyer"]
    assert lines[2].split()[:3] == ["spend_ratio", "1", "buyer"]

    code, out, _ = run(capsys, "features", "show", "spend")
    assert code == 0
    assert "n_7d                       count(*) over 7d" in out
    assert "amount_7d                  sum(amount) over 7d where NOT is_refund" in out
    assert "registered versions: v1" in out
    assert f"snapshot {lake.head('features.spend')}" in out
    assert "freshness: newest partition 2026-03-10" in out

    code, out, _ = run(capsys, "features", "lineage", "spend")
    assert out.splitlines()[1:4] == [
        "  sources:    raw.payments",
        "  upstream:   -",
        "  downstream: spend_ratio",
    ]


def test_training_set_writes_the_file_and_reports_coverage(home, capsys, tmp_path):
    spine = tmp_path / "spine.parquet"
    pq.write_table(SPINE, spine)
    out_file = tmp_path / "out" / "train.parquet"

    code, out, err = run(
        capsys, "training-set", "--spine", str(spine), "--features", "n_7d,spend.amount_7d", "--out", str(out_file)
    )

    assert code == 0, err
    table = pq.read_table(out_file)
    assert table.column("n_7d").to_pylist() == [3, 1, 1, 0, 0, 0]
    assert "6 rows x 2 features" in out
    assert "amount_7d                     50.0% non-null" in out

    sharded = tmp_path / "out" / "sharded.parquet"
    argv = ["--spine", str(spine), "--features", "n_7d,spend.amount_7d", "--out", str(sharded), "--shards", "4"]
    code, out, err = run(capsys, "training-set", *argv)
    assert code == 0, err
    assert pq.read_table(sharded).equals(table)
    assert "shards: 4 shard(s) on in-process" in out


def test_errors_name_the_group_the_feature_and_the_date(home, capsys, tmp_path):
    code, _, err = run(capsys, "backfill", "nope", "--start", "2026-03-01", "--end", "2026-03-02")
    assert code == 2 and "no feature group 'nope'" in err
    code, _, err = run(capsys, "backfill", "spend", "--start", "2026-03-05", "--end", "2026-03-01")
    assert code == 1 and "end 2026-03-01 is before start 2026-03-05" in err
    with pytest.raises(SystemExit):
        main(["backfill", "spend", "--start", "March", "--end", "2026-03-01"])
    assert "'March' is not a date" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["backfill", "spend", "--start", "2026-03-01", "--end", "2026-03-02", "--shards", "3"])
    assert "--shards '3': give a power of two from 1 to 4096" in capsys.readouterr().err
    spine = tmp_path / "s.parquet"
    pq.write_table(SPINE, spine)
    code, _, err = run(
        capsys, "training-set", "--spine", str(spine), "--features", "zzz", "--out", str(tmp_path / "o.parquet")
    )
    assert code == 2 and "feature 'zzz' is not declared" in err
