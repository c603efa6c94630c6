"""`make demo` end to end at its own size: Dagster (webserver, daemon) on a persistent instance, data in Iceberg."""

import csv
import json
import re

import dagster as dg

from keel.cli.main import main
from keel.ingest.batch import QUARANTINE_TABLE
from keel.ingest.landing_folder import landing_files
from pipelines import HISTORY_DAYS, demo, project
from pipelines.demo_monitoring import BEFORE_DRIFT_DAYS
from pipelines.models import churn

# The demo's own size (three months, 1,000 users): the drift comes after the first month, churn
# labels (30 days late) exist on both sides of it, and the verdicts asserted are the ones `make demo` shows.
USERS = demo.USERS
DRIFT_AFTER = HISTORY_DAYS // demo.DRIFT_AFTER_PART


def test_demo_ingests_every_source_through_dagster_and_quarantines_the_defects(settings, lake, capsys):
    assert demo.run(settings, users=USERS) == 0

    out = capsys.readouterr().out
    assert "] summary" in out and "training set for the churn label" in out
    for table in ("raw.signups", "raw.clicks", "raw.transactions", "raw.churn_labels"):
        assert lake.partition_rows(table), f"{table} is empty"
    # The corrections file's defects (every row but its first), each quarantined with its reason;
    # its good row landed.
    with (settings.landing / "transactions" / "transactions-corrections.csv").open(newline="") as fh:
        corrections = list(csv.DictReader(fh))
    reasons = sorted(lake.read(QUARANTINE_TABLE).column("reason_code").to_pylist())
    assert len(reasons) == len(corrections) - 1
    assert reasons == ["bad_timestamp", "duplicate_event_id", "future_timestamp", "missing_key", "wrong_type"]
    assert (
        corrections[0]["event_id"] in lake.read("raw.transactions", columns=["event_id"]).column("event_id").to_pylist()
    )

    # The runs live in the instance under DAGSTER_HOME, where `make ui` finds them.
    instance = dg.DagsterInstance.get()
    runs = instance.get_runs()
    jobs = [run.job_name for run in runs]
    # The landing sensor ran one ingest per file, queued one run per table; a partition backfill
    # ran the feature groups; the demo launched the rest; the retrain sensor started the retrain.
    landed = [path for source in project.sources for path in landing_files(settings.landing, source)]
    ingests = [run for run in runs if run.job_name.startswith("ingest_")]
    assert len(ingests) == len(landed) and {run.tags.get("dagster/sensor_name") for run in ingests} == {"landing_files"}
    assert sum(1 for run in runs if run.tags.get("dagster/backfill")) >= 1
    for job in ("online_sync", "train_churn", "predict_churn", "load_inference_log", "data_quality", "monitor_churn"):
        assert job in jobs, job
    # Every run was launched from the code location, so the UI lists it on the timeline and its job's page.
    assert all(run.remote_job_origin is not None for run in runs)
    # Automation may add runs of its own (online syncs, monitoring of the latest day); none fails.
    assert all(run.is_success for run in runs), [(r.job_name, r.status) for r in runs if not r.is_success]
    # Every day of the demo is filled in Dagster, for the raw and the feature tables alike.
    days = (
        dg.DailyPartitionsDefinition(start_date=project.start_date.isoformat(), timezone="UTC")
    ).get_partition_keys()
    assert len(days) == HISTORY_DAYS
    for key in (["raw", "clicks"], ["features", "user_profile"]):
        assert instance.get_materialized_partitions(dg.AssetKey(key)) == set(days), key
    for group in ("user_transactions", "user_clicks", "user_profile", "user_engagement"):
        assert lake.partition_rows(f"features.{group}"), f"features.{group} is empty"
    labels = lake.read("raw.churn_labels").num_rows
    assert f"{labels:,} rows x " in out
    assert (settings.dagster_home / "dagster.yaml").exists()

    # The online store holds each user's latest values, all equal to offline, and a lookup is shown.
    for group in ("user_transactions", "user_clicks", "user_engagement"):
        assert f"consistency {group:<20}100.00% of" in out
    assert re.search(r"lookup of \d+ features for \d+ users in [\d.]+ ms", out), out
    assert (settings.home / "online.db").exists()

    # The churn model is trained, registered in MLflow and, being the first, promoted to champion.
    lineage = f"lineage: {len(churn.feature_refs(project))} features"
    assert "churn v1: " in out and "promoted to champion: yes" in out and lineage in out

    # Yesterday's active users are scored by the champion into predictions.churn, with lineage.
    scored = lake.read("predictions.churn")
    assert scored.num_rows > 0 and set(scored.column("model_version").to_pylist()) == {1}
    assert f"{scored.num_rows:,} users scored into predictions.churn" in out
    # The champion's training set rebuilds identically from its recorded snapshots.
    assert "churn v1: training set identical" in out
    # keel serve answered from the online store and stopped gracefully.
    served = [line for line in out.splitlines() if "POST /v1/models/churn/predict" in line]
    assert served and all("(v1 champion" in line for line in served), served
    assert "stopped; its log is" in out
    counted = re.search(r"/metrics counts (\d+) answered requests over the server's \d+ workers", out)
    assert counted and int(counted.group(1)) == len(served), out

    # The loop: traffic across the drift, monitoring, the drift check failing, an alert, a retrain.
    # The replay runs from BEFORE_DRIFT_DAYS before the drift to the last day, one window a day.
    # No window before the drift is flagged; from it on nearly all are (the 30-day windows take a
    # few days to fill with drifted events).
    found = re.search(r"dataset drift: (\d+) of (\d+) windows before the drift, (\d+) of (\d+) from it on", out)
    before, quiet, after, drifted = map(int, found.groups())
    assert (quiet, drifted) == (min(BEFORE_DRIFT_DAYS, DRIFT_AFTER), HISTORY_DAYS - DRIFT_AFTER)
    assert before == 0 and after / drifted > 0.9
    assert "check drift            FAILED (ERROR): dataset drift:" in out
    assert "ERROR [ERROR] monitoring/churn_drift:drift is failing" in out
    assert "retrain sensor fired on monitoring/churn_drift:drift" in out and "new challenger v2" in out
    assert "promoted to champion: " in out.split("new challenger v2")[1]
    triggers = [run.tags.get("keel/trigger") for run in runs if run.job_name == "train_churn"]
    assert sorted(triggers, key=str) == [None, "monitoring/churn_drift:drift"]
    drift = lake.read("monitoring.drift")
    assert drift.num_rows > 0 and lake.read("monitoring.performance").num_rows > 0
    reports = list((settings.home / "reports" / "drift" / "churn").glob("*.html"))
    assert reports and "<svg" in reports[0].read_text()
    alerts = [json.loads(line) for line in settings.alert_file.read_text().splitlines()]
    assert any(a["condition"] == "monitoring/churn_drift:drift" and a["status"] == "firing" for a in alerts)

    # The same through the CLI, on the demo's KEEL_HOME.
    code, text, _ = run_cli(capsys, "drift", "report", "churn", "--out", str(settings.home / "report.html"))
    assert code == 0 and (settings.home / "report.html").read_text().count("<section") > 20
    code, text, _ = run_cli(capsys, "monitoring", "metrics", "--once")
    assert code == 0 and 'keel_dataset_drift{model="churn"} 1.0' in text and "keel_model_age_seconds" in text
    code, text, _ = run_cli(capsys, "models", "reproduce", "churn", "champion")
    assert code == 0 and "training set identical" in text
    day = scored.column("feature_ts")[0].as_py().date().isoformat()
    code, text, _ = run_cli(capsys, "models", "score", "churn", "--start", day)
    assert code == 0 and "published predictions.churn snapshot" in text
    assert lake.read("predictions.churn").num_rows == scored.num_rows
    code, _, err = run_cli(capsys, "models", "score", "churn", "--start", "2001-01-01")
    assert code == 1 and "no feature rows on 2001-01-01" in err and "nothing was published" in err

    # Landing the same files again changes no event or feature table: ingests merge by event id
    # (the demo run again lands its regenerated files the same way, through the sensor). The
    # transactions (their corrections file too) and a fortnight of their feature group stand for
    # all: every source ingests through the same code, and the clicks' 250k rows cost a minute.
    before = {t: sum(lake.partition_rows(t).values()) for t in lake.tables() if t.startswith(("raw.", "features."))}
    files = sorted(str(p) for p in (settings.landing / "transactions").iterdir())
    code, text, _ = run_cli(capsys, "ingest", *files, "--source", "transactions")
    assert code == 0, text
    code, text, _ = run_cli(capsys, "backfill", "user_transactions", "--start", days[-14], "--end", days[-1])
    assert code == 0, text
    assert {t: sum(lake.partition_rows(t).values()) for t in before} == before


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err
