"""The ``keel`` command line, run in-process against the real ``pipelines`` project."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.csv as pacsv
import pytest

from keel.cli.main import main
from keel.lakehouse.tables import Lakehouse
from pipelines.generate import generate, write_files

KEEL = Path(sys.executable).with_name("keel")
TXN = "raw.transactions"


@pytest.fixture
def home(keel_home, monkeypatch) -> Path:
    monkeypatch.setenv("KEEL_PROJECT", "pipelines")
    return keel_home


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory) -> dict[str, Path]:
    """Three days of demo data as files, one per source (no churn labels that early)."""
    out = tmp_path_factory.mktemp("demo")
    paths = write_files(generate(days=3, users=40, seed=7), out)
    return {p.parent.name: p for p in paths}


@pytest.fixture
def txn_csv(demo_files, tmp_path) -> Path:
    """A private copy of the demo transactions file, to append rows to."""
    return Path(shutil.copy(demo_files["transactions"], tmp_path / demo_files["transactions"].name))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def csv_rows(path: Path) -> int:
    return pacsv.read_csv(path).num_rows


def append(path: Path, *lines: str) -> None:
    with path.open("a") as fh:
        fh.write("".join(line + "\n" for line in lines))


# config and usage


def test_config_prints_every_setting_in_force(home, capsys):
    code, out, err = run(capsys, "config")

    root = home.resolve()
    assert (code, err) == (0, "")
    assert out.splitlines()[:10] == [
        f"KEEL_HOME={root}",
        f"KEEL_CATALOG_URI=sqlite:///{root}/catalog.db",
        f"KEEL_WAREHOUSE=file://{root}/warehouse",
        f"KEEL_MLFLOW_URI=sqlite:///{root}/mlflow.db",
        "KEEL_MLFLOW_UI_URL=http://127.0.0.1:5000",
        "KEEL_PROJECT=pipelines",
        f"KEEL_LANDING={root}/landing",
        "KEEL_CODE_VERSION=test-sha",
        f"KEEL_ALERT_FILE={root}/alerts.jsonl",
        "KEEL_DAGSTER_URL=http://127.0.0.1:3000",
    ]
    # Then the serving settings, every one shown with its value.
    assert out.splitlines()[10:13] == ["KEEL_SERVE_MODELS=", "KEEL_SERVE_POLL_S=30.0", "KEEL_SERVE_CANARY=0.0"]
    assert "KEEL_SERVE_SHADOW=false" in out and "KEEL_SERVE_BREAKER_RESET_S=5.0" in out


def test_an_unusable_setting_fails_naming_the_variable(home, capsys, monkeypatch):
    monkeypatch.setenv("KEEL_WAREHOUSE", "ftp://files.example/lake")

    code, out, err = run(capsys, "config")

    assert (code, out) == (2, "")
    assert err.startswith("keel: KEEL_WAREHOUSE='ftp://files.example/lake' is not usable: use file:///")


def test_an_unknown_project_module_fails_naming_it(home, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("KEEL_PROJECT", "no_such_project_module")

    code, _, err = run(capsys, "generate", "--days", "1", "--out", tmp_path)

    assert code == 2
    assert "KEEL_PROJECT='no_such_project_module': no such module on the Python path" in err


def test_no_command_prints_the_help(home, capsys):
    code, out, _ = run(capsys)

    assert code == 2
    assert out.startswith("usage: keel")
    for command in ("config", "generate", "ingest", "tables", "quarantine", "maintain", "demo"):
        assert command in out


# generate


def test_generate_writes_the_same_bytes_for_the_same_seed(home, capsys, tmp_path):
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"

    code, out, err = run(capsys, "generate", "--days", "3", "--users", "40", "--out", first)
    assert (code, err) == (0, "")
    assert run(capsys, "generate", "--days", "3", "--users", "40", "--out", second)[0] == 0
    assert run(capsys, "generate", "--days", "3", "--users", "40", "--seed", "8", "--out", other)[0] == 0

    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert [str(f) for f in files] == [
        "clicks/clicks-20260101.jsonl",
        "signups/signups-20260101.parquet",
        "transactions/transactions-20260101.csv",
    ]
    assert sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file()) == files
    for f in files:
        assert (first / f).read_bytes() == (second / f).read_bytes(), f
    assert any((first / f).read_bytes() != (other / f).read_bytes() for f in files)

    lines = out.splitlines()
    txns = csv_rows(first / files[2])
    assert lines[:4] == [
        "       signups:        40 rows",
        f"        clicks: {len((first / files[0]).read_text().splitlines()):>9,} rows",
        f"  transactions: {txns:>9,} rows",
        "  churn_labels:         0 rows",
    ]
    assert lines[4].startswith(f"wrote 3 files under {first} in ")


def test_generate_writes_into_the_landing_folder_by_default(home, capsys):
    code, out, _ = run(capsys, "generate", "--days", "2", "--users", "10")

    landing = home.resolve() / "landing"
    assert code == 0
    assert sorted(p.parent.name for p in landing.rglob("*.*")) == ["clicks", "signups", "transactions"]
    assert f"wrote 3 files under {landing} in " in out


def test_generate_with_a_bad_argument_says_what_to_use(home, capsys, tmp_path):
    code, out, err = run(capsys, "generate", "--days", "0", "--out", tmp_path / "out")

    assert (code, out) == (2, "")
    assert err.startswith("keel generate: days=0 must be an integer >= 1")
    assert not (tmp_path / "out").exists()


# ingest


def test_ingest_prints_rows_read_landed_and_the_published_snapshot(home, capsys, txn_csv):
    rows = csv_rows(txn_csv)

    code, out, err = run(capsys, "ingest", txn_csv, "--source", "transactions")

    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"source transactions: 1 file(s), {rows} rows read, {rows} valid, 0 quarantined"
    assert lines[1].startswith("  staged 2026-01-01..2026-01-03 on branch audit_cli-")
    assert lines[2].startswith("  audit: all ") and lines[2].endswith(" expectations passed")
    lake = Lakehouse.from_env()
    head = lake.head(TXN)
    assert lines[3].startswith("  published: main ") and lines[3].endswith(f" -> {head}")
    assert lake.read(TXN).num_rows == rows


def test_ingest_of_a_file_with_bad_rows_lists_them_by_reason_and_quarantine_shows_them(home, capsys, txn_csv):
    rows = csv_rows(txn_csv)
    append(
        txn_csv,
        '"bad-1","u00001","2026-01-02T10:00:00Z",twelve,"EUR","DE","books",false',
        '"bad-2","","2026-01-02T10:00:00Z",12.5,"EUR","DE","books",false',
        '"t-000000000","u00001","2026-01-02T10:00:00Z",12.5,"EUR","DE","books",false',
        '"bad-4","u00001","someday",12.5,"EUR","DE","books",false',
    )

    code, out, _ = run(capsys, "ingest", txn_csv, "--source", "transactions")

    assert code == 0
    lines = out.splitlines()
    assert lines[:5] == [
        f"source transactions: 1 file(s), {rows + 4} rows read, {rows} valid, 4 quarantined",
        "  quarantined        1  bad_timestamp",
        "  quarantined        1  duplicate_event_id",
        "  quarantined        1  missing_key",
        "  quarantined        1  wrong_type",
    ]
    assert lines[-1].startswith("  published: main ")

    code, out, _ = run(capsys, "quarantine")
    name = txn_csv.name
    assert code == 0
    assert out.splitlines() == [
        "4 quarantined rows",
        f'  transactions {name}:{rows + 1}  [wrong_type] amount: "twelve" is not a number',
        f"  transactions {name}:{rows + 2}  [missing_key] missing user_id",
        f'  transactions {name}:{rows + 3}  [duplicate_event_id] duplicate event_id "t-000000000" '
        f"(first at {txn_csv.resolve()} row 1)",
        f'  transactions {name}:{rows + 4}  [bad_timestamp] event_ts: "someday" is not a timestamp '
        "(ISO 8601, e.g. 2026-01-31T12:00:00Z)",
    ]
    assert run(capsys, "quarantine", "--limit", "1")[1].splitlines() == out.splitlines()[:2]
    assert run(capsys, "quarantine", "--source", "clicks")[1] == "0 quarantined rows\n"
    assert run(capsys, "quarantine", "--source", "o'brien")[1] == "0 quarantined rows\n"


def test_quarantine_before_any_ingest_says_so(home, capsys):
    assert run(capsys, "quarantine") == (0, "nothing quarantined yet\n", "")


def test_ingest_of_only_bad_rows_fails_and_says_why_nothing_was_published(home, capsys, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text(
        "event_id,user_id,event_ts,amount,currency,country,merchant_category,is_refund\n"
        "b1,,2026-01-02T10:00:00Z,1,EUR,DE,books,false\n"
        "b2,u1,2026-01-02T10:00:00Z,lots,EUR,DE,books,false\n"
    )

    code, out, _ = run(capsys, "ingest", path, "--source", "transactions")

    assert code == 1
    assert out.splitlines() == [
        "source transactions: 1 file(s), 2 rows read, 0 valid, 2 quarantined",
        "  quarantined        1  missing_key",
        "  quarantined        1  wrong_type",
        "  NOT published: source 'transactions': no valid rows to land from 1 file(s) (2 read, 2 quarantined "
        "(missing_key 1, wrong_type 1), 0 outside the run's days); see `keel quarantine --source transactions`",
    ]
    assert Lakehouse.from_env().read(TXN).num_rows == 0


def test_ingest_that_fails_the_audit_returns_non_zero_and_keeps_main(home, capsys, txn_csv, tmp_path):
    assert run(capsys, "ingest", txn_csv, "--source", "transactions")[0] == 0
    lake = Lakehouse.from_env()
    before = lake.head(TXN)
    thin = tmp_path / "thin.csv"
    thin.write_text(
        "event_id,user_id,event_ts,amount,currency,country,merchant_category,is_refund\n"
        "late-1,u1,2026-01-04T10:00:00Z,1,EUR,DE,books,false\n"
    )

    code, out, _ = run(capsys, "ingest", thin, "--source", "transactions")

    assert code == 1
    assert "  audit: expect_daily_row_count_to_be_between(event_ts): 1 rows in 2026-01-04 vs recent median" in out
    assert out.splitlines()[-1].startswith(f"  NOT published: audit failed, main left at snapshot {before}; branch ")
    assert lake.head(TXN) == before


def test_ingest_of_an_unknown_source_names_it_and_lists_the_known_ones(home, capsys, txn_csv):
    code, out, err = run(capsys, "ingest", txn_csv, "--source", "payments")

    assert (code, out) == (2, "")
    assert err == (
        "keel: project 'shop' has no event source 'payments' (known: signups, clicks, transactions, churn_labels)\n"
    )


def test_ingest_of_a_missing_file_publishes_nothing(home, capsys, tmp_path):
    path = tmp_path / "nope.csv"

    code, out, err = run(capsys, "ingest", path, "--source", "transactions")

    assert (code, out) == (1, "")
    assert (
        err
        == f"keel ingest: {path.resolve()}: does not exist or is not a file; nothing was published (check the path)\n"
    )
    assert Lakehouse.from_env().tables() == []


def test_ingest_of_a_file_of_another_source_names_the_columns_it_lacks(home, capsys, demo_files):
    code, out, err = run(capsys, "ingest", demo_files["signups"], "--source", "transactions")

    assert (code, out) == (1, "")
    assert err == (
        f"keel ingest: {demo_files['signups']}: lacks column(s) amount, currency, merchant_category, "
        "is_refund that its source declares at its schema, which names event_id, user_id, event_ts, country, device, "
        "plan, age; nothing was published (add them, or give --source the source the file holds)\n"
    )


def test_ingest_of_a_jsonl_file_of_another_source_is_refused_before_anything_is_quarantined(home, capsys, demo_files):
    code, out, err = run(capsys, "ingest", demo_files["clicks"], "--source", "transactions")

    assert (code, out) == (1, "")
    assert err.startswith(
        f"keel ingest: {demo_files['clicks']}: lacks key(s) amount, currency, country, merchant_category, "
        "is_refund that its source declares at every one of its first "
    )
    assert Lakehouse.from_env().tables() == []


def test_ingest_of_a_ragged_csv_publishes_nothing(home, capsys, txn_csv):
    rows = csv_rows(txn_csv)
    append(txn_csv, '"x1","u1","2026-01-02T10:00:00Z",1,"EUR","DE","books",false,"surplus"')

    code, out, err = run(capsys, "ingest", txn_csv, "--source", "transactions")

    assert (code, out) == (1, "")
    assert err == (
        f"keel ingest: {txn_csv.resolve()}: is not a readable CSV file: Expected 8 columns, got 9: "
        f'"x1","u1","2026-01-02T10:00:00Z",1,"EUR","DE","books",false,"surplus" at row {rows + 1}; '
        "nothing was published (give every row the header's 8 fields, quoting values that hold commas)\n"
    )
    assert not Lakehouse.from_env().exists(TXN)


def test_ingest_of_a_latin1_file_names_the_byte_and_the_option_that_reads_it(home, capsys, txn_csv):
    rows = csv_rows(txn_csv)
    with txn_csv.open("ab") as fh:
        fh.write('"m-1","müller","2026-01-02T10:00:00Z",1,"EUR","DE","books",false\n'.encode("latin-1"))
    offset = txn_csv.read_bytes().index(0xFC)

    code, out, err = run(capsys, "ingest", txn_csv, "--source", "transactions")

    assert (code, out) == (1, "")
    assert err == (
        f"keel ingest: {txn_csv.resolve()}: is not valid UTF-8 (byte 0xFC) at byte {offset} (line {rows + 2}); "
        "nothing was published (if it was saved as Latin-1 or Windows-1252, ingest it with --encoding latin-1 "
        "or --encoding cp1252; otherwise save it as UTF-8)\n"
    )
    assert Lakehouse.from_env().tables() == []

    code, out, err = run(capsys, "ingest", txn_csv, "--source", "transactions", "--encoding", "latin-1")

    assert (code, err) == (0, "")
    assert (
        out.splitlines()[0] == f"source transactions: 1 file(s), {rows + 1} rows read, {rows + 1} valid, 0 quarantined"
    )
    assert "müller" in Lakehouse.from_env().read(TXN)["user_id"].to_pylist()


def test_ingest_with_an_unknown_encoding_is_a_usage_error(home, capsys, txn_csv):
    with pytest.raises(SystemExit) as exit_:
        main(["ingest", str(txn_csv), "--source", "transactions", "--encoding", "latin-9x"])

    assert exit_.value.code == 2
    assert "argument --encoding: encoding 'latin-9x' is not known (use e.g. utf-8" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "content", "what"),
    [
        ("garbage.csv", bytes(range(256)) * 4, "is binary, not text (byte 0x00) at byte 0 (line 1)"),
        ("cut.csv.gz", None, "is cut short: its gzip stream ends early at byte "),
        (
            "header.csv",
            b"event_id,user_id,event_ts,amount,currency,country,merchant_category,is_refund\n",
            "holds no rows",
        ),
    ],
)
def test_ingest_of_a_bad_file_is_one_line_naming_it_and_exit_1(home, capsys, txn_csv, tmp_path, name, content, what):
    path = tmp_path / name
    if content is None:
        packed = gzip.compress(txn_csv.read_bytes())
        content = packed[: len(packed) // 2]
    path.write_bytes(content)

    code, out, err = run(capsys, "ingest", path, "--source", "transactions")

    assert (code, out) == (1, "")
    assert err.startswith(f"keel ingest: {path.resolve()}: {what}")
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "quarantine" not in err
    assert "; nothing was published" in err
    assert Lakehouse.from_env().tables() == []


def test_ingest_stages_under_keel_home_and_leaves_nothing_there(home, capsys, txn_csv, monkeypatch):
    from keel.ingest import validation

    roots = []
    real_prepare = validation.prepare

    def spy(*args, **kwargs):
        roots.append(kwargs["staging_root"])
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr("keel.ingest.batch.prepare", spy)

    assert run(capsys, "ingest", txn_csv, "--source", "transactions")[0] == 0

    assert roots == [home.resolve() / "staging"]
    assert list((home / "staging").iterdir()) == []


# tables and maintain


def test_tables_lists_tables_and_shows_one_with_its_snapshots(home, capsys, txn_csv):
    assert run(capsys, "tables") == (0, "no tables yet (land some: keel ingest FILE --source NAME)\n", "")
    rows = csv_rows(txn_csv)
    run(capsys, "ingest", txn_csv, "--source", "transactions")

    code, out, _ = run(capsys, "tables")
    assert code == 0
    assert out.splitlines() == [
        f"{'keel.quarantine':<28} {0:>10,} rows  {0:>4} partitions  {2:>4} snapshots",
        f"{TXN:<28} {rows:>10,} rows  {3:>4} partitions  {2:>4} snapshots",
    ]

    code, out, _ = run(capsys, "tables", TXN)
    lake = Lakehouse.from_env()
    create, publish = lake.snapshots(TXN)
    lines = out.splitlines()
    assert code == 0
    assert lines[:3] == [f"{TXN}: {rows:,} rows", f"branches: main={publish.snapshot_id}", "snapshots (oldest first):"]
    assert len(lines) == 5
    assert lines[3].split()[0] == str(create.snapshot_id)
    assert lines[3].endswith("append    run_id=create partition= code_version=test-sha source=create")
    run_id = publish.properties["keel.run_id"]
    assert run_id.startswith("cli-")
    assert lines[4].split()[0] == str(publish.snapshot_id)
    assert lines[4].endswith(
        f"run_id={run_id} partition=2026-01-01..2026-01-03 code_version=test-sha source=ingest:transactions "
        f"rows.unchanged=0 rows.replaced=0 rows.duplicate=0 base_snapshot={create.snapshot_id}"
    )


def test_tables_of_an_unknown_table_fails_with_a_hint(home, capsys):
    code, out, err = run(capsys, "tables", "raw.nope")

    assert (code, out) == (1, "")
    assert err.startswith("keel tables: table 'raw.nope' does not exist yet")


def test_maintain_removes_a_stale_audit_branch_and_expires_old_snapshots(home, capsys, txn_csv, tmp_path):
    run(capsys, "ingest", txn_csv, "--source", "transactions")
    thin = tmp_path / "thin.csv"
    thin.write_text(
        "event_id,user_id,event_ts,amount,currency,country,merchant_category,is_refund\n"
        "late-1,u1,2026-01-04T10:00:00Z,1,EUR,DE,books,false\n"
    )
    assert run(capsys, "ingest", thin, "--source", "transactions")[0] == 1
    lake = Lakehouse.from_env()
    head = lake.head(TXN)
    assert len(lake.table(TXN).refs()) == 2
    files = len(lake.table(TXN).inspect.files())  # one a (day, entity bucket)

    code, out, err = run(
        capsys, "maintain", "--table", TXN, "--branch-days", "0", "--expire-days", "0", "--compact-min-files", "2"
    )

    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"{TXN:<28} files {files:>4} -> {files:<4} compacted   0 days  expired   2 snapshots  removed 1 branches",
        f"staging {home.resolve() / 'staging'}: removed 0 folder(s) left by killed ingests, freed 0 bytes; "
        "kept 0 of running ingests",
    ]
    assert set(lake.table(TXN).refs()) == {"main"}
    assert lake.head(TXN) == head
    assert [s.snapshot_id for s in lake.table(TXN).snapshots()] == [head]


def test_maintain_of_an_unknown_table_names_the_known_ones(home, capsys, txn_csv):
    run(capsys, "ingest", txn_csv, "--source", "transactions")

    code, out, err = run(capsys, "maintain", "--table", "raw.nope")

    assert (code, out) == (2, "")
    assert err == "keel maintain: no such table(s): raw.nope (known: keel.quarantine, raw.transactions)\n"


def test_maintain_of_every_table_after_a_clean_ingest_changes_no_content(home, capsys, txn_csv):
    # The quarantine table's head then holds no data file at all.
    run(capsys, "ingest", txn_csv, "--source", "transactions")
    lake = Lakehouse.from_env()
    before = {name: lake.head(name) for name in lake.tables()}
    files = len(lake.table(TXN).inspect.files())  # one a (day, entity bucket)

    code, out, err = run(capsys, "maintain")

    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"{'keel.quarantine':<28} files    0 -> 0    compacted   0 days  expired   0 snapshots  removed 0 branches",
        f"{TXN:<28} files {files:>4} -> {files:<4} compacted   0 days  expired   0 snapshots  removed 0 branches",
        f"staging {home.resolve() / 'staging'}: removed 0 folder(s) left by killed ingests, freed 0 bytes; "
        "kept 0 of running ingests",
    ]
    assert {name: lake.head(name) for name in lake.tables()} == before


# the installed entry point


def test_installed_keel_command_exits_with_the_documented_codes(home, tmp_path):
    env = {**os.environ}

    def keel(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(KEEL), *argv], env=env, capture_output=True, text=True, timeout=120)

    config = keel("config")
    assert config.returncode == 0, config.stderr
    assert "KEEL_PROJECT=pipelines" in config.stdout.splitlines()
    assert keel().returncode == 2
    missing = keel("ingest", str(tmp_path / "x.csv"), "--source", "transactions")
    assert missing.returncode == 1 and "does not exist or is not a file; nothing was published" in missing.stderr


def test_config_hides_the_alert_webhook_token(home, capsys, monkeypatch):
    monkeypatch.setenv("KEEL_ALERT_WEBHOOK", "https://hooks.slack.com/services/T000/B000/secret-token")
    code, out, _ = run(capsys, "config")
    assert code == 0
    assert "secret-token" not in out and "KEEL_ALERT_WEBHOOK=https://hooks.slack.com/***" in out


def test_an_ingest_of_busy_days_adds_the_entity_bucket_partition(home, capsys, txn_csv, monkeypatch):
    from keel.ingest import batch
    from keel.lakehouse.buckets import ENTITY_BUCKETS, bucket_field

    run(capsys, "ingest", txn_csv, "--source", "transactions")
    lake = Lakehouse.from_env()
    assert bucket_field(lake.table(TXN)) is None  # a few rows a day: whole days, one file each
    rows = lake.read(TXN).num_rows

    monkeypatch.setattr(batch, "BUCKETED_ROWS_PER_DAY", 1)
    assert run(capsys, "ingest", txn_csv, "--source", "transactions")[0] == 0
    table = lake.table(TXN)
    assert bucket_field(table)[1:] == ("user_id", ENTITY_BUCKETS)
    assert lake.read(TXN).num_rows == rows  # the same events again: nothing added, nothing lost
