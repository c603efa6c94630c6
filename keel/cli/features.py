"""``keel backfill``, ``keel training-set`` and ``keel features ...``: the feature store's commands."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
import uuid
from pathlib import Path


def add_commands(sub) -> None:
    p = sub.add_parser("backfill", help="compute a feature group for a range of days (idempotent)")
    p.add_argument("group")
    p.add_argument("--start", required=True, type=_date, help="first day, YYYY-MM-DD")
    p.add_argument("--end", required=True, type=_date, help="last day, YYYY-MM-DD")
    p.add_argument("--shards", type=_shard_count, help=SHARDS_HELP)
    p.set_defaults(func=cmd_backfill)

    p = sub.add_parser("training-set", help="a point-in-time correct training set for a spine file")
    p.add_argument("--spine", required=True, type=Path, help="Parquet, CSV or JSONL: entity keys, a timestamp, labels")
    p.add_argument("--features", required=True, help="comma-separated: group.feature or feature")
    p.add_argument("--out", required=True, type=Path, help="where to write (.parquet or .csv)")
    p.add_argument("--timestamp", default="event_ts", help="the spine's timestamp column (default event_ts)")
    p.add_argument("--shards", type=_shard_count, help=SHARDS_HELP)
    p.set_defaults(func=cmd_training_set)

    p = sub.add_parser("features", help="the feature registry: list, show NAME, lineage NAME")
    fsub = p.add_subparsers(metavar="WHAT")
    q = fsub.add_parser("list", help="every feature group with its version, owner and latest snapshot")
    q.set_defaults(func=cmd_features_list)
    q = fsub.add_parser("show", help="a group's definition, versions, latest snapshot, freshness and rows")
    q.add_argument("name")
    q.set_defaults(func=cmd_features_show)
    q = fsub.add_parser("lineage", help="a group's sources, upstream and downstream groups, and models")
    q.add_argument("name")
    q.set_defaults(func=cmd_features_lineage)


SHARDS_HELP = "entity shards to compute in, a power of two (default KEEL_SHARDS, else from KEEL_MAX_MEMORY)"


def _shard_count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 4096 or int(text) & (int(text) - 1):
        raise argparse.ArgumentTypeError(f"--shards {text!r}: give a power of two from 1 to 4096, e.g. 8")
    return int(text)


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (use YYYY-MM-DD)") from None


def _store(shards: int | None = None):
    from keel.store import FeatureStore

    store = FeatureStore.from_env()
    store.shards = shards or store.shards
    return store


def cmd_backfill(args) -> int:
    from keel.compute import ComputeError
    from keel.features.materialize import MaterializeError, backfill
    from keel.features.registry import RegistryError

    store = _store(args.shards)
    group = store.project.group(args.group)
    t0 = time.perf_counter()
    days = (args.end - args.start).days + 1
    print(f"backfilling {group.name} v{group.version} for {days} day(s) {args.start}..{args.end}", flush=True)
    try:
        write, report, snapshot = backfill(
            store, group, args.start, args.end, run_id=f"cli-backfill-{uuid.uuid4().hex[:8]}"
        )
    except (MaterializeError, RegistryError, ComputeError) as exc:
        print(f"keel backfill: {exc}; nothing was published", file=sys.stderr)
        return 1
    rows = sum(write.entities_per_day.values())
    print(
        f"  computed {rows:,} rows ({min(write.entities_per_day.values())}..{max(write.entities_per_day.values())} entities a day)"
    )
    print(f"  shards: {write.shards.summary()}")
    print(f"  audit: {report.summary()}")
    if snapshot is None:
        print(f"  NOT published: audit failed; branch {write.staged.branch} kept for inspection", file=sys.stderr)
        return 1
    print(f"  published {group.table_name} snapshot {snapshot} in {time.perf_counter() - t0:.1f}s")
    return 0


def cmd_training_set(args) -> int:
    from keel.compute import ComputeError
    from keel.store import TrainingSetError

    store = _store(args.shards)
    t0 = time.perf_counter()
    try:
        result = store.get_training_set(args.spine, args.features, timestamp=args.timestamp)
    except TrainingSetError as exc:
        print(f"keel training-set: {exc}", file=sys.stderr)
        return 2
    except ComputeError as exc:
        print(f"keel training-set: {exc}", file=sys.stderr)
        return 1
    write_table(result.table, args.out)
    print(
        f"{result.table.num_rows:,} rows x {len(result.features)} features -> {args.out} ({time.perf_counter() - t0:.1f}s)"
    )
    for name, share in result.coverage().items():
        print(f"  {name:<28} {share:>6.1%} non-null")
    print("read: " + ", ".join(f"{t}@{s}" for t, s in result.snapshots.items()))
    print(f"shards: {result.shards.summary()}")
    return 0


def write_table(table, path: Path) -> None:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        pacsv.write_csv(table, path)
    elif path.suffix.lower() in (".parquet", ".pq"):
        pq.write_table(table, path)
    else:
        raise SystemExit(f"keel: --out {str(path)!r}: use a .parquet or .csv file name")


def cmd_features_list(args) -> int:
    from keel.lakehouse.tables import Lakehouse

    store = _store()
    lake: Lakehouse = store.lake
    print(f"{'group':<22}{'ver':>4}  {'entity':<10}{'reads':<28}{'features':>9}  {'online':<7}{'rows':>10}  owner")
    for group in store.project.feature_groups:
        reads = group.source.table_name if group.source else ", ".join(u.name for u in group.upstream)
        rows = sum(lake.partition_rows(group.table_name).values()) if lake.exists(group.table_name) else 0
        print(
            f"{group.name:<22}{group.version:>4}  {group.entity.name:<10}{reads:<28}{len(group.features):>9}  "
            f"{'yes' if group.online else 'no':<7}{rows:>10,}  {group.owner}"
        )
    return 0


def cmd_features_show(args) -> int:
    from keel.features.registry import describe, registered

    store = _store()
    group = store.project.group(args.name)
    lake = store.lake
    print(f"{group.name} (version {group.version}, fingerprint {group.fingerprint()})")
    if group.description:
        print(f"  {group.description}")
    reads = (
        f"source {group.source.table_name}" if group.source else "upstream " + ", ".join(u.name for u in group.upstream)
    )
    print(
        f"  entity {group.entity.name} {group.entity.join_keys}; reads {reads}; ttl {group.ttl or 'none'}; "
        f"online {'yes' if group.online else 'no'}; owner {group.owner or '-'}"
    )
    print("  features:")
    for feat in group.features:
        print(f"    {feat.name:<26} {describe(feat)}")
    versions = registered(lake, group.name)
    if versions:
        print(
            "  registered versions: "
            + ", ".join(f"v{r['version']} ({r['fingerprint']}, {r['registered_at']:%Y-%m-%d})" for r in versions)
        )
    if not lake.exists(group.table_name):
        print(f"  table {group.table_name}: not computed yet (keel backfill {group.name} --start ... --end ...)")
        return 0
    snaps = lake.snapshots(group.table_name)
    head = snaps[-1]
    print(
        f"  table {group.table_name}: snapshot {head.snapshot_id} at {head.committed_at:%Y-%m-%d %H:%M:%S} UTC "
        f"(version {head.properties.get('keel.version', '-')}, run {head.properties.get('keel.run_id', '-')})"
    )
    rows = {d: n for d, n in lake.partition_rows(group.table_name).items() if isinstance(d, dt.date)}
    if rows:
        newest = max(rows)
        age = dt.datetime.now(dt.UTC).date() - newest
        print(
            f"  freshness: newest partition {newest} ({age.days} day(s) ago); {len(rows)} partitions, "
            f"{sum(rows.values()):,} rows"
        )
        for day in sorted(rows)[-7:]:
            print(f"    {day}  {rows[day]:>8,} entities")
    return 0


def cmd_features_lineage(args) -> int:
    from keel.features.registry import lineage

    store = _store()
    info = lineage(store.project, args.name)
    print(f"{info.group}")
    print(f"  sources:    {', '.join(info.sources) or '-'}")
    print(f"  upstream:   {', '.join(info.upstream) or '-'}")
    print(f"  downstream: {', '.join(info.downstream) or '-'}")
    print(f"  models:     {', '.join(info.models) or '- (none registered yet)'}")
    return 0
