"""The alert sensor against a real Dagster instance: check evaluations in, deduplicated alerts out."""

import io
import json

import dagster as dg

from keel.alerts.sinks import sinks_from_settings
from keel.config import Settings
from sensors.alerts import alert_sensor, alert_sensor_definitions
from tests.factories.alerts import SECRET, FakeWebhook, closed_port
from tests.factories.timing import Waits

DRIFT_ASSET = dg.AssetKey(["monitoring", "churn_drift"])
DRIFT = dg.AssetCheckKey(DRIFT_ASSET, "drift")
LABEL = dg.AssetCheckKey(DRIFT_ASSET, "label_drift")
DAGSTER = "http://dagster.test:3000"
DAYS = dg.DailyPartitionsDefinition(start_date="2026-03-01")


class Harness:
    """The sensor with its settings under tmp_path, a console stream and recorded webhook waits."""

    def __init__(self, tmp_path, webhook_url: str | None, checks=(DRIFT,)):
        self.alert_file = tmp_path / "alerts" / "alerts.jsonl"
        env = {
            "KEEL_HOME": str(tmp_path / "home"),
            "KEEL_CODE_VERSION": "test-sha",
            "KEEL_ALERT_FILE": str(self.alert_file),
            "KEEL_DAGSTER_URL": DAGSTER + "/",
        }
        if webhook_url:
            env["KEEL_ALERT_WEBHOOK"] = webhook_url
        self.console = io.StringIO()
        self.waits = Waits()
        self.sensor = alert_sensor(
            list(checks),
            settings_factory=lambda: Settings.from_env(env),
            sinks_factory=lambda s: sinks_from_settings(s, stream=self.console, sleep=self.waits.sleep),
        )
        self.cursor: str | None = None

    def tick(self, instance):
        data = self.sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=self.cursor))
        assert not data.run_requests
        self.cursor = data.cursor
        return data

    def lines(self) -> list[dict]:
        if not self.alert_file.exists():
            return []
        return [json.loads(line) for line in self.alert_file.read_text().splitlines()]

    def state(self) -> dict:
        return json.loads(self.cursor)


def monitoring_run(instance, *, passed: bool, severity=dg.AssetCheckSeverity.ERROR, description="", partition=None):
    """Materialize monitoring/churn_drift once with its ``drift`` check result; the run id."""

    @dg.asset(key=DRIFT_ASSET, check_specs=[dg.AssetCheckSpec("drift", asset=DRIFT_ASSET)], partitions_def=DAYS)
    def churn_drift():
        return dg.MaterializeResult(
            check_results=[
                dg.AssetCheckResult(
                    check_name="drift",
                    passed=passed,
                    severity=severity,
                    description=description,
                    metadata={"drift_share": 0.25, "drifted": 3, "report": dg.MetadataValue.md("| a | b |")},
                )
            ]
        )

    result = dg.materialize([churn_drift], instance=instance, partition_key=partition or "2026-03-01")
    assert result.success
    return result.run_id


def test_a_failure_fires_once_a_repeat_sends_nothing_and_a_pass_resolves(instance, tmp_path):
    with FakeWebhook() as webhook:
        sensor = Harness(tmp_path, webhook.url)
        assert sensor.tick(instance).skip_message == "no new evaluation of monitoring/churn_drift:drift"

        failed = monitoring_run(instance, passed=False, description="3 of 12 features drifted", partition="2026-03-04")
        fired = sensor.tick(instance)
        assert "alerts: firing monitoring/churn_drift:drift (ERROR)" in fired.skip_message
        assert "1 alert(s) delivered" in fired.skip_message
        (row,) = sensor.lines()
        assert (row["status"], row["condition"], row["severity"]) == ("firing", "monitoring/churn_drift:drift", "ERROR")
        assert row["run_url"] == f"{DAGSTER}/runs/{failed}" and row["run_id"] == failed
        assert row["partition"] == "2026-03-04"
        assert "3 of 12 features drifted" in row["text"] and "drift_share=0.25" in row["text"]
        assert row["metadata"] == {"drift_share": 0.25, "drifted": 3, "report": "| a | b |"}
        (post,) = webhook.posts
        assert post["json"]["text"].startswith("[ERROR] monitoring/churn_drift:drift is failing")
        assert f"<{DAGSTER}/runs/{failed}|" in post["json"]["blocks"][0]["text"]["text"]
        assert sensor.console.getvalue().count("\n") == 1 and "FIRING   ERROR" in sensor.console.getvalue()

        assert sensor.tick(instance).skip_message == "no new evaluation of monitoring/churn_drift:drift"
        monitoring_run(instance, passed=False, description="still drifting")
        repeat = sensor.tick(instance)
        assert repeat.skip_message == "1 new evaluation(s); no change of state"
        assert len(sensor.lines()) == 1 and len(webhook.posts) == 1
        assert sensor.state()["open"]["monitoring/churn_drift:drift"]["failures"] == 2

        passed = monitoring_run(instance, passed=True, description="no drift")
        resolved = sensor.tick(instance)
        assert "alerts: resolved monitoring/churn_drift:drift (ERROR)" in resolved.skip_message
        first, second = sensor.lines()
        assert second["status"] == "resolved" and second["run_url"] == f"{DAGSTER}/runs/{passed}"
        assert second["since"] == first["since"] and "passing again after" in second["text"]
        assert "2 failed evaluations" in second["text"]
        assert len(webhook.posts) == 2 and webhook.posts[1]["json"]["text"].startswith("[RESOLVED]")
        assert sensor.state()["open"] == {} and sensor.state()["pending"] == []


def test_severity_comes_from_the_evaluation_and_an_escalation_fires_again(instance, tmp_path):
    sensor = Harness(tmp_path, None)
    sensor.tick(instance)

    monitoring_run(instance, passed=False, severity=dg.AssetCheckSeverity.WARN)
    monitoring_run(instance, passed=False, severity=dg.AssetCheckSeverity.WARN)
    monitoring_run(instance, passed=False, severity=dg.AssetCheckSeverity.ERROR)
    sensor.tick(instance)

    assert [(r["status"], r["severity"]) for r in sensor.lines()] == [("firing", "WARN"), ("firing", "ERROR")]
    assert sensor.lines()[1]["title"] == "[ERROR] monitoring/churn_drift:drift escalated from WARN"


def test_a_down_webhook_keeps_the_alert_pending_until_it_is_back(instance, tmp_path):
    port = closed_port()
    sensor = Harness(tmp_path, f"http://127.0.0.1:{port}/services/{SECRET}")
    sensor.tick(instance)
    monitoring_run(instance, passed=False)

    down = sensor.tick(instance)
    assert "1 pending for webhook" in down.skip_message
    (row,) = sensor.lines()
    (pending,) = sensor.state()["pending"]
    assert pending["sinks"] == ["webhook"] and pending["attempts"] == 1 and pending["alert"]["id"] == row["id"]
    assert "ConnectionRefusedError" in pending["error"] and SECRET not in sensor.cursor
    assert sensor.waits.waits == [0.5, 1.0, 2.0, 4.0]

    still = sensor.tick(instance)
    assert "1 pending for webhook" in still.skip_message and sensor.state()["pending"][0]["attempts"] == 2

    with FakeWebhook(port=port) as webhook:
        back = sensor.tick(instance)
        (post,) = webhook.posts
    assert row["id"] in post["json"]["blocks"][1]["elements"][0]["text"]
    assert "1 alert(s) delivered" in back.skip_message
    assert sensor.state()["pending"] == []
    assert len(sensor.lines()) == 1, "the file had the alert already; only the webhook was retried"


def test_the_first_tick_alerts_the_current_state_not_the_history(instance, tmp_path):
    monitoring_run(instance, passed=False)
    monitoring_run(instance, passed=True)
    quiet = Harness(tmp_path / "a", None)
    assert quiet.tick(instance).skip_message == "1 new evaluation(s); no change of state"
    assert quiet.lines() == []

    monitoring_run(instance, passed=False)
    current = Harness(tmp_path / "b", None)
    current.tick(instance)
    assert [r["status"] for r in current.lines()] == ["firing"]


def test_a_check_finishing_after_a_later_planned_one_is_not_missed(instance, tmp_path):
    # Both checks are planned (and numbered: drift first) when the step starts; label_drift is
    # evaluated first and a tick runs in between, so the cursor moves past drift's id before drift ends.
    sensor = Harness(tmp_path, None, checks=(DRIFT, LABEL))
    sensor.tick(instance)
    seen = {}

    @dg.asset(
        key=DRIFT_ASSET,
        check_specs=[
            dg.AssetCheckSpec("drift", asset=DRIFT_ASSET),
            dg.AssetCheckSpec("label_drift", asset=DRIFT_ASSET),
        ],
    )
    def churn_drift(context: dg.AssetExecutionContext):
        yield dg.Output(None)
        yield dg.AssetCheckResult(check_name="label_drift", passed=False, severity=dg.AssetCheckSeverity.WARN)
        seen["mid"] = sensor.tick(context.instance)
        yield dg.AssetCheckResult(check_name="drift", passed=False)

    assert dg.materialize([churn_drift], instance=instance).success
    assert "firing monitoring/churn_drift:label_drift (WARN)" in seen["mid"].skip_message
    assert [f["check"] for f in json.loads(seen["mid"].cursor)["in_flight"]] == ["monitoring/churn_drift:drift"]

    after = sensor.tick(instance)
    assert "firing monitoring/churn_drift:drift (ERROR)" in after.skip_message
    assert [r["condition"] for r in sensor.lines()] == [
        "monitoring/churn_drift:label_drift",
        "monitoring/churn_drift:drift",
    ]
    assert sensor.state()["in_flight"] == []


def test_a_run_that_dies_before_its_check_ends_stops_being_waited_for(instance, tmp_path):
    sensor = Harness(tmp_path, None, checks=(DRIFT, LABEL))
    sensor.tick(instance)

    @dg.asset(
        key=DRIFT_ASSET,
        check_specs=[
            dg.AssetCheckSpec("drift", asset=DRIFT_ASSET),
            dg.AssetCheckSpec("label_drift", asset=DRIFT_ASSET),
        ],
    )
    def churn_drift(context: dg.AssetExecutionContext):
        yield dg.Output(None)
        yield dg.AssetCheckResult(check_name="label_drift", passed=True)
        sensor.tick(context.instance)
        raise RuntimeError("the monitoring step crashed")

    assert not dg.materialize([churn_drift], instance=instance, raise_on_error=False).success
    assert len(sensor.state()["in_flight"]) == 1
    sensor.tick(instance)
    assert sensor.state()["in_flight"] == [] and sensor.lines() == []


def test_the_definitions_hold_one_sensor_that_targets_no_job():
    defs = alert_sensor_definitions([DRIFT, LABEL])
    sensor = defs.resolve_sensor_def("monitoring_alerts")
    assert sensor.targets == [] and sensor.minimum_interval_seconds == 60
    assert "monitoring/churn_drift:drift, monitoring/churn_drift:label_drift" in sensor.description
    assert "Requests no runs" in sensor.description
