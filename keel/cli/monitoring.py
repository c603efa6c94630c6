"""``keel drift report`` and ``keel monitoring replay|run|metrics``: model monitoring from the command line."""

from __future__ import annotations

import datetime as dt
import sys
import time
import uuid
from pathlib import Path


def add_commands(sub) -> None:
    p = sub.add_parser("drift", help="drift of a model's traffic: `keel drift report MODEL [--out FILE]`")
    dsub = p.add_subparsers(metavar="WHAT")
    q = dsub.add_parser("report", help="write the HTML drift report of a model's latest (or a given) window")
    q.add_argument("model")
    q.add_argument("--out", type=Path, default=None, help="file to write (default: KEEL_HOME/reports/drift/...)")
    q.add_argument("--window", type=_moment, default=None, help="window start, YYYY-MM-DD or YYYY-MM-DDTHH:MM (UTC)")
    q.add_argument("--version", type=int, default=None, help="a version served in the window (default: the newest)")
    q.add_argument("--days", type=int, default=60, help="days of history in the over-time plots (default 60)")
    q.set_defaults(func=cmd_drift_report)

    p = sub.add_parser("monitoring", help="model monitoring: replay traffic, run drift/performance, export metrics")
    msub = p.add_subparsers(metavar="WHAT")
    q = msub.add_parser("replay", help="score past days' active entities as serving would have, into the inference log")
    q.add_argument("model")
    q.add_argument("--start", required=True, type=_date)
    q.add_argument("--end", type=_date, default=None, help="last day (default: the first)")
    q.add_argument("--per-day", type=int, default=200, help="answers per day (default 200)")
    q.add_argument("--alias", default="champion", help="the version to score with (default champion)")
    q.set_defaults(func=cmd_replay)
    q = msub.add_parser("run", help="drift and performance of MODEL over days, into monitoring.drift/performance")
    q.add_argument("model")
    q.add_argument("--start", required=True, type=_date)
    q.add_argument("--end", type=_date, default=None, help="last day (default: the first)")
    q.set_defaults(func=cmd_run)
    q = msub.add_parser("metrics", help="serve the latest monitoring results as Prometheus metrics")
    q.add_argument("--host", default="127.0.0.1")
    q.add_argument("--port", type=int, default=9465)
    q.add_argument("--refresh-s", type=float, default=60.0, help="re-read the tables at most this often")
    q.add_argument("--once", action="store_true", help="print the metrics once and exit")
    q.set_defaults(func=cmd_metrics)


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise SystemExit(f"keel: {text!r} is not a date (use YYYY-MM-DD)") from None


def _moment(text: str) -> dt.datetime:
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise SystemExit(f"keel: {text!r} is not a time (use YYYY-MM-DD or YYYY-MM-DDTHH:MM, UTC)") from None
    return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment.astimezone(dt.UTC)


def _context(model: str):
    from keel.config import Settings
    from keel.lakehouse.tables import Lakehouse
    from keel.models.spec import load_models, model_named
    from keel.monitoring.declarations import load_monitors

    settings = Settings.from_env()
    models = load_models(settings.project)
    spec = model_named(models, model)
    monitor = next(m for m in load_monitors(settings.project, models) if m.name == spec.name)
    return settings, Lakehouse.from_settings(settings), monitor


def _fail(exc: Exception) -> int:
    print(f"keel: {exc}", file=sys.stderr)
    return 1


def cmd_drift_report(args) -> int:
    from keel.models.spec import ModelError
    from keel.monitoring import report as drift_report
    from keel.monitoring.run import drift_history

    try:
        settings, lake, monitor = _context(args.model)
        until = (args.window + dt.timedelta(days=1)) if args.window else None
        history = drift_history(lake, monitor.name, days=args.days, until=until)
        path = args.out or drift_report.report_path(settings.home, monitor.name, args.window or _latest(history))
        drift_report.write(history, path, model=monitor.name, window_start=args.window, version=args.version)
    except (ModelError, ValueError) as exc:
        return _fail(exc)
    print(path)
    return 0


def _latest(history):
    if history.num_rows == 0:
        return dt.datetime.now(dt.UTC)
    import pyarrow.compute as pc

    return pc.max(history.column("window_start")).as_py()


def cmd_replay(args) -> int:
    from keel.features.materialize import days_between
    from keel.models.registry_client import ModelRegistryError
    from keel.models.spec import ModelError
    from keel.monitoring import replay
    from keel.store import FeatureStore

    try:
        settings, lake, monitor = _context(args.model)
        from keel.project import load_project

        store = FeatureStore(lake, load_project(settings.project))
        result = replay.replay(
            store,
            settings,
            monitor.model,
            days_between(args.start, args.end or args.start),
            per_day=args.per_day,
            alias=args.alias,
        )
    except (ModelError, ModelRegistryError, ValueError) as exc:
        return _fail(exc)
    print(replay.summary(result))
    print("load it with the load_inference_log job (or its backfill) to monitor it")
    return 0


def cmd_run(args) -> int:
    from keel.models.reference import ReferenceSampleError
    from keel.models.spec import ModelError
    from keel.monitoring.drift import DriftError
    from keel.monitoring.run import run_drift, run_performance

    start = dt.datetime.combine(args.start, dt.time(), dt.UTC)
    end = dt.datetime.combine(args.end or args.start, dt.time(), dt.UTC) + dt.timedelta(days=1)
    run_id = f"cli-{uuid.uuid4().hex[:12]}"
    t0 = time.perf_counter()
    try:
        settings, lake, monitor = _context(args.model)
        drifted = run_drift(lake, settings, monitor, start, end, run_id)
        performed = run_performance(lake, settings, monitor, start, end, run_id)
    except (ModelError, DriftError, ReferenceSampleError, ValueError) as exc:
        return _fail(exc)
    print(f"{'window':<18}{'version':>8}{'answers':>9}{'drifted':>9}  level  {monitor.model.metric}")
    perf = {(r.start, r.version): r for r in performed.reports}
    for r in drifted.reports:
        p = perf.get((r.start, r.version))
        metric = f"{p.live.get(monitor.model.metric, float('nan')):.4f} ({p.labelled} labelled)" if p and p.live else ""
        print(f"{r.start:%Y-%m-%d %H:%M}  {r.version:>8}{r.rows:>9}{r.drift_share:>9.0%}  {r.level:<6} {metric}")
    print(f"done in {time.perf_counter() - t0:.1f}s (run {run_id})")
    return 0


def cmd_metrics(args) -> int:
    from prometheus_client import start_http_server
    from prometheus_client.core import REGISTRY

    from keel.config import Settings
    from keel.lakehouse.tables import Lakehouse
    from keel.models.spec import load_models
    from keel.monitoring.data_quality import project_targets
    from keel.monitoring.prometheus import MonitoringCollector, exposition
    from keel.project import load_project

    settings = Settings.from_env()
    project = load_project(settings.project)
    tables = project_targets(project)
    collector = MonitoringCollector(
        Lakehouse.from_settings(settings),
        settings,
        list(load_models(settings.project)),
        tables,
        refresh_s=args.refresh_s,
    )
    if args.once:
        print(exposition(collector), end="")
        return 0
    REGISTRY.register(collector)
    start_http_server(args.port, addr=args.host)
    print(f"monitoring metrics on http://{args.host}:{args.port}/metrics (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
