"""``keel models list|show|promote|sync|reproduce|score``: the model registry (MLflow) from the command line."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
import uuid


def add_commands(sub) -> None:
    p = sub.add_parser(
        "models", help="the model registry: list NAME, show NAME VERSION, promote NAME VERSION, sync [NAME]"
    )
    msub = p.add_subparsers(metavar="WHAT")
    q = msub.add_parser("list", help="a model's versions with aliases, stage, status, metric and lineage")
    q.add_argument("name")
    q.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    q.set_defaults(func=cmd_models_list)
    q = msub.add_parser("show", help="one version's lineage: features, snapshots, code version, run, metrics")
    q.add_argument("name")
    q.add_argument("version", help="a version number or an alias (champion, challenger)")
    q.set_defaults(func=cmd_models_show)
    q = msub.add_parser("promote", help="make VERSION the champion (the previous one stays findable by tag)")
    q.add_argument("name")
    q.add_argument("version", help="a version number or an alias")
    q.add_argument(
        "--ignore-gates", action="store_true", help="promote a version whose promotion gates failed (say why elsewhere)"
    )
    q.set_defaults(func=cmd_models_promote)
    q = msub.add_parser(
        "sync",
        help="settle roles changed in the MLflow UI (an alias moved, a stage transitioned): aliases, stages "
        "and tags made to agree (the model_registry sensor does it every 30 s)",
    )
    q.add_argument("name", nargs="?", help="one model (default: every model KEEL_PROJECT declares)")
    q.set_defaults(func=cmd_models_sync)
    q = msub.add_parser(
        "reproduce",
        help="rebuild VERSION's training set from its recorded snapshots, retrain, and compare (exit 1 if it differs)",
    )
    q.add_argument("name")
    q.add_argument("version", help="a version number or an alias")
    q.add_argument("--json", action="store_true", help="print the comparison as JSON")
    q.set_defaults(func=cmd_models_reproduce)
    q = msub.add_parser(
        "score",
        help="score each day's active entities with the champion into predictions.NAME (write-audit-publish)",
    )
    q.add_argument("name")
    q.add_argument("--start", required=True, type=_date, help="first day, YYYY-MM-DD")
    q.add_argument("--end", type=_date, help="last day, YYYY-MM-DD (default: the first)")
    q.set_defaults(func=cmd_models_score)


def _settings():
    from keel.config import Settings

    return Settings.from_env()


def _fail(exc: Exception) -> int:
    print(f"keel: {exc}", file=sys.stderr)
    return 1


def cmd_models_list(args) -> int:
    from keel.models.registry import list_versions
    from keel.models.registry_client import ModelRegistryError, mlflow_client
    from keel.models.roles import read_roles

    settings = _settings()
    try:
        versions = list_versions(settings, args.name)
        roles = read_roles(mlflow_client(settings), args.name)
    except ModelRegistryError as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps([v.as_row() for v in versions], indent=2, default=str))
        return 0
    header = ("version", "aliases", "stage", "status", "metric", "created", "code")
    rows = [
        (
            str(v.version),
            ",".join(v.aliases) or "-",
            v.stage,
            v.status,
            _metric(v),
            v.created.isoformat(timespec="seconds")[:19],
            v.code_version[:12] or "-",
        )
        for v in versions
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    print(_line(header, widths))
    for v, row in zip(versions, rows, strict=True):
        print(_line(row, widths))
        print(
            f"{'':>{widths[0] + 2}}{len(v.features)} features; read "
            + ", ".join(f"{t}@{s}" for t, s in v.snapshots.items())
        )
    print(f"\n{roles.summary()}" + (f" (since {roles.at}, {roles.how})" if roles.at else ""))
    if not roles.in_step:
        print("not yet settled in MLflow (already served):")
        for change in roles.changes or ("aliases, stages or tags disagree with the roles",):
            print(f"  {change}")
        print(f"`keel models sync {args.name}` writes them now; the model_registry sensor does within 30 s")
    return 0


def _metric(v) -> str:
    metric = v.tags.get("metric", "")
    value = v.metrics.get(metric)
    return f"{metric} {value:.4f}" if value is not None else "-"


def _line(cells, widths) -> str:
    """Cells padded to their column's width; the version right-aligned, the rest left."""
    first, *rest = cells
    return "  ".join([f"{first:>{widths[0]}}", *(f"{c:<{w}}" for c, w in zip(rest, widths[1:], strict=True))]).rstrip()


def cmd_models_show(args) -> int:
    from keel.models.registry import show
    from keel.models.registry_client import ModelRegistryError

    try:
        info = show(_settings(), args.name, _version(args.version))
    except ModelRegistryError as exc:
        return _fail(exc)
    print(json.dumps(info, indent=2, default=str))
    return 0


def cmd_models_promote(args) -> int:
    from keel.models.promotion import promote
    from keel.models.registry_client import ModelRegistryError

    try:
        info = promote(_settings(), args.name, _version(args.version), ignore_gates=args.ignore_gates)
    except ModelRegistryError as exc:
        return _fail(exc)
    print(f"{info.name} v{info.version} is now {', '.join(info.aliases)} (stage {info.stage})")
    return 0


def cmd_models_sync(args) -> int:
    from keel.models.registry_client import ModelRegistryError, mlflow_client
    from keel.models.roles import settle
    from keel.models.spec import ModelError, load_models

    settings = _settings()
    try:
        names = [args.name] if args.name else sorted(load_models(settings.project))
    except ModelError as exc:
        return _fail(exc)
    client = mlflow_client(settings)
    failed = 0
    for name in names:
        try:
            roles = settle(client, name)
        except ModelRegistryError as exc:
            if args.name:
                return _fail(exc)
            print(f"{name}: not registered yet")
            continue
        except Exception as exc:  # noqa: BLE001 - one model's failure does not stop the others
            print(f"keel: {name}: {exc}", file=sys.stderr)
            failed += 1
            continue
        if roles.in_progress:
            print(f"{roles.summary()}: another Keel process is writing a change; nothing done")
        elif roles.in_step:
            print(f"{roles.summary()}: in step")
        else:
            print(
                f"{roles.summary()}: wrote {len(roles.aliases)} alias move(s), {len(roles.transitions)} stage "
                f"transition(s), {len(roles.tags)} tag change(s)"
            )
            for change in roles.changes:
                print(f"  {change}")
    return 1 if failed else 0


def cmd_models_reproduce(args) -> int:
    from keel.lakehouse.tables import LakehouseError
    from keel.models.registry_client import ModelRegistryError
    from keel.models.reproduce import reproduce
    from keel.models.spec import ModelError, load_models, model_named
    from keel.store import FeatureStore

    settings = _settings()
    try:
        spec = model_named(load_models(settings.project), args.name)
        store = FeatureStore.from_settings(settings)
        out = reproduce(store, settings, spec, _version(args.version))
    except (ModelRegistryError, ModelError, LakehouseError) as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps(out.as_dict(), indent=2, default=str))
        return 0 if out.identical else 1
    verdict = "identical" if out.identical else "DIFFERENT"
    print(f"{out.name} v{out.version}: training set {verdict} ({out.rows} rows; recorded {out.recorded_rows})")
    print(f"  digest     {out.digest}\n  recorded   {out.recorded_digest}")
    print(f"  labels to  {out.label_cutoff}")
    print("  snapshots  " + ", ".join(f"{t}@{s}" for t, s in sorted(out.snapshots.items())))
    for metric, (recorded, now) in sorted(out.metrics.items()):
        was = "n/a" if recorded is None else f"{recorded:.6g}"
        print(f"  {metric:<18} recorded {was:<12} retrained {now:.6g}")
    for change in out.changed:
        print(f"  definition changed since: {change}")
    return 0 if out.identical else 1


def cmd_models_score(args) -> int:
    from keel.features.materialize import MaterializeError, days_between
    from keel.lakehouse.tables import LakehouseError
    from keel.models.batch_predict import BatchPredictError, score_days
    from keel.models.registry_client import ModelRegistryError
    from keel.models.spec import ModelError, load_models, model_named
    from keel.store import FeatureStore

    settings = _settings()
    t0 = time.perf_counter()
    try:
        spec = model_named(load_models(settings.project), args.name)
        days = days_between(args.start, args.end or args.start)
        run_id = f"cli-score-{uuid.uuid4().hex[:8]}"
        scored, report, snapshot = score_days(FeatureStore.from_settings(settings), settings, spec, days, run_id)
    except (BatchPredictError, ModelRegistryError, ModelError, MaterializeError, LakehouseError) as exc:
        print(f"keel models score: {exc}; nothing was published", file=sys.stderr)
        return 1
    counts = list(scored.entities_per_day.values())
    print(
        f"{spec.name} v{scored.version.version}: scored {sum(counts):,} rows over {len(days)} day(s) "
        f"({min(counts)}..{max(counts)} entities a day)"
    )
    print(f"  audit: {report.summary()}")
    if snapshot is None:
        print(f"  NOT published: audit failed; branch {scored.staged.branch} kept for inspection", file=sys.stderr)
        return 1
    print(f"  published {scored.staged.table} snapshot {snapshot} in {time.perf_counter() - t0:.1f}s")
    return 0


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (use YYYY-MM-DD)") from None


def _version(text: str) -> int | str:
    return int(text) if text.isdigit() else text
