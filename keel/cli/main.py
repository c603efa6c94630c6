"""The ``keel`` command line."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

from keel.cli import demo as cli_demo
from keel.cli import features as cli_features
from keel.cli import models as cli_models
from keel.cli import monitoring as cli_monitor
from keel.cli import online as cli_online
from keel.cli import serve as cli_serve
from keel.cli import stream as cli_stream
from keel.config import ConfigError, Settings
from keel.dsl import DeclarationError


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except (ConfigError, DeclarationError) as exc:
        print(f"keel: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: every command and its options."""
    parser = argparse.ArgumentParser(
        prog="keel", description="Keel: feature store, serving and monitoring on a lakehouse."
    )
    sub = parser.add_subparsers(metavar="COMMAND")

    p = sub.add_parser("config", help="print the settings in force (from KEEL_* variables)")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("generate", help="make the project's deterministic demo data as files")
    p.add_argument("--days", type=int, default=90)
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--drift-after", type=int, default=None, metavar="DAY")
    p.add_argument("--out", type=Path, default=None, help="folder to write into (default: the landing folder)")
    p.add_argument(
        "--to-kafka", action="store_true", help="stream events now to the sources' topics (KEEL_KAFKA_BOOTSTRAP)"
    )
    p.add_argument("--rate", type=float, default=100.0, help="with --to-kafka: events per second (default 100)")
    p.add_argument(
        "--seconds", type=float, default=None, help="with --to-kafka: stop after this long (default: Ctrl-C)"
    )
    p.add_argument(
        "--bad-every", type=int, default=None, metavar="K", help="with --to-kafka: every K-th event malformed"
    )
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("ingest", help="validate files and land them through write-audit-publish")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.add_argument("--source", required=True, help="the declared event source the files hold")
    p.add_argument(
        "--encoding",
        type=_encoding,
        default=None,
        help="of CSV and JSONL files not in UTF-8, e.g. latin-1 or cp1252 (a byte order mark is read as such)",
    )
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("tables", help="list tables, or show one's snapshots, partitions and branches")
    p.add_argument("table", nargs="?", help="e.g. raw.transactions")
    p.set_defaults(func=cmd_tables)

    p = sub.add_parser("quarantine", help="show quarantined rows")
    p.add_argument("--source")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=cmd_quarantine)

    p = sub.add_parser("maintain", help="compact small files, drop stale audit branches, expire old snapshots")
    p.add_argument("--table", action="append", help="only this table (repeatable); default all")
    p.add_argument("--expire-days", type=float, default=7.0)
    p.add_argument("--compact-min-files", type=int, default=4)
    p.add_argument("--branch-days", type=float, default=7.0)
    p.add_argument(
        "--staging-hours",
        type=float,
        default=24.0,
        help="a staging folder of another host's ingest goes once unchanged this long (default 24)",
    )
    p.set_defaults(func=cmd_maintain)

    cli_features.add_commands(sub)
    cli_online.add_commands(sub)
    cli_stream.add_commands(sub)
    cli_models.add_commands(sub)
    cli_serve.add_commands(sub)
    cli_monitor.add_commands(sub)

    cli_demo.add_commands(sub)
    return parser


def _encoding(name: str) -> str:
    from keel.ingest.text_files import check_encoding

    try:
        check_encoding(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return name


def _project(settings: Settings):
    from keel.project import load_project

    return load_project(settings.project)


def cmd_config(args) -> int:
    from dataclasses import fields

    from keel.config import SERVING_VARIABLES, ServingSettings, hide_password, redact_url

    for key, value in Settings.from_env().as_env().items():
        # No secret is printed: a webhook URL carries its token in the path, a database or Redis
        # URL its password, and the API keys below are only counted.
        print(f"{key}={redact_url(value) if key == 'KEEL_ALERT_WEBHOOK' else hide_password(value)}")
    serving = ServingSettings.from_env()
    for f in fields(serving):
        value = getattr(serving, f.name)
        shown = (
            ",".join(value) if isinstance(value, tuple) else str(value).lower() if isinstance(value, bool) else value
        )
        if f.name == "api_keys" and value:
            shown = f"<{len(value)} key(s)>"
        print(f"{SERVING_VARIABLES[f.name].name}={shown}")
    return 0


def cmd_generate(args) -> int:
    if args.to_kafka:
        return cli_stream.cmd_generate_kafka(args)
    settings = Settings.from_env()
    project = _project(settings)
    if project.generate is None or project.write_files is None:
        print(f"keel: project {project.name!r} declares no demo data generator", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        tables = project.generate(days=args.days, users=args.users, seed=args.seed, drift_after=args.drift_after)
    except ValueError as exc:
        print(f"keel generate: {exc}", file=sys.stderr)
        return 2
    out = args.out or settings.landing
    paths = project.write_files(tables, out)
    for name, table in tables.items():
        print(f"{name:>14}: {table.num_rows:>9,} rows")
    print(f"wrote {len(paths)} files under {out} in {time.perf_counter() - start:.1f}s")
    return 0


def cmd_ingest(args) -> int:
    from keel.config import redact_url
    from keel.ingest.batch import IngestError, ingest_files
    from keel.ingest.file_checks import FileFormatError
    from keel.lakehouse.tables import CATALOG_DOWN, Lakehouse, LakehouseError

    settings = Settings.from_env()
    source = _project(settings).source(args.source)
    lake = Lakehouse.from_settings(settings)
    try:
        report = ingest_files(
            lake,
            source,
            args.files,
            run_id=f"cli-{uuid.uuid4().hex[:12]}",
            encoding=args.encoding,
            staging_root=settings.staging,
        )
    except FileFormatError as exc:
        at = f" at {exc.where}" if exc.where else ""
        fix = f" ({exc.fix})" if exc.fix else ""
        name = f"{exc.path}: " if exc.path else ""
        print(f"keel ingest: {name}{exc.what}{at}; nothing was published{fix}", file=sys.stderr)
        return 1
    except (IngestError, LakehouseError) as exc:
        print(f"keel ingest: {exc}; nothing was published", file=sys.stderr)
        return 1
    except CATALOG_DOWN as exc:
        print(
            f"keel ingest: the Iceberg catalog at {redact_url(settings.catalog_uri)} did not answer "
            f"({_first_line(exc)}); run the same command again when it is back: each row lands once, whether "
            "or not this run's publish reached it",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:
        if urlparse(settings.warehouse).scheme == "file":
            raise
        # pyarrow's object-store client failed writing or reading table files. Main only ever
        # moves to a whole staged write, so it holds all of this run or none of it.
        store = settings.s3_endpoint or urlparse(settings.warehouse).scheme
        print(
            f"keel ingest: the object store at {store} failed ({_first_line(exc)}); run the same command again "
            "when it answers: each row lands once, whether or not this run's publish reached main",
            file=sys.stderr,
        )
        return 1
    print(report.summary())
    return 0 if report.published else 1


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def cmd_tables(args) -> int:
    from keel.lakehouse.tables import Lakehouse

    lake = Lakehouse.from_env()
    if not args.table:
        names = lake.tables()
        if not names:
            print("no tables yet (land some: keel ingest FILE --source NAME)")
        for name in names:
            rows = lake.partition_rows(name)
            print(
                f"{name:<28} {sum(rows.values()):>10,} rows  {len(rows):>4} partitions  "
                f"{len(lake.snapshots(name)):>4} snapshots"
            )
        return 0
    from keel.lakehouse.tables import LakehouseError

    try:
        snaps = lake.snapshots(args.table)
    except LakehouseError as exc:
        print(f"keel tables: {exc}", file=sys.stderr)
        return 1
    table = lake.table(args.table)
    print(f"{args.table}: {sum(lake.partition_rows(args.table).values()):,} rows")
    print("branches: " + ", ".join(f"{k}={v.snapshot_id}" for k, v in sorted(table.refs().items())))
    print("snapshots (oldest first):")
    for s in snaps:
        props = " ".join(f"{k.removeprefix('keel.')}={v}" for k, v in s.properties.items())
        print(f"  {s.snapshot_id:>20}  {s.committed_at:%Y-%m-%d %H:%M:%S}  {s.operation:<9} {props}")
    return 0


def cmd_quarantine(args) -> int:
    from pyiceberg.expressions import EqualTo

    from keel.ingest.batch import QUARANTINE_TABLE
    from keel.lakehouse.tables import Lakehouse

    lake = Lakehouse.from_env()
    if not lake.exists(QUARANTINE_TABLE):
        print("nothing quarantined yet")
        return 0
    row_filter = EqualTo("source", args.source) if args.source else None
    data = lake.read(QUARANTINE_TABLE, row_filter=row_filter).sort_by(
        [("file", "ascending"), ("row_number", "ascending")]
    )
    print(f"{data.num_rows} quarantined rows")
    for row in data.slice(0, args.limit).to_pylist():
        # A file by its name; a Kafka partition (kafka://topic/partition, row = offset) in full.
        where = row["file"] if "://" in row["file"] else Path(row["file"]).name
        print(f"  {row['source']} {where}:{row['row_number']}  [{row['reason_code']}] {row['reason']}")
    return 0


def cmd_maintain(args) -> int:
    from keel.ingest.staging import clean_staging
    from keel.lakehouse.maintenance import maintain
    from keel.lakehouse.tables import Lakehouse

    settings = Settings.from_env()
    try:
        results = maintain(
            Lakehouse.from_settings(settings),
            run_id=f"cli-maintain-{uuid.uuid4().hex[:8]}",
            tables=args.table,
            expire_after=dt.timedelta(days=args.expire_days),
            compact_min_files=args.compact_min_files,
            branch_max_age=dt.timedelta(days=args.branch_days),
        )
        staging = clean_staging(settings.staging, max_age=dt.timedelta(hours=args.staging_hours))
    except ValueError as exc:
        print(f"keel maintain: {exc}", file=sys.stderr)
        return 2
    for r in results:
        print(
            f"{r.table:<28} files {r.files_before:>4} -> {r.files_after:<4} compacted {len(r.compacted_days):>3} days  "
            f"expired {r.expired_snapshots:>3} snapshots  removed {len(r.removed_branches)} branches"
        )
    print(staging.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
