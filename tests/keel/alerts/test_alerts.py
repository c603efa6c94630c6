"""Alerts: the dedup policy of reconcile, the console and JSONL sinks, and the webhook against a real loopback server."""

from __future__ import annotations

import datetime as dt
import io
import json
import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.alerts.policy import (
    Alert,
    Evaluation,
    PendingAlert,
    deliver,
    flush_outbox,
    plain_metadata,
    reconcile,
)
from keel.alerts.sinks import (
    ConsoleSink,
    JsonlSink,
    WebhookError,
    WebhookSink,
    format_line,
    sinks_from_settings,
    slack_payload,
)
from keel.config import Settings, redact_url
from tests.factories.alerts import SECRET, FakeWebhook, closed_port
from tests.factories.timing import Waits

T0 = dt.datetime(2026, 3, 2, 1, 0, tzinfo=dt.UTC)
DRIFT = "monitoring/churn_drift:drift"
PERF = "monitoring/churn_performance:performance"
DAGSTER = "http://dagster.test:3000"


def ev(condition=DRIFT, passed=False, severity="ERROR", minutes=0, run_id="run-1", **kw) -> Evaluation:
    return Evaluation(
        condition=condition,
        passed=passed,
        severity=severity,
        ts=T0 + dt.timedelta(minutes=minutes),
        description=kw.pop("description", "3 of 12 features drifted"),
        run_id=run_id,
        **kw,
    )


def statuses(alerts) -> list[tuple[str, str, str]]:
    return [(a.status, a.condition, a.severity) for a in alerts]


# reconcile ----------------------------------------------------------------------------------


def test_a_first_failure_fires_and_opens_the_condition():
    alerts, state = reconcile({}, [ev(partition="2026-03-01", metadata={"drift_share": 0.25})], dagster_url=DAGSTER)

    (alert,) = alerts
    assert (alert.status, alert.condition, alert.severity) == ("firing", DRIFT, "ERROR")
    assert alert.title == f"[ERROR] {DRIFT} is failing"
    assert "3 of 12 features drifted" in alert.text and "partition 2026-03-01" in alert.text
    assert "drift_share=0.25" in alert.text
    assert alert.run_url == f"{DAGSTER}/runs/run-1"
    assert (alert.ts, alert.since, alert.partition) == (T0, T0, "2026-03-01")
    assert state == {DRIFT: {"severity": "ERROR", "since": T0.isoformat(), "last_seen": T0.isoformat(), "failures": 1}}


def test_a_repeated_failure_sends_nothing_but_updates_last_seen():
    _, state = reconcile({}, [ev(severity="WARN")])

    alerts, state = reconcile(state, [ev(severity="WARN", minutes=60), ev(severity="WARN", minutes=120)])

    assert alerts == []
    assert state[DRIFT]["last_seen"] == (T0 + dt.timedelta(minutes=120)).isoformat()
    assert state[DRIFT]["since"] == T0.isoformat() and state[DRIFT]["failures"] == 3


def test_warn_to_error_fires_again_as_an_escalation_and_error_to_warn_does_not():
    alerts, state = reconcile(
        {}, [ev(severity="WARN"), ev(severity="ERROR", minutes=90), ev(severity="WARN", minutes=95)]
    )

    assert statuses(alerts) == [("firing", DRIFT, "WARN"), ("firing", DRIFT, "ERROR")]
    warn, error = alerts
    assert error.title == f"[ERROR] {DRIFT} escalated from WARN"
    assert "failing since 2026-03-02 01:00 UTC (1 h 30 min)" in error.text
    assert error.since == warn.since == T0 and error.id != warn.id
    # The open condition stays at its highest severity: another ERROR is a duplicate, not a new escalation.
    assert state[DRIFT]["severity"] == "ERROR"
    assert reconcile(state, [ev(severity="ERROR", minutes=100)])[0] == []


def test_a_pass_resolves_an_open_condition_with_how_long_it_lasted():
    _, state = reconcile({}, [ev(severity="WARN"), ev(severity="WARN", minutes=30)])

    alerts, state = reconcile(
        state, [ev(passed=True, minutes=125, run_id="run-9", description="no drift")], dagster_url=DAGSTER
    )

    (alert,) = alerts
    assert (alert.status, alert.severity) == ("resolved", "WARN")
    assert alert.title == f"[RESOLVED] {DRIFT} is passing again"
    assert alert.text.startswith(
        "passing again after 2 h 5 min (failing since 2026-03-02 01:00 UTC, 2 failed evaluations)"
    )
    assert "no drift" in alert.text
    assert alert.run_url == f"{DAGSTER}/runs/run-9" and alert.since == T0
    assert state == {}


def test_passing_with_nothing_open_sends_nothing():
    assert reconcile({}, [ev(passed=True), ev(passed=True, minutes=5)]) == ([], {})


def test_evaluations_are_taken_in_order_and_conditions_are_independent():
    batch = [
        ev(DRIFT),
        ev(PERF, severity="WARN", minutes=1),
        ev(DRIFT, passed=True, minutes=2),
        ev(DRIFT, severity="WARN", minutes=3),
        ev(PERF, minutes=4),
    ]

    alerts, state = reconcile({}, batch)

    assert statuses(alerts) == [
        ("firing", DRIFT, "ERROR"),
        ("firing", PERF, "WARN"),
        ("resolved", DRIFT, "ERROR"),
        ("firing", DRIFT, "WARN"),
        ("firing", PERF, "ERROR"),
    ]
    # A new episode of the same condition is a new alert, not the first one again.
    assert alerts[0].id != alerts[3].id
    assert state[DRIFT]["since"] == (T0 + dt.timedelta(minutes=3)).isoformat()
    assert set(state) == {DRIFT, PERF}


def test_reconcile_leaves_its_input_alone_and_its_state_survives_json():
    _, state = reconcile({}, [ev()])
    frozen = json.dumps(state, sort_keys=True)

    alerts, _ = reconcile(json.loads(frozen), [ev(passed=True, minutes=10)])

    assert json.dumps(state, sort_keys=True) == frozen
    assert statuses(alerts) == [("resolved", DRIFT, "ERROR")]


def test_alert_ids_are_stable_and_round_trip():
    first, _ = reconcile({}, [ev(metadata={"psi": 0.3})])
    again, _ = reconcile({}, [ev(metadata={"psi": 0.3}, run_id="other")])

    assert first[0].id == again[0].id and len(first[0].id) == 16
    assert Alert.from_dict(json.loads(json.dumps(first[0].to_dict()))) == first[0]


def test_a_bad_evaluation_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"severity 'CRITICAL' is not WARN or ERROR"):
        ev(severity="CRITICAL")
    with pytest.raises(ValueError, match="has no time zone"):
        Evaluation(condition=DRIFT, passed=False, severity="WARN", ts=dt.datetime(2026, 3, 2))


def test_plain_metadata_keeps_small_scalars_only():
    got = plain_metadata({"share": 0.5, "n": 3, "ok": True, "note": "fine", "long": "x" * 500, "table": object()})
    assert got == {"share": 0.5, "n": 3, "ok": True, "note": "fine"}
    assert plain_metadata({"nan": float("nan")}) == {"nan": "nan"}
    assert len(plain_metadata({str(i): i for i in range(50)})) == 12


evaluation_steps = st.lists(
    st.tuples(st.sampled_from([DRIFT, PERF]), st.booleans(), st.sampled_from(["WARN", "ERROR"])), max_size=30
)


@settings(max_examples=200, deadline=None)
@given(steps=evaluation_steps, cuts=st.lists(st.integers(0, 30), max_size=4))
def test_reconcile_in_batches_equals_reconcile_at_once_and_alternates_firing_and_resolved(steps, cuts):
    evaluations = [ev(c, passed=p, severity=s, minutes=i) for i, (c, p, s) in enumerate(steps)]
    whole, final = reconcile({}, evaluations)

    pieces, state, start = [], {}, 0
    for cut in sorted({min(c, len(evaluations)) for c in cuts}) + [len(evaluations)]:
        alerts, state = reconcile(json.loads(json.dumps(state)), evaluations[start:cut])
        pieces += alerts
        start = cut
    assert [a.to_dict() for a in pieces] == [a.to_dict() for a in whole]
    assert state == final

    # Brute force: a condition is open exactly when its last evaluation failed; each opening fires
    # once, each rise from WARN to ERROR within an episode fires once, and each closing resolves once.
    for condition in (DRIFT, PERF):
        mine = [(p, s) for c, p, s in steps if c == condition]
        expected, is_open, level = [], False, None
        for passed, severity in mine:
            if not passed and not is_open:
                expected.append(("firing", severity))
                is_open, level = True, severity
            elif not passed and severity == "ERROR" and level == "WARN":
                expected.append(("firing", "ERROR"))
                level = "ERROR"
            elif passed and is_open:
                expected.append(("resolved", level))
                is_open = False
        assert [(a.status, a.severity) for a in whole if a.condition == condition] == expected
        assert (condition in final) == is_open


# Console and JSONL ---------------------------------------------------------------------------


def test_the_console_gets_one_readable_line_per_alert():
    alerts, _ = reconcile({}, [ev(description="3 of 12 features drifted\npsi above 0.2")], dagster_url=DAGSTER)
    stream = io.StringIO()

    ConsoleSink(stream).send(alerts[0])

    assert stream.getvalue() == (
        f"2026-03-02T01:00:00Z FIRING   ERROR {DRIFT} is failing: 3 of 12 features drifted | psi above 0.2 "
        f"<{DAGSTER}/runs/run-1>\n"
    )
    resolved, _ = reconcile(
        {DRIFT: {"severity": "ERROR", "since": T0.isoformat(), "failures": 1}},
        [ev(passed=True, minutes=5, description="")],
    )
    assert format_line(resolved[0]) == (
        f"2026-03-02T01:05:00Z RESOLVED ERROR {DRIFT} is passing again: passing again after 5 min "
        "(failing since 2026-03-02 01:00 UTC, 1 failed evaluation)"
    )


def test_the_console_defaults_to_stderr(capsys):
    alerts, _ = reconcile({}, [ev()])
    ConsoleSink().send(alerts[0])
    captured = capsys.readouterr()
    assert captured.out == "" and f"FIRING   ERROR {DRIFT}" in captured.err


def test_the_jsonl_file_gets_one_complete_object_per_alert(tmp_path):
    path = tmp_path / "deep" / "er" / "alerts.jsonl"
    alerts, _ = reconcile({}, [ev(metadata={"psi": 0.31}), ev(passed=True, minutes=7)], dagster_url=DAGSTER)
    sink = JsonlSink(path)

    for alert in alerts:
        sink.send(alert)

    lines = path.read_text().splitlines(keepends=True)
    assert len(lines) == 2 and all(line.endswith("\n") for line in lines)
    rows = [json.loads(line) for line in lines]
    assert [r["status"] for r in rows] == ["firing", "resolved"]
    assert rows[0] == alerts[0].to_dict()
    assert rows[0]["metadata"] == {"psi": 0.31} and rows[0]["run_url"] == f"{DAGSTER}/runs/run-1"
    assert rows[1]["ts"] == "2026-03-02T01:07:00+00:00"


def test_a_torn_last_line_does_not_swallow_the_next_alert(tmp_path):
    path = tmp_path / "alerts.jsonl"
    path.write_bytes(b'{"id": "complete"}\n{"id": "torn by a cra')
    alerts, _ = reconcile({}, [ev()])

    JsonlSink(path).send(alerts[0])

    lines = path.read_text().split("\n")
    assert lines[-1] == "" and json.loads(lines[-2])["id"] == alerts[0].id
    assert lines[1] == '{"id": "torn by a cra'


# Webhook against a real loopback server ------------------------------------------------------


@pytest.fixture
def webhook():
    with FakeWebhook() as server:
        yield server


def firing_alert(**kw) -> Alert:
    return reconcile({}, [ev(**kw)], dagster_url=DAGSTER)[0][0]


def test_a_200_delivers_once_with_the_slack_payload(webhook):
    alert = firing_alert(description="drift <share> & more", run_id="0123456789abcdef")
    waits = Waits()

    WebhookSink(webhook.url, sleep=waits.sleep).send(alert)

    (post,) = webhook.posts
    assert post["path"] == f"/services/{SECRET}" and post["content_type"].startswith("application/json")
    payload = post["json"]
    assert payload == slack_payload(alert)
    assert payload["text"].startswith(f"[ERROR] {DRIFT} is failing")
    section = payload["blocks"][0]
    assert section["type"] == "section" and section["text"]["type"] == "mrkdwn"
    assert f"<{DAGSTER}/runs/0123456789abcdef|View run 01234567 in Dagster>" in section["text"]["text"]
    assert "drift &lt;share&gt; &amp; more" in section["text"]["text"]
    assert alert.id in payload["blocks"][1]["elements"][0]["text"]
    assert waits.waits == []


def test_5xx_is_retried_with_exponential_backoff(webhook):
    webhook.script = [(500, {}, b"oops"), (500, {}, b"oops")]
    waits = Waits()

    WebhookSink(webhook.url, sleep=waits.sleep).send(firing_alert())

    assert len(webhook.posts) == 3
    assert waits.waits == [0.5, 1.0]
    assert webhook.posts[0]["json"] == webhook.posts[2]["json"]


def test_429_waits_as_long_as_retry_after_says(webhook):
    webhook.script = [(429, {"Retry-After": "3"}, b"slow down"), (429, {}, b"")]
    waits = Waits()

    WebhookSink(webhook.url, sleep=waits.sleep).send(firing_alert())

    assert len(webhook.posts) == 3
    # The second 429 names no wait, so the backoff (second step) applies.
    assert waits.waits == [3.0, 1.0]


def test_a_retry_after_longer_than_the_cap_ends_the_attempt_for_a_later_batch(webhook):
    webhook.script = [(429, {"Retry-After": "120"}, b"")]
    waits = Waits()

    with pytest.raises(WebhookError, match=r"asked to wait 120 s, longer than the 8 s") as caught:
        WebhookSink(webhook.url, sleep=waits.sleep).send(firing_alert())

    assert len(webhook.posts) == 1 and waits.waits == []
    assert SECRET not in str(caught.value)


def test_a_400_is_not_retried_and_says_what_to_fix(webhook):
    webhook.script = [(400, {}, b"invalid_payload")]
    waits = Waits()

    with pytest.raises(WebhookError) as caught:
        WebhookSink(webhook.url, sleep=waits.sleep).send(firing_alert())

    message = str(caught.value)
    port = webhook.server.server_address[1]
    assert message.startswith(f"webhook http://127.0.0.1:{port}/*** answered HTTP 400 (invalid_payload): ")
    assert "KEEL_ALERT_WEBHOOK" in message and SECRET not in message
    assert len(webhook.posts) == 1 and waits.waits == []


@pytest.mark.parametrize(
    ("status", "fix"), [(404, "no webhook at this address"), (403, "create a new incoming webhook")]
)
def test_other_4xx_name_their_fix(webhook, status, fix):
    webhook.script = [(status, {}, b"no_service")]
    with pytest.raises(WebhookError, match=fix):
        WebhookSink(webhook.url, sleep=Waits().sleep).send(firing_alert())
    assert len(webhook.posts) == 1


def test_a_redirect_is_reported_not_followed(webhook):
    webhook.script = [(302, {"Location": f"https://hooks.example.com/services/{SECRET}"}, b"")]
    with pytest.raises(WebhookError) as caught:
        WebhookSink(webhook.url, sleep=Waits().sleep).send(firing_alert())
    assert "redirects to https://hooks.example.com/***" in str(caught.value)
    assert SECRET not in str(caught.value) and len(webhook.posts) == 1


def test_an_unreachable_webhook_fails_after_the_retries():
    port = closed_port()
    url = f"http://127.0.0.1:{port}/services/{SECRET}"
    waits = Waits()

    with pytest.raises(WebhookError) as caught:
        WebhookSink(url, sleep=waits.sleep).send(firing_alert())

    message = str(caught.value)
    assert waits.waits == [0.5, 1.0, 2.0, 4.0]
    assert f"webhook http://127.0.0.1:{port}/***: no answer (ConnectionRefusedError" in message
    assert "after 5 attempt(s)" in message and SECRET not in message


def test_a_timeout_is_retried(webhook):
    webhook.hang.set()
    waits = Waits()

    with pytest.raises(WebhookError, match=r"no answer \(TimeoutError.*after 2 attempt") as caught:
        WebhookSink(webhook.url, retries=1, timeout_s=0.2, sleep=waits.sleep).send(firing_alert())

    assert len(webhook.posts) == 2 and waits.waits == [0.5]
    assert SECRET not in str(caught.value)


def test_the_time_budget_bounds_all_sends_of_a_sink(webhook):
    webhook.script = [(503, {}, b"")] * 10
    waits = Waits()
    sink = WebhookSink(webhook.url, budget_s=3, sleep=waits.sleep, clock=waits.clock)

    with pytest.raises(WebhookError, match="HTTP 503 after 3 attempt"):
        sink.send(firing_alert())
    # 0.5 + 1 waited; the next wait (2) would end past the 3 s budget.
    assert waits.waits == [0.5, 1.0] and len(webhook.posts) == 3

    waits.now = 3.0
    with pytest.raises(WebhookError, match="3 s time budget is spent") as caught:
        sink.send(firing_alert(condition=PERF))
    assert len(webhook.posts) == 3 and "last problem" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"https://hooks.slack.com/services/{SECRET}", "https://hooks.slack.com/***"),
        ("https://user:pw@alerts.internal:8443/hook?token=abc", "https://alerts.internal:8443/***"),
        ("https://alerts.internal", "https://alerts.internal"),
        (f"hooks.slack.com/services/{SECRET}", "<49 characters, hidden>"),
    ],
)
def test_webhook_urls_are_redacted(url, shown):
    assert redact_url(url) == shown


def test_a_non_http_webhook_is_refused_without_printing_it():
    with pytest.raises(ValueError, match=r"webhook ftp://hooks/\*\*\*: not an http\(s\) URL") as caught:
        WebhookSink(f"ftp://hooks/{SECRET}")
    assert SECRET not in str(caught.value)


# Delivery and the outbox ---------------------------------------------------------------------


class Broken:
    def __init__(self, name="broken"):
        self.name = name

    def send(self, alert):
        raise OSError(f"disk full writing {alert.id}")


class Collect:
    def __init__(self, name):
        self.name, self.got = name, []

    def send(self, alert):
        self.got.append(alert.id)


def test_a_failing_sink_does_not_stop_the_others():
    alerts, _ = reconcile({}, [ev(DRIFT), ev(PERF)])
    first, last = Collect("first"), Collect("last")

    report = deliver(alerts, [first, Broken(), last])

    assert first.got == last.got == [a.id for a in alerts]
    assert not report.ok and len(report.delivered) == 4
    assert [(f.alert.id, f.sink) for f in report.failures] == [(a.id, "broken") for a in alerts]
    assert report.failures[0].error == f"disk full writing {alerts[0].id}"
    assert report.failed_sinks(alerts[1]) == ("broken",)


def test_the_outbox_retries_only_the_sinks_that_missed_and_drops_after_a_day():
    (alert,), _ = reconcile({}, [ev()])
    file, hook = Collect("file"), Broken("webhook")

    first = flush_outbox([], [alert], [file, hook], now=T0)
    assert file.got == [alert.id]
    (pending,) = first.pending
    assert (pending.sinks, pending.attempts, pending.first_failed) == (("webhook",), 1, T0)
    assert PendingAlert.from_dict(json.loads(json.dumps(pending.to_dict()))) == pending

    later = flush_outbox(first.pending, [], [file, hook], now=T0 + dt.timedelta(hours=2))
    assert file.got == [alert.id], "the file already has it"
    assert later.pending[0].attempts == 2 and later.dropped == []

    healed = Collect("webhook")
    done = flush_outbox(later.pending, [], [file, healed], now=T0 + dt.timedelta(hours=3))
    assert healed.got == [alert.id] and done.pending == [] and done.dropped == []

    stale = flush_outbox(later.pending, [], [file, hook], now=T0 + dt.timedelta(days=1))
    assert stale.pending == [] and stale.dropped[0][1] == "undelivered for 1 d 0 h"
    assert stale.dropped[0][0].attempts == 3


def test_the_outbox_drops_alerts_for_removed_sinks_and_beyond_its_size():
    alerts, _ = reconcile({}, [ev(DRIFT), ev(PERF)])
    gone = flush_outbox([PendingAlert(alerts[0], ("webhook",), 1, T0, "down")], [], [Collect("file")], now=T0)
    assert gone.pending == [] and gone.dropped[0][1] == "sink(s) webhook no longer configured"

    full = flush_outbox([], alerts, [Broken("webhook")], now=T0, max_pending=1)
    assert [p.alert.id for p in full.pending] == [alerts[1].id]
    assert [(d.alert.id, why) for d, why in full.dropped] == [(alerts[0].id, "more than 1 alerts pending")]


def test_sinks_follow_the_settings(tmp_path):
    base = {"KEEL_HOME": str(tmp_path), "KEEL_CODE_VERSION": "x"}
    plain = sinks_from_settings(Settings.from_env(base))
    assert [s.name for s in plain] == ["console", "file"]
    assert plain[1].path == tmp_path.resolve() / "alerts.jsonl"

    hooked = sinks_from_settings(
        Settings.from_env({**base, "KEEL_ALERT_WEBHOOK": f"https://hooks.slack.com/services/{SECRET}"})
    )
    assert [s.name for s in hooked] == ["console", "file", "webhook"]
    assert hooked[2].shown_url == "https://hooks.slack.com/***"


def test_an_untrusted_tls_certificate_is_not_retried(tmp_path):
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "127.0.0.1")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
        .not_valid_after(dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    waits = Waits()

    server = FakeWebhook()
    server.server.socket = tls.wrap_socket(server.server.socket, server_side=True)
    with server:
        url = server.url.replace("http://", "https://")
        with pytest.raises(WebhookError, match="TLS certificate is not trusted") as caught:
            WebhookSink(url, sleep=waits.sleep).send(firing_alert())

    assert waits.waits == [] and SECRET not in str(caught.value)
