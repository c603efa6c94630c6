"""deploy/grafana: the dashboards against a schema of Grafana's dashboard model, their layout
and datasources, their PromQL parsed by promtool and named from what Keel exports, and the
provisioning files that load them."""

import copy
import json
import re

import pytest
import yaml

from tests.deploy.dashboards import (
    DASHBOARDS,
    datasource_problems,
    expressions,
    layout_problems,
    load,
    panels,
    schema_errors,
)
from tests.deploy.promql import (
    GRAFANA,
    PROMETHEUS,
    REPO,
    exported_families,
    exported_series,
    family_of,
    rules,
    rules_file,
    run_promtool,
    selectors,
    unknown_names,
)

IDS = [path.stem for path in DASHBOARDS]


@pytest.fixture(params=DASHBOARDS, ids=IDS)
def board(request) -> dict:
    return load(request.param)


def test_the_three_dashboards_exist():
    assert IDS == ["keel-monitoring", "keel-serving", "keel-stream"]


def test_a_dashboard_matches_the_schema(board):
    assert schema_errors(board) == []


def test_a_dashboard_is_laid_out_on_the_grid(board):
    assert layout_problems(board) == []


def test_every_panel_reads_the_datasource_variable(board):
    assert datasource_problems(board) == []


def test_a_dashboard_has_its_files_name_as_uid_and_a_model_or_source_variable(board):
    path = next(p for p in DASHBOARDS if load(p)["uid"] == board["uid"])
    assert board["uid"] == path.stem
    assert "keel" in board["tags"]
    names = [v["name"] for v in board["templating"]["list"]]
    assert names[0] == "datasource" and ({"model", "source"} & set(names))


def test_the_dashboards_use_only_metrics_keel_exports(board):
    series = exported_series()
    recorded = {r["record"] for r in rules() if "record" in r}
    problems = []
    for where, expr in expressions(board).items():
        problems += unknown_names(f"{board['uid']} {where}", expr, series, recorded)
    assert problems == []


def _parse_with_promtool(promtool, tmp_path, boards) -> tuple[object, dict[str, str]]:
    """Every expression of the boards as a recording rule, checked by promtool."""
    where = {}
    exprs = {}
    for board in boards:
        for n, (place, expr) in enumerate(expressions(board).items()):
            name = f"dashboard:{board['uid'].replace('-', '_')}:expr_{n}"
            where[name] = f"{board['uid']} {place}"
            exprs[name] = expr
    path = tmp_path / "dashboard_expressions.yml"
    path.write_text(rules_file(exprs))
    return run_promtool(promtool, "check", "rules", path), where


def test_promtool_parses_every_dashboard_expression(promtool, tmp_path):
    boards = [load(p) for p in DASHBOARDS]
    result, where = _parse_with_promtool(promtool, tmp_path, boards)
    assert result.returncode == 0, result.stdout + result.stderr + json.dumps(where, indent=1)
    assert f"SUCCESS: {len(where)} rules found" in result.stdout
    assert len(where) > 40


def test_every_exported_metric_is_on_a_dashboard_or_in_a_rule():
    families = exported_families()
    used = set()
    for path in DASHBOARDS:
        for expr in expressions(load(path)).values():
            used |= {family_of(s.metric, families) for s in selectors(expr)}
    for rule in rules():
        used |= {family_of(s.metric, families) for s in selectors(rule["expr"])}
    assert set(families) - used == set()


# ---- the checks above can fail --------------------------------------------------------------


def _serving() -> dict:
    return load(GRAFANA / "dashboards" / "keel-serving.json")


def _first(board: dict, kind: str) -> dict:
    return next(p for p in panels(board) if p["type"] == kind)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: _first(b, "timeseries")["fieldConfig"]["defaults"].pop("unit"), "'unit' is a required property"),
        (lambda b: _first(b, "timeseries")["fieldConfig"]["defaults"].update(unit="secs"), "'secs' is not one of"),
        (lambda b: _first(b, "stat").update(type="graph"), "'graph' is not one of"),
        (lambda b: _first(b, "stat").pop("targets"), "'targets' is a required property"),
        (lambda b: _first(b, "heatmap")["targets"][0].update(format="time_series"), "'heatmap' was expected"),
        (lambda b: _first(b, "stat")["gridPos"].update(w=25), "25 is greater than the maximum of 24"),
        (lambda b: b.update(refresh="30 seconds"), "refresh"),
    ],
    ids=["no unit", "unknown unit", "unknown panel type", "no targets", "heatmap as series", "too wide", "bad refresh"],
)
def test_the_schema_rejects_a_broken_dashboard(change, message):
    board = _serving()
    change(board)
    errors = schema_errors(board)
    assert errors and any(message in e for e in errors), errors


def test_the_layout_check_finds_overlaps_overflow_and_repeated_ids():
    board = _serving()
    stats = [p for p in board["panels"] if p["type"] == "stat"]
    stats[1]["gridPos"]["x"] = 2
    stats[2]["id"] = stats[3]["id"]
    stats[5]["gridPos"]["x"] = 22
    problems = "\n".join(layout_problems(board))
    assert f"overlaps panel {stats[0]['id']}" in problems
    assert f"id {stats[3]['id']} is also the id of" in problems
    assert "passes the 24-column grid" in problems


def test_the_datasource_check_refuses_a_fixed_datasource():
    board = _serving()
    _first(board, "stat")["targets"][0]["datasource"] = {"type": "prometheus", "uid": "keel-prometheus"}
    assert any("is not the dashboard's prometheus datasource variable" in p for p in datasource_problems(board))


def test_an_undefined_template_variable_is_refused():
    board = _serving()
    _first(board, "stat")["targets"][0]["expr"] = 'sum(keel_serving_requests_total{alias=~"$alias"})'
    with pytest.raises(ValueError, match=r"\$alias is not a variable"):
        expressions(board)


def test_promtool_rejects_a_broken_dashboard_expression(promtool, tmp_path):
    board = copy.deepcopy(_serving())
    _first(board, "stat")["targets"][0]["expr"] = "sum(rate(keel_serving_requests_total[$__rate_interval])"
    result, _ = _parse_with_promtool(promtool, tmp_path, [board])
    assert result.returncode != 0
    assert "could not parse expression" in result.stdout + result.stderr


def test_a_misspelt_metric_on_a_dashboard_is_named():
    board = _serving()
    _first(board, "stat")["targets"][0]["expr"] = "sum(rate(keel_serving_request_total[5m]))"
    problems = []
    for where, expr in expressions(board).items():
        problems += unknown_names(where, expr, exported_series(), set())
    assert any("'keel_serving_request_total' is neither exported" in p for p in problems)


# ---- provisioning -----------------------------------------------------------------------------


def test_the_datasource_provisioning_is_the_prometheus_of_the_profile():
    config = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert config["apiVersion"] == 1
    (source,) = config["datasources"]
    assert source["type"] == "prometheus" and source["access"] == "proxy" and source["isDefault"] is True
    assert re.fullmatch(r"https?://[\w.-]+:9090", source["url"])
    scrape = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == scrape


def test_the_dashboard_provisioning_loads_the_dashboards_folder():
    config = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "keel.yml").read_text())
    assert config["apiVersion"] == 1
    (provider,) = config["providers"]
    assert provider["type"] == "file" and provider["folder"] and provider["allowUiUpdates"] is False
    path = provider["options"]["path"]
    assert path.startswith("/") and not path.endswith(".json")
    # Where a compose file of the profile mounts the folder, it is at the provider's path.
    for compose in [p for p in (REPO / "deploy").glob("*compose*.y*ml")]:
        text = compose.read_text()
        if "grafana" in text:
            assert re.search(rf"grafana/dashboards/?:{re.escape(path)}/?(:ro)?\b", text), (
                f"{compose.name} mounts no {path}"
            )
