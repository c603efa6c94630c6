"""deploy/prometheus: promtool's own checks of the config, the rules and their unit tests,
and the conventions promtool does not know (exported names, labels, severities, coverage)."""

import re
import shutil
from pathlib import Path

import pytest
import yaml

from tests.deploy.promql import (
    PROMETHEUS,
    exported_families,
    exported_series,
    family_of,
    grouping_labels,
    recorded_labels,
    rule_files,
    rules,
    run_promtool,
    selectors,
    unknown_names,
)

UNIT_TESTS = sorted((PROMETHEUS / "tests").glob("*.yml"))
ALERTS = [r for r in rules() if "alert" in r]
RECORDS = [r for r in rules() if "record" in r]


def test_the_config_is_valid_and_loads_every_rule_file(promtool):
    result = run_promtool(promtool, "check", "config", PROMETHEUS / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rule_files())} rule files found" in result.stdout


def test_the_rules_are_valid(promtool):
    result = run_promtool(promtool, "check", "rules", "--lint=all", "--lint-fatal", *rule_files())
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(rule_files())


def test_the_rule_unit_tests_pass(promtool):
    result = run_promtool(promtool, "test", "rules", *UNIT_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(UNIT_TESTS)


@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        ("expr: sum(rate(keel_serving_requests_total[5m])", "could not parse expression"),
        (
            "expr: up == 0\n        annotations:\n          summary: '{{ $value | no_such_function }}'",
            "no_such_function",
        ),
    ],
    ids=["bad PromQL", "bad template"],
)
def test_promtool_rejects_a_broken_rule(promtool, tmp_path, rule, problem):
    path = tmp_path / "broken.yml"
    path.write_text(f"groups:\n  - name: broken\n    rules:\n      - alert: Broken\n        {rule}\n")
    result = run_promtool(promtool, "check", "rules", path)
    assert result.returncode != 0
    assert problem in result.stdout + result.stderr


# Each change breaks one alert; its unit test must notice.
MUTATIONS = [
    ("serving.yml", "p99_5m > 0.010", "p99_5m > 0.030", "KeelServingLatencyP99High"),
    ("serving.yml", 'status="error"', 'status="failed"', "KeelServingErrorRatioHigh"),
    ("stream.yml", "lag:sum > 10000", "lag:sum > 20000", "KeelStreamConsumerLagHigh"),
    ("monitoring.yml", "keel_dataset_drift == 1", "keel_dataset_drift == 0", "KeelDatasetDrift"),
    ("monitoring.yml", "> 0.2 * abs(", "> 0.6 * abs(", "KeelPredictionMeanShift"),
    ("targets.yml", "for: 5m", "for: 0m", "KeelTargetDown"),
]


@pytest.mark.parametrize(("file", "old", "new", "alert"), MUTATIONS, ids=[m[3] for m in MUTATIONS])
def test_the_unit_tests_catch_a_broken_alert(promtool, tmp_path, file, old, new, alert):
    copy = tmp_path / "prometheus"
    shutil.copytree(PROMETHEUS / "rules", copy / "rules")
    shutil.copytree(PROMETHEUS / "tests", copy / "tests")
    source = (copy / "rules" / file).read_text()
    assert old in source
    (copy / "rules" / file).write_text(source.replace(old, new, 1))
    result = run_promtool(promtool, "test", "rules", *(copy / "tests" / t.name for t in _unit_tests_of(file)))
    assert result.returncode != 0, f"the unit tests still pass with {old!r} changed to {new!r} in {file}"
    assert f"alertname: {alert}" in result.stdout + result.stderr


def _unit_tests_of(rule_file: str) -> list[Path]:
    return [
        p for p in UNIT_TESTS if any(Path(f).name == rule_file for f in yaml.safe_load(p.read_text())["rule_files"])
    ]


def test_every_alert_is_actionable():
    names = [a["alert"] for a in ALERTS]
    assert len(names) == len(set(names)), f"repeated alert names: {names}"
    for alert in ALERTS:
        name = alert["alert"]
        assert re.fullmatch(r"Keel[A-Z][A-Za-z0-9]+", name), name
        assert re.fullmatch(r"\d+[smh]", str(alert.get("for", ""))), f"{name}: no `for:` duration"
        assert alert["labels"]["severity"] in ("warning", "critical"), name
        for field in ("summary", "description"):
            text = alert["annotations"][field]
            assert "$labels." in text or "$value" in text, f"{name}: its {field} names no label or value"


def _alert_tests() -> dict[str, list[list]]:
    """``{alertname: [exp_alerts of every alert_rule_test of it]}`` across the unit-test files."""
    found: dict[str, list[list]] = {}
    for path in UNIT_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                found.setdefault(case["alertname"], []).append(case.get("exp_alerts") or [])
    return found


def test_every_alert_is_seen_firing_and_seen_quiet():
    cases = _alert_tests()
    for alert in ALERTS:
        name = alert["alert"]
        assert any(cases.get(name, [])), f"{name}: no unit test where it fires"
        assert any(not expected for expected in cases.get(name, [])), f"{name}: no unit test where it must not fire"
    assert set(cases) <= {a["alert"] for a in ALERTS}, "unit tests name alerts no rule defines"


def test_every_rules_file_has_unit_tests():
    covered = set()
    for path in UNIT_TESTS:
        for name in yaml.safe_load(path.read_text())["rule_files"]:
            target = (path.parent / name).resolve()
            assert target.exists(), f"{path.name}: rule file {name} does not exist"
            covered.add(target)
    assert covered == {p.resolve() for p in rule_files()}


def test_the_rules_use_only_metrics_keel_exports():
    series = exported_series()
    recorded = {r["record"] for r in RECORDS}
    problems = []
    for rule in rules():
        problems += unknown_names(rule.get("alert") or rule["record"], rule["expr"], series, recorded)
    assert problems == []


def test_recording_rules_keep_the_labels_their_names_say():
    families = exported_families()
    for rule in RECORDS:
        record = rule["record"]
        level, metric, operation = record.split(":")
        assert metric.startswith("keel_") and operation, record
        for labels in grouping_labels(rule["expr"]):
            assert set(labels) - {"le"} == recorded_labels(record), f"{record}: groups by {labels}"
        used = {family_of(s.metric, families) for s in selectors(rule["expr"])} - {None}
        assert used, f"{record}: reads no exported metric"


def test_the_scrape_config_reaches_every_keel_process():
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    ports = {"keel-serving": "8000", "keel-stream": "9464", "keel-monitoring": "9465"}
    for name, port in ports.items():
        targets = [t for sc in jobs[name]["static_configs"] for t in sc["targets"]]
        assert targets and all(t.rsplit(":", 1)[1] == port for t in targets), (name, targets)
        assert jobs[name].get("metrics_path", "/metrics") == "/metrics"
    assert len([t for sc in jobs["keel-serving"]["static_configs"] for t in sc["targets"]]) >= 2
    globbed = {p.resolve() for pattern in config["rule_files"] for p in PROMETHEUS.glob(pattern)}
    assert globbed == {p.resolve() for p in rule_files()}
    assert _seconds(config["global"]["evaluation_interval"]) <= 60


def test_the_target_alert_covers_every_keel_job():
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    pattern = re.search(r'job=~"([^"]+)"', next(a for a in ALERTS if a["alert"] == "KeelTargetDown")["expr"]).group(1)
    for job in config["scrape_configs"]:
        assert bool(re.fullmatch(pattern, job["job_name"])) == job["job_name"].startswith("keel-"), job["job_name"]


def _seconds(duration: str) -> int:
    value, unit = re.fullmatch(r"(\d+)([smh])", duration).groups()
    return int(value) * {"s": 1, "m": 60, "h": 3600}[unit]
