"""Batch ingestion speed: validating a CSV file against its source, and landing it end to end.

Floor, measured in the same run on the same file: bare DuckDB loading the CSV into a typed
table with no checks (read_csv -> CREATE TABLE). Ours:
- validate: ``keel.ingest.batch.prepare`` (batched read, per-row type/key/timestamp/range checks,
  reason codes, duplicate event ids), the part that scales with the file;
- end to end: ``keel.ingest.batch.ingest_files`` (validate + quarantine + Iceberg branch write +
  Great Expectations audit + publish).

Then the cost of keeping one copy of every event id (``keel.ingest.resent``): a second file of
``--resend-rows`` rows, 1% of them events of the first file re-sent with other values on
other days, is settled against the table. Ours: ``settle_resent`` (a record-batch scan of the
table's event-id and timestamp columns, semi-joined with the incoming ids, then the matched
days compared whole). Floor: bare DuckDB reading the same two columns of the same Parquet
files and semi-joining them with the same ids.

    .venv/bin/python bench/ingest.py [--rows 1000000] [--days 30]
"""

import argparse
import datetime as dt
import tempfile
import time
from pathlib import Path

import duckdb

from keel.config import Settings
from keel.ingest.batch import ingest_files, prepare
from keel.lakehouse.tables import Lakehouse
from pipelines.sources import CURRENCIES, MERCHANT_CATEGORIES, transactions


def write_file(path: Path, rows: int, days: int) -> None:
    """A transactions CSV of ``rows`` rows over ``days`` days, with 0.1% bad rows."""
    currencies = "[" + ", ".join(f"'{c}'" for c in CURRENCIES) + "]"
    categories = "[" + ", ".join(f"'{c}'" for c in MERCHANT_CATEGORIES) + "]"
    seconds = days * 86400
    duckdb.sql(
        f"""
        COPY (
          SELECT 'e' || i AS event_id,
                 'u' || (i * 7919 % 100000) AS user_id,
                 strftime(TIMESTAMP '2026-01-01' + to_seconds((i * 2654435761) % {seconds}), '%Y-%m-%dT%H:%M:%SZ')
                   AS event_ts,
                 CASE WHEN i % 1000 = 7 THEN 'n/a' ELSE round(((i * 31) % 50000) / 100.0, 2)::VARCHAR END AS amount,
                 {currencies}[1 + i % {len(CURRENCIES)}] AS currency,
                 'US' AS country,
                 {categories}[1 + i % {len(MERCHANT_CATEGORIES)}] AS merchant_category,
                 (i % 13 = 0)::VARCHAR AS is_refund
          FROM range({rows}) t(i)
        ) TO '{path}' (HEADER, DELIMITER ',')
        """
    )


def floor_seconds(path: Path) -> float:
    con = duckdb.connect()
    t0 = time.perf_counter()
    con.execute(
        f"CREATE TABLE t AS SELECT * FROM read_csv('{path}', header=true, columns={{"
        "'event_id': 'VARCHAR', 'user_id': 'VARCHAR', 'event_ts': 'TIMESTAMPTZ', 'amount': 'DOUBLE', "
        "'currency': 'VARCHAR', 'country': 'VARCHAR', 'merchant_category': 'VARCHAR', 'is_refund': 'BOOLEAN'}, "
        "ignore_errors=true)"
    )
    elapsed = time.perf_counter() - t0
    con.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--resend-rows", type=int, default=10_000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="keel-bench-") as tmp:
        path = Path(tmp) / "transactions.csv"
        write_file(path, args.rows, args.days)
        size_mb = path.stat().st_size / 1e6
        print(f"file: {args.rows:,} rows, {args.days} days, {size_mb:.0f} MB CSV")

        floor = min(floor_seconds(path) for _ in range(2))

        now = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
        validate = float("inf")
        for _ in range(2):  # the first pass also pays one-off imports (pandas via pyarrow)
            t0 = time.perf_counter()
            with prepare(transactions, [path], now=now) as prepared:
                validate = min(validate, time.perf_counter() - t0)
                valid, bad = prepared.rows_valid, sum(prepared.quarantined.values())

        ingest_files(  # warm-up: Great Expectations' first import and context cost ~8 s once per process
            Lakehouse.from_settings(Settings.from_env({"KEEL_HOME": f"{tmp}/warm", "KEEL_CODE_VERSION": "bench"})),
            transactions,
            [path],
            run_id="warm-up",
            now=now,
        )
        lake = Lakehouse.from_settings(Settings.from_env({"KEEL_HOME": tmp, "KEEL_CODE_VERSION": "bench"}))
        t0 = time.perf_counter()
        report = ingest_files(lake, transactions, [path], run_id="bench", now=now)
        end_to_end = time.perf_counter() - t0
        assert report.published, report.summary()
        resent = resend_costs(lake, Path(tmp), args.resend_rows, args.rows, now)

    print(f"validated {valid:,} rows, quarantined {bad:,}")
    print(f"{'step':<34}{'seconds':>9}{'rows/s':>14}{'x floor':>10}")
    for name, seconds in (
        ("floor: bare DuckDB typed CSV load", floor),
        ("keel validate (prepare)", validate),
        ("keel ingest end to end", end_to_end),
    ):
        print(f"{name:<34}{seconds:>9.2f}{args.rows / seconds:>14,.0f}{seconds / floor:>10.1f}")
    ours, floor_scan, found, scanned = resent
    print(f"\none copy per event id: {args.resend_rows:,} incoming rows against {scanned:,} landed, {found:,} re-sent")
    print(f"{'step':<34}{'seconds':>9}{'rows/s':>14}{'x floor':>10}")
    for name, seconds in (("floor: DuckDB id scan + semi-join", floor_scan), ("keel settle_resent", ours)):
        print(f"{name:<34}{seconds:>9.2f}{scanned / seconds:>14,.0f}{seconds / floor_scan:>10.1f}")


def resend_costs(lake: Lakehouse, tmp: Path, rows: int, landed: int, now: dt.datetime) -> tuple:
    """Seconds to settle a file of ``rows`` rows (1% re-sent) against the table, and the floor's."""
    from keel.ingest.resent import settle_resent

    path = tmp / "resend.csv"
    resent = max(1, rows // 100)
    duckdb.sql(
        f"""
        COPY (
          SELECT CASE WHEN i < {resent} THEN 'e' || (i * 97 % {landed}) ELSE 'n' || i END AS event_id,
                 'u' || (i % 1000) AS user_id,
                 strftime(TIMESTAMP '2026-02-10' + to_seconds(i % 86400), '%Y-%m-%dT%H:%M:%SZ') AS event_ts,
                 '1.5' AS amount, 'EUR' AS currency, 'US' AS country, 'books' AS merchant_category,
                 'false' AS is_refund
          FROM range({rows}) t(i)
        ) TO '{path}' (HEADER, DELIMITER ',')
        """
    )
    table = lake.table(transactions.table_name)
    snapshot = lake.head(transactions.table_name)
    files = [task.file.file_path.removeprefix("file://") for task in table.scan(snapshot_id=snapshot).plan_files()]
    ours = floor = float("inf")
    for _ in range(2):
        with prepare(transactions, [path], now=now) as prepared:
            t0 = time.perf_counter()
            settled = settle_resent(lake, transactions, prepared.con, snapshot)
            ours = min(ours, time.perf_counter() - t0)
            ids = prepared.con.sql("SELECT event_id FROM good").to_arrow_table()
        con = duckdb.connect()
        con.register("incoming", ids)
        t0 = time.perf_counter()
        con.execute(
            f"SELECT s.event_id, s.event_ts FROM read_parquet({files!r}) s SEMI JOIN incoming i "
            "ON s.event_id = i.event_id"
        ).fetchall()
        floor = min(floor, time.perf_counter() - t0)
        con.close()
    return ours, floor, settled.replaced + settled.unchanged + settled.duplicates, settled.scanned


if __name__ == "__main__":
    main()
