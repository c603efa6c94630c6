"""The demo: the shop's data through the whole loop, run by Dagster as a person runs it.

The demo starts ``dagster dev`` (webserver, daemon, code server) on the instance under
$DAGSTER_HOME (KEEL_HOME/dagster by default) and drives it through the UI's GraphQL API: the
landing_files sensor ingests the generated files, a partition backfill computes the feature
groups, and the train, score, load and monitor jobs are launched as runs, so `make ui`
afterwards shows every run on the Overview timeline and its job's page, with the asset
graph, the checks and their metadata. The daemon's sensors close the loop: the alert sensor
reports the drift, the retrain sensor starts the retrain. Running the demo twice leaves the
tables' content as it was (ingests merge by event id), with new snapshots.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import os
import shutil
import sys
import time
from pathlib import Path

from keel.config import Settings
from keel.ingest.batch import QUARANTINE_TABLE
from keel.lakehouse.tables import Lakehouse

USERS = 1000
# The data drifts after the first third of the window: labels (30 days late) exist on both sides.
DRIFT_AFTER_PART = 3


def _dagster_instance(settings: Settings):
    import dagster as dg

    home = Path(os.environ.setdefault("DAGSTER_HOME", str(settings.dagster_home)))
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        shutil.copy(Path(__file__).resolve().parent.parent / "dagster.yaml", home / "dagster.yaml")
    return dg.DagsterInstance.get()


def write_corrections(folder: Path, good_row: dict) -> Path:
    """A late file of corrections with typical defects, to show quarantine at work."""
    base = {k: v.isoformat() if isinstance(v, dt.datetime) else v for k, v in good_row.items()}
    future = (dt.datetime.now(dt.UTC) + dt.timedelta(days=30)).isoformat()
    rows = [
        {**base, "event_id": "fix-0001", "amount": "12.50"},
        {**base, "event_id": "fix-0002", "user_id": ""},
        {**base, "event_id": "fix-0003", "amount": "twelve"},
        {**base, "event_id": "fix-0004", "event_ts": "31/02/2026 25:00"},
        {**base, "event_id": "fix-0005", "event_ts": future},
        {**base, "event_id": "fix-0001", "amount": "13.00"},
    ]
    path = folder / "transactions-corrections.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(base))
        writer.writeheader()
        writer.writerows(rows)
    return path


def run(settings: Settings | None = None, *, users: int = USERS) -> int:
    settings = settings or Settings.from_env()
    from assets.models import train_job_name
    from assets.online import ONLINE_SYNC_JOB
    from assets.predictions import predict_job_name
    from keel.devservers import free_port
    from keel.inference_log.records import TOPIC
    from keel.ingest.landing_folder import landing_files
    from pipelines import project
    from pipelines.dagster_service import DagsterService
    from pipelines.demo_live import DemoServer, LiveStream
    from pipelines.demo_monitoring import monitoring_loop
    from pipelines.demo_runs import DemoRuns
    from pipelines.generate import generate, write_files
    from pipelines.models import MODELS

    instance = _dagster_instance(settings)
    embedded = type(instance.run_storage).__name__.startswith("Sqlite")
    lake = Lakehouse.from_settings(settings)
    # MLflow narrates schema migrations and its serving-input self-check; the demo prints its own summary.
    # (MLflow sets its loggers' level from this variable when it is first imported, inside the run.)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")
    # Loading a model from an MLflow server draws a download bar per artifact over the demo's lines.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    steps = 7 + 5 * len(MODELS)
    # The shop's days run from the project's first partition to yesterday (UTC), so every partition
    # fills, online values are fresh, and a live stream carries on from them.
    start = project.start_date
    days = (dt.datetime.now(dt.UTC).date() - start).days
    span = (start, start + dt.timedelta(days=days - 1))
    step = iter(range(1, steps + 1))
    t0 = time.perf_counter()

    drift_after = days // DRIFT_AFTER_PART
    drift_day = start + dt.timedelta(days=drift_after)
    print(
        f"[{next(step)}/{steps}] generating {days} days of shop data for {users} users into {settings.landing} "
        f"(drifting from {drift_day})",
        flush=True,
    )
    tables = generate(days=days, users=users, start=start, drift_after=drift_after)
    write_files(tables, settings.landing)
    first = tables["transactions"].slice(0, 1).to_pylist()[0]
    write_corrections(settings.landing / "transactions", first)
    print("        " + ", ".join(f"{k}: {v.num_rows:,} rows" for k, v in tables.items()), flush=True)
    files = {source.name: landing_files(settings.landing, source) for source in project.sources}

    failed: list[str] = []
    print(f"[{next(step)}/{steps}] starting Dagster (dagster dev: webserver, daemon, code server) ...", flush=True)
    env = {**os.environ, **settings.as_env(), "DAGSTER_HOME": str(instance.root_directory)}
    with contextlib.ExitStack() as stack:
        dagster = stack.enter_context(DagsterService(Path(instance.root_directory), free_port(), env=env))
        runs = DemoRuns(dagster, instance)
        print(f"        up at {dagster.url}; its sensors and schedules are on (README: Automation)", flush=True)
        count = sum(len(f) for f in files.values())
        print(
            f"[{next(step)}/{steps}] the landing_files sensor ingests the {count} files, one run each, "
            "queued one run per table ...",
            flush=True,
        )
        t = time.perf_counter()
        landed = runs.wait_for_files([str(f) for fs in files.values() for f in fs])
        print(f"        {len(landed)} runs published in {time.perf_counter() - t:.0f}s", flush=True)
        for source in project.sources:
            print(f"        {ingest_summary(source, [landed[str(f)] for f in files[source.name]])}", flush=True)
        if not all(o.success for o in landed.values()):
            failed.append("ingest")

        groups = [["features", g.name] for g in project.feature_groups]
        print(
            f"[{next(step)}/{steps}] backfilling {len(groups)} feature groups over {days} days (a partition "
            "backfill, as the UI launches one) ...",
            end=" ",
            flush=True,
        )
        # With a broker, `keel stream` consumes live events meanwhile, publishing to the raw tables
        # the backfill reads. It starts once the history has landed: it warms its windows from them.
        live = stack.enter_context(LiveStream(settings, project)) if settings.kafka_bootstrap and not failed else None
        if live is not None:
            print("\n" + live.describe(), flush=True)
        t = time.perf_counter()
        backfill = dagster.backfill(groups, [(start + dt.timedelta(days=i)).isoformat() for i in range(days)])
        status, backfill_runs = dagster.wait_for_backfill(backfill)
        print(f"{status.lower()} in {time.perf_counter() - t:.1f}s ({len(backfill_runs)} runs)", flush=True)
        for group in project.feature_groups:
            rows = lake.partition_rows(group.table_name) if lake.exists(group.table_name) else {}
            print(f"        {group.name} v{group.version}: {sum(rows.values()):,} rows in {len(rows)} days", flush=True)
        if status not in ("COMPLETED", "COMPLETED_SUCCESS") or any(s != "SUCCESS" for s in backfill_runs.values()):
            failed.append("feature backfill")
        if live is not None:
            text, ok = live.finish(lake)
            print("\n".join(text), flush=True)
            if not ok:
                failed.append("live stream")

        print(f"[{next(step)}/{steps}] training set for the churn label", flush=True)
        if not failed:
            print(training_set_summary(settings, project))

        print(
            f"[{next(step)}/{steps}] syncing the online store and checking it against offline ...", end=" ", flush=True
        )
        if not failed:
            result = runs.job(ONLINE_SYNC_JOB)
            if result.success:
                print(online_summary(result, settings, project), flush=True)
            else:
                failed.append(ONLINE_SYNC_JOB)
        else:
            print("skipped: an earlier step failed", flush=True)

        for spec in MODELS:
            print(
                f"[{next(step)}/{steps}] training model {spec.name} ({spec.algorithm}) on the labels before "
                f"{drift_day} ...",
                end=" ",
                flush=True,
            )
            if failed:
                print("skipped: an earlier step failed", flush=True)
                continue
            cutoff = {"ops": {f"models__{spec.name}_challenger": {"config": {"label_cutoff": drift_day.isoformat()}}}}
            result = runs.job(train_job_name(spec), config=cutoff)
            if result.success:
                print(model_summary(result, settings, spec), flush=True)
            else:
                failed.append(train_job_name(spec))

            last = span[1]
            print(f"[{next(step)}/{steps}] scoring {last} with the champion of {spec.name} ...", end=" ", flush=True)
            if failed:
                print("skipped: an earlier step failed", flush=True)
            else:
                result = runs.job(predict_job_name(spec), partition=last)
                if result.success:
                    print(scoring_summary(lake, spec, last), flush=True)
                else:
                    failed.append(predict_job_name(spec))

            print(f"[{next(step)}/{steps}] reproducing the champion of {spec.name} from its lineage ...", flush=True)
            if failed:
                print("        skipped: an earlier step failed", flush=True)
            else:
                text, identical = reproduction_summary(settings, spec)
                print(text, flush=True)
                if not identical:
                    failed.append(f"reproduce {spec.name}")

            with DemoServer(settings, spec) as server:
                print(
                    f"[{next(step)}/{steps}] serving {spec.name}: keel serve --workers 2, a few predictions ...",
                    flush=True,
                )
                users = []
                if failed:
                    print("        skipped: an earlier step failed", flush=True)
                else:
                    text, ok, users = serving_summary(server, lake, spec, last)
                    print(text, flush=True)
                    if not ok:
                        failed.append(f"serve {spec.name}")

                print(
                    f"[{next(step)}/{steps}] monitoring {spec.name} across the drift: traffic, drift, alerts, "
                    "retrain, while the server answers ...",
                    flush=True,
                )
                if failed:
                    print("        skipped: an earlier step failed", flush=True)
                else:
                    server.keep_asking(users)
                    text, broken = monitoring_loop(runs, settings, lake, spec, span, drift_day)
                    print("\n".join(text), flush=True)
                    failed += broken
                    text, ok = server.traffic_summary()
                    print(text, flush=True)
                    if not ok:
                        failed.append(f"serve {spec.name} during monitoring")
            sink = "on the topic " + TOPIC if settings.kafka_bootstrap else f"under {settings.home / 'inference_log'}"
            print(f"        server stopped; its log is {server.log_path}, its inference log {sink}", flush=True)
        again = "`make ui` starts it again on the same instance" if embedded else "its instance goes with the servers"
        print(f"        stopping Dagster; {again}", flush=True)

    print(f"[{next(step)}/{steps}] summary", flush=True)
    print(summary(lake))
    if embedded:
        print(
            f"\ndone in {time.perf_counter() - t0:.0f}s. `make ui` opens Dagster at http://127.0.0.1:3000 with these "
            "runs; `make mlflow-ui` opens MLflow at http://127.0.0.1:5000."
        )
    else:
        print(f"\ndone in {time.perf_counter() - t0:.0f}s.")
    if failed:
        print(f"FAILED: {', '.join(failed)} (see the runs in `make ui`)", file=sys.stderr)
        return 1
    return 0


def ingest_summary(source, outcomes) -> str:
    """Rows read and quarantined over the source's files, and the audits' verdicts, from the check metadata."""
    read = quarantined = passed = total = 0
    for outcome in outcomes:
        for check in outcome.checks:
            meta = {k: v.value for k, v in check.metadata.items()}
            read += meta.get("rows_read", 0)
            quarantined += meta.get("rows_quarantined", 0)
            total += meta["expectations"]
            passed += meta["expectations"] - meta["failed_expectations"]
    return (
        f"{source.name:<14}{len(outcomes)} file(s), {read:,} rows read, {quarantined:,} quarantined, "
        f"audits {passed}/{total} expectations passed -> {source.table_name}"
    )


def training_set_summary(settings: Settings, project) -> str:
    """Every feature, point-in-time, for each churn label: the shape and how much of it is filled."""
    from keel.store import FeatureStore

    store = FeatureStore(Lakehouse.from_settings(settings), project)
    labels = store.lake.read("raw.churn_labels", columns=["user_id", "event_ts", "churned"])
    features = [f"{g.name}.{f.name}" for g in project.feature_groups for f in g.features]
    t = time.perf_counter()
    result = store.get_training_set(labels, features)
    lines = [
        f"        {result.table.num_rows:,} rows x {len(result.features)} features "
        f"({labels.num_rows:,} labels, {time.perf_counter() - t:.1f}s); coverage:"
    ]
    coverage = result.coverage()
    for name in result.features:
        lines.append(f"          {name:<26}{coverage[name]:>7.1%}")
    lines.append("        read " + ", ".join(f"{t}@{s}" for t, s in result.snapshots.items()))
    return "\n".join(lines)


def online_summary(result, settings: Settings, project) -> str:
    """Keys written per group, the consistency checks' verdicts, and one lookup as a table."""
    from keel.online.store import OnlineStore
    from keel.store import FeatureStore

    lines = []
    for group in [g for g in project.feature_groups if g.online]:
        meta = result.metadata(f"online/{group.name}")
        lines.append(
            f"        {group.name:<20}{meta['keys_written']:>6,} keys written ({meta['mode']}, "
            f"{meta['duration_s']:.2f}s) to {meta['store']}"
        )
    for check in sorted(result.checks, key=lambda c: c.asset_key.to_user_string()):
        lines.append(
            f"        consistency {check.asset_key.path[-1]:<20}{check.metadata['match_rate'].value:.2%} of "
            f"{check.metadata['values_compared'].value:,} values equal offline"
        )
    with OnlineStore.from_settings(settings) as online:
        store = FeatureStore(Lakehouse.from_settings(settings), project, online)
        users = sorted(online.sample(project.group("user_engagement"), 3, seed=1))
        features = [
            "user_transactions.txn_count_7d",
            "user_transactions.amount_sum_7d",
            "user_clicks.click_count_7d",
            "user_clicks.last_page",
            "user_engagement.conversion_7d",
        ]
        t = time.perf_counter()
        found = store.get_online_features(users, features)
        took = (time.perf_counter() - t) * 1000
    lines.append(f"        lookup of {len(features)} features for {len(users)} users in {took:.1f} ms:")
    names = [f.split(".")[1] for f in features]
    lines.append("          " + f"{'user_id':<10}" + "".join(f"{n:>16}" for n in names) + f"{'age':>9}")
    for i, user in enumerate(users):
        cells = "".join(f"{_cell(found.values[n][i], found.status[n][i]):>16}" for n in names)
        age = found.age_s[names[0]][i]
        lines.append(f"          {user:<10}{cells}{'' if age is None else f'{age / 3600:.1f}h':>9}")
    return "\n" + "\n".join(lines)


def model_summary(result, settings: Settings, spec) -> str:
    """The new version's hold-out metrics, the promotion decision and the lineage MLflow records."""
    from keel.models.registry import show

    trained = result.metadata(f"models/{spec.name}_challenger")
    decided = result.metadata(f"models/{spec.name}_champion")
    version = trained["version"]
    info = show(settings, spec.name, version)
    metrics = ", ".join(f"{k} {v:.3f}" for k, v in sorted(trained["metrics"].items()))
    lines = [
        f"        {spec.name} v{version}: {metrics} on {trained['holdout_rows']:,} hold-out rows "
        f"(trained on {trained['train_rows']:,}, split at {trained['split_time'][:10]})",
        f"        promoted to champion: {decided['promoted']} ({decided['reason']})",
        f"        lineage: {len(info['features'])} features, run {info['run_id'][:8]}, code {str(info['code_version'])[:12]}, "
        "read " + ", ".join(f"{t}@{s}" for t, s in info["snapshots"].items()),
        f"        MLflow shows the run and the registered versions at {settings.mlflow_ui_url}"
        + ("" if settings.mlflow_uri.startswith("http") else " (`make mlflow-ui`)"),
    ]
    return "\n" + "\n".join(lines)


def scoring_summary(lake: Lakehouse, spec, day: dt.date) -> str:
    """How many users the day's batch scored, their mean, and the riskiest few with lineage."""
    from keel.lakehouse.tables import day_filter
    from keel.models.batch_predict import predictions_table

    rows = lake.read(predictions_table(spec), row_filter=day_filter("feature_ts", [day]))
    scores = rows.column("prediction").to_numpy()
    top = rows.sort_by([("prediction", "descending")]).slice(0, 3).to_pylist()
    lines = [
        f"        {rows.num_rows:,} users scored into {predictions_table(spec)}, mean {scores.mean():.3f}; highest:",
        *(
            f"          {r['user_id']:<10} {r['prediction']:.3f}  (v{r['model_version']}, run {r['model_run_id'][:8]}, "
            f"{r['missing_features']} features missing)"
            for r in top
        ),
    ]
    return "\n".join(lines)


def reproduction_summary(settings: Settings, spec) -> tuple[str, bool]:
    """The champion's training set rebuilt from its recorded snapshots and compared by digest."""
    from keel.models.reproduce import reproduce
    from keel.store import FeatureStore

    t = time.perf_counter()
    out = reproduce(FeatureStore.from_settings(settings), settings, spec, "champion")
    metric = out.metrics.get(spec.metric, (None, float("nan")))
    recorded = "n/a" if metric[0] is None else f"{metric[0]:.4f}"
    return (
        f"        {spec.name} v{out.version}: training set {'identical' if out.identical else 'DIFFERENT'} "
        f"({out.rows:,} rows, digest {out.digest[:12]}), {spec.metric} {metric[1]:.4f} (recorded {recorded}) "
        f"in {time.perf_counter() - t:.1f}s",
        out.identical,
    )


def serving_summary(server, lake: Lakehouse, spec, day: dt.date) -> tuple[str, bool, list[str]]:
    """Start ``keel serve`` (a ``DemoServer``), ask for three users' churn risk and print the
    answers and their latency; returns the text, whether all went well, and the users asked."""
    from keel.lakehouse.tables import day_filter
    from keel.models.batch_predict import predictions_table

    t = time.perf_counter()
    ready = server.start()
    if ready is None:
        return f"        the server did not become ready; see {server.log_path}", False, []
    lines = [f"        ready in {time.perf_counter() - t:.1f}s at {server.url}, serving {ready['models']}"]
    scored = lake.read(predictions_table(spec), row_filter=day_filter("feature_ts", [day]))
    users = scored.sort_by([("prediction", "descending")]).column("user_id").to_pylist()[:2] + ["u00001"]
    for user in users:
        t0 = time.perf_counter()
        out = server.predict(user)
        lines.append(
            f"        POST /v1/models/{spec.name}/predict {user}: {out['predictions'][0]:.3f} "
            f"(v{out['version']} {out['alias']}, {len(out['missing_features'])} features missing, "
            f"server {out['latency_ms']:.2f} ms, round trip {1000 * (time.perf_counter() - t0):.1f} ms)"
        )
    counted = server.answered()
    lines.append(f"        /metrics counts {counted:.0f} answered requests over the server's 2 workers")
    # Admin endpoints are closed to a caller without a key (off entirely until KEEL_SERVE_API_KEYS is set).
    status, error = server.admin_without_a_key()
    lines.append(f"        GET /admin/models without an API key: {status} ({error or 'ANSWERED'})")
    return "\n".join(lines), counted == len(users) and status in (401, 403), users


def _cell(value, status: str) -> str:
    if status != "present":
        return status
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def summary(lake: Lakehouse) -> str:
    lines = [f"{'table':<24}{'rows':>10}{'partitions':>12}{'snapshots':>11}  main snapshot"]
    for name in lake.tables():
        rows = lake.partition_rows(name)
        lines.append(
            f"{name:<24}{sum(rows.values()):>10,}{len(rows):>12}{len(lake.snapshots(name)):>11}  {lake.head(name)}"
        )
    if lake.exists(QUARANTINE_TABLE):
        bad = lake.read(QUARANTINE_TABLE, columns=["source", "reason_code"])
        if bad.num_rows:
            lines.append("\nquarantined rows by source and reason:")
            counts = bad.group_by(["source", "reason_code"]).aggregate([("reason_code", "count")])
            for row in counts.sort_by([("source", "ascending"), ("reason_code", "ascending")]).to_pylist():
                lines.append(f"  {row['source']:<14}{row['reason_code']:<22}{row['reason_code_count']:>6}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run())
