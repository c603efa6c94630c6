"""``keel online sync|get`` and ``keel consistency``: the online store's commands."""

from __future__ import annotations

import json
import sys


def add_commands(sub) -> None:
    p = sub.add_parser("online", help="the online store: sync [GROUP], get GROUP ENTITY_ID")
    osub = p.add_subparsers(metavar="WHAT")
    q = osub.add_parser("sync", help="push the latest published values of online groups to the online store")
    q.add_argument("group", nargs="?", help="one online feature group (default: all)")
    q.add_argument("--full", action="store_true", help="sync every entity, not only those changed since the last sync")
    q.set_defaults(func=cmd_online_sync)
    q = osub.add_parser("get", help="an entity's online values of a group, with their age and status")
    q.add_argument("group")
    q.add_argument("entity_id", nargs="+", help="entity key value(s)")
    q.add_argument("--features", help="comma-separated feature names (default: all of the group's)")
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q.set_defaults(func=cmd_online_get)

    p = sub.add_parser("consistency", help="compare sampled online values with offline point-in-time values")
    p.add_argument("--sample", type=int, default=100, help="entities per online group (default 100)")
    p.add_argument("--group", action="append", help="only this group (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_consistency)


def _store():
    from keel.store import FeatureStore

    return FeatureStore.from_env()


def _online_groups(store, names):
    from keel.online.store import OnlineStoreError

    if not names:
        return [g for g in store.project.feature_groups if g.online]
    groups = [store.project.group(n) for n in names]
    for g in groups:
        if not g.online:
            raise OnlineStoreError(f"feature group {g.name!r} is not online; declare it with online=True")
    return groups


def cmd_online_sync(args) -> int:
    from keel.online.store import OnlineStoreError
    from keel.online.sync import sync_group

    store = _store()
    try:
        groups = _online_groups(store, [args.group] if args.group else [])
        for group in groups:
            r = sync_group(store.lake, store.online, group, full=args.full)
            print(
                f"{group.name}: {r.mode}, snapshot {r.snapshot_id}, {r.entities_changed:,} entities changed, "
                f"{r.keys_written:,} keys written in {r.duration_s:.2f}s -> {r.store}"
            )
    except OnlineStoreError as exc:
        print(f"keel: {exc}", file=sys.stderr)
        return 1
    finally:
        store.online.close()
    return 0


def cmd_online_get(args) -> int:
    from keel.online.store import OnlineStoreError

    store = _store()
    try:
        group = store.project.group(args.group)
        names = [f.strip() for f in args.features.split(",")] if args.features else [f.name for f in group.features]
        found = store.get_online_features(args.entity_id, [f"{group.name}.{n}" for n in names])
    except OnlineStoreError as exc:
        print(f"keel: {exc}", file=sys.stderr)
        return 1
    finally:
        store.online.close()
    if args.json:
        print(json.dumps(found.rows(), default=str, indent=2))
        return 0
    for row in found.rows():
        keys = ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("features", "age_s", "status"))
        print(f"{group.name} {keys}")
        for name in names:
            age = row["age_s"][name]
            age_text = "" if age is None else f"  (age {age:,.0f}s)"
            print(f"  {name:<28}{row['status'][name]:<9}{row['features'][name]!s:<24}{age_text}")
    return 0


def cmd_consistency(args) -> int:
    from keel.online.consistency import check_consistency
    from keel.online.store import OnlineStoreError

    if args.sample < 1:
        print(f"keel: --sample {args.sample} must be at least 1", file=sys.stderr)
        return 2
    store = _store()
    try:
        report = check_consistency(
            store, store.online, _online_groups(store, args.group or []), sample=args.sample, seed=args.seed
        )
    except OnlineStoreError as exc:
        print(f"keel: {exc}", file=sys.stderr)
        return 1
    finally:
        store.online.close()
    print(report.summary())
    for m in report.mismatches:
        print(
            f"  mismatch {m['group']}.{m['feature']} entity {m['entity']} at {m['feature_ts']}: "
            f"online {m['online']!r} != offline {m['offline']!r}"
        )
    return 0 if report.matched == report.compared else 1
