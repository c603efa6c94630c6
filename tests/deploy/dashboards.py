"""Checks of a Grafana dashboard model beyond what a JSON Schema can say: layout, ids,
datasources, template variables, and the PromQL each panel runs."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import jsonschema

from tests.deploy.promql import GRAFANA

SCHEMA_PATH = Path(__file__).with_name("grafana_dashboard.schema.json")
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
GRID_COLUMNS = 24

# What Grafana puts in place of its built-in variables, for parsing only.
BUILTIN_VARIABLES = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h", "__range_s": "3600"}
# A value for each of our own variables, chosen to look like a real one.
EXAMPLE_VALUES = {"model": "churn", "source": "transactions", "datasource": "keel-prometheus"}
_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<selector>.+?)\s*,\s*)?(?P<label>\w+)\s*\)\s*$")


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def schema_errors(board: dict) -> list[str]:
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))
    return [
        f"{'/'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}"
        for error in sorted(validator.iter_errors(board), key=lambda e: list(map(str, e.absolute_path)))
    ]


def panels(board: dict) -> Iterator[dict]:
    """Every panel, those inside collapsed rows included."""
    for panel in board.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def layout_problems(board: dict) -> list[str]:
    problems = []
    cells: dict[tuple[int, int], str] = {}
    ids: dict[int, str] = {}
    for panel in panels(board):
        name = f"panel {panel.get('id')} {panel.get('title')!r}"
        if panel.get("id") in ids:
            problems.append(f"{name}: id {panel['id']} is also the id of {ids[panel['id']]}")
        ids[panel.get("id")] = name
        grid = panel["gridPos"]
        if grid["x"] + grid["w"] > GRID_COLUMNS:
            problems.append(f"{name}: x {grid['x']} + w {grid['w']} passes the {GRID_COLUMNS}-column grid")
        own = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}
        clash = sorted(own & cells.keys())
        if clash:
            x, y = clash[0]
            problems.append(f"{name}: overlaps {cells[clash[0]]} at x={x}, y={y}")
        cells.update(dict.fromkeys(own, name))
    return problems


def datasource_problems(board: dict) -> list[str]:
    """Every data panel and target reads Prometheus through the dashboard's datasource variable."""
    variables = {v["name"]: v for v in board["templating"]["list"]}
    problems = []
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        name = f"panel {panel['id']} {panel['title']!r}"
        refs = [panel.get("datasource")] + [
            t.get("datasource", panel.get("datasource")) for t in panel.get("targets", [])
        ]
        for ref in refs:
            uid = (ref or {}).get("uid", "")
            match = _VARIABLE.fullmatch(uid)
            var = variables.get(match.group(1) or match.group(2)) if match else None
            if var is None or var["type"] != "datasource" or var.get("query") != "prometheus":
                problems.append(f"{name}: datasource {ref} is not the dashboard's prometheus datasource variable")
        refids = [t["refId"] for t in panel.get("targets", [])]
        if len(set(refids)) != len(refids):
            problems.append(f"{name}: repeated refId in {refids}")
    return problems


def expressions(board: dict) -> dict[str, str]:
    """``{where: PromQL}`` for every panel target, annotation and variable query, with the
    template variables replaced by example values. Raises on a variable the dashboard does not define."""
    defined = {v["name"] for v in board["templating"]["list"]}
    found = {}

    def add(where: str, expr: str) -> None:
        def value(match: re.Match) -> str:
            name = match.group(1) or match.group(2)
            if name in BUILTIN_VARIABLES:
                return BUILTIN_VARIABLES[name]
            if name not in defined:
                raise ValueError(f"{board['uid']} {where}: ${name} is not a variable of the dashboard")
            return EXAMPLE_VALUES[name]

        found[where] = _VARIABLE.sub(value, expr)

    for panel in panels(board):
        for target in panel.get("targets", []):
            add(f"panel {panel['id']} {panel['title']!r} target {target['refId']}", target["expr"])
    for annotation in board.get("annotations", {}).get("list", []):
        if "expr" in annotation:
            add(f"annotation {annotation['name']!r}", annotation["expr"])
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = _LABEL_VALUES.match(query)
            if match is None:
                raise ValueError(
                    f"{board['uid']} variable {variable['name']}: {query!r} is not label_values(selector, label)"
                )
            add(f"variable {variable['name']}", match.group("selector") or "up")
    return found
