"""What the deploy checks share: the metric names Keel exports, PromQL selectors, promtool.

Serving's and the stream worker's names are read from their source (the prometheus_client
constructors in serving/metrics.py and keel/stream/metrics.py); the monitoring exporter's from
deploy/prometheus/metrics.txt, the list its author checks against.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "deploy" / "prometheus"
GRAFANA = REPO / "deploy" / "grafana"
INSTRUMENTED = (REPO / "serving" / "metrics.py", REPO / "keel" / "stream" / "metrics.py")
MONITORING_LIST = PROMETHEUS / "metrics.txt"

# Labels Prometheus adds to every scraped series, and the series it writes itself.
TARGET_LABELS = frozenset({"job", "instance"})
PROMETHEUS_SERIES = {"up": frozenset()}

INSTALL_HINT = (
    "promtool is not installed: run `make install` (it extracts promtool from Debian's prometheus "
    "package into .venv/bin), or put Prometheus' promtool on PATH"
)


def promtool_path() -> str | None:
    local = REPO / ".venv" / "bin" / "promtool"
    if local.exists() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("promtool")


def run_promtool(promtool: str, *args: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120)


# ---- the metrics Keel exports -------------------------------------------------------------

_KINDS = {"Counter": ("_total",), "Gauge": ("",), "Histogram": ("_bucket", "_sum", "_count")}


def instrumented_families(path: Path) -> dict[str, tuple[str, tuple[str, ...]]]:
    """``{family: (kind, labels)}`` of every Counter/Gauge/Histogram constructed in a source file."""
    families = {}
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.Call):
            continue
        kind = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
        if kind not in _KINDS or not node.args or not isinstance(node.args[0], ast.Constant):
            continue
        labels_node = node.args[2] if len(node.args) > 2 else None
        for keyword in node.keywords:
            if keyword.arg == "labelnames":
                labels_node = keyword.value
        labels = tuple(ast.literal_eval(labels_node)) if labels_node is not None else ()
        families[node.args[0].value] = (kind, labels)
    return families


def monitoring_families(path: Path = MONITORING_LIST) -> dict[str, tuple[str, tuple[str, ...]]]:
    families = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, labels = line.partition(" ")
            families[name] = ("Gauge", tuple(label.strip() for label in labels.split(",") if label.strip()))
    return families


def exported_families() -> dict[str, tuple[str, tuple[str, ...]]]:
    families = {}
    for path in INSTRUMENTED:
        families.update(instrumented_families(path))
    families.update(monitoring_families())
    return families


def exported_series(families: dict[str, tuple[str, tuple[str, ...]]] | None = None) -> dict[str, frozenset[str]]:
    """``{series name: its labels}`` as Prometheus stores them: counters end in ``_total``,
    histograms are ``_bucket`` (with ``le``), ``_sum`` and ``_count``; every one has job and instance."""
    series = {}
    for family, (kind, labels) in (families or exported_families()).items():
        for suffix in _KINDS[kind]:
            extra = {"le"} if suffix == "_bucket" else set()
            series[family + suffix] = frozenset(labels) | TARGET_LABELS | extra
    for name, labels in PROMETHEUS_SERIES.items():
        series[name] = labels | TARGET_LABELS
    return series


def family_of(series: str, families) -> str | None:
    for family, (kind, _) in families.items():
        if any(series == family + suffix for suffix in _KINDS[kind]):
            return family
    return None


# ---- PromQL selectors ---------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<number>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?:ms|[smhdwy])*(?:\d+(?:ms|[smhdwy]))*)
  | (?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){}\[\],@])
  | (?P<space>\s+)
  | (?P<other>.)
    """,
    re.VERBOSE,
)
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or", "unless"}
_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_CONSTANTS = {"inf", "nan"}
# May take their grouping before their argument: `sum by (model) (...)`.
_AGGREGATIONS = {
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "count",
    "count_values",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
}


@dataclass(frozen=True)
class Selector:
    metric: str
    labels: tuple[str, ...]  # the label names of its matchers


def _tokens(expr: str) -> list[tuple[str, str]]:
    out = []
    for match in _TOKEN.finditer(expr):
        kind = match.lastgroup
        if kind == "other":
            raise ValueError(f"PromQL: unexpected character {match.group()!r} in {expr!r}")
        if kind != "space":
            out.append((kind, match.group()))
    return out


def selectors(expr: str) -> list[Selector]:
    """The metric selectors of an expression: names outside label lists and braces that are
    not functions, keywords or constants, with the label names their matchers use."""
    tokens = _tokens(expr)
    found = []
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else None
        if kind == "name" and text.lower() in _LABEL_LISTS and following == "(":
            i = _closing(tokens, i + 1, "(", ")") + 1
            continue
        if (
            kind == "name"
            and text.lower() not in _KEYWORDS
            and (following == "(" or (text.lower() in _AGGREGATIONS and str(following).lower() in ("by", "without")))
        ):
            i += 1  # a function call or an aggregation
            continue
        if kind == "name" and text.lower() not in _KEYWORDS and text.lower() not in _CONSTANTS:
            labels: tuple[str, ...] = ()
            if following == "{":
                end = _closing(tokens, i + 1, "{", "}")
                labels = _matcher_labels(tokens[i + 2 : end])
                i = end
            found.append(Selector(text, labels))
        elif text == "{":
            raise ValueError(f"PromQL: a selector without a metric name in {expr!r} (name the metric)")
        i += 1
    return found


def _closing(tokens, start: int, opening: str, closing: str) -> int:
    depth = 0
    for j in range(start, len(tokens)):
        if tokens[j][1] == opening:
            depth += 1
        elif tokens[j][1] == closing:
            depth -= 1
            if depth == 0:
                return j
    raise ValueError(f"PromQL: unbalanced {opening!r}")


def _matcher_labels(tokens) -> tuple[str, ...]:
    return tuple(
        text
        for j, (kind, text) in enumerate(tokens)
        if kind == "name" and j + 1 < len(tokens) and tokens[j + 1][1] in ("=", "!=", "=~", "!~")
    )


def grouping_labels(expr: str) -> list[tuple[str, ...]]:
    """The label lists of every ``by (...)`` in an expression."""
    tokens = _tokens(expr)
    lists = []
    for i, (kind, text) in enumerate(tokens):
        if kind == "name" and text.lower() == "by" and i + 1 < len(tokens) and tokens[i + 1][1] == "(":
            end = _closing(tokens, i + 1, "(", ")")
            lists.append(tuple(t for k, t in tokens[i + 2 : end] if k == "name"))
    return lists


def recorded_labels(record: str) -> frozenset[str]:
    """The labels a recording rule keeps, from its name's level (``model_version_alias:...``)."""
    level = record.split(":", 1)[0]
    return frozenset(level.split("_")) if level else frozenset()


def unknown_names(where: str, expr: str, series: dict[str, frozenset[str]], recorded: set[str]) -> list[str]:
    """Problems of one expression: metrics neither exported nor recorded, and matchers on
    labels the series does not have."""
    problems = []
    for selector in selectors(expr):
        if selector.metric in recorded:
            allowed = recorded_labels(selector.metric)
        elif selector.metric in series:
            allowed = series[selector.metric]
        else:
            problems.append(f"{where}: metric {selector.metric!r} is neither exported by Keel nor recorded by a rule")
            continue
        for label in selector.labels:
            if label not in allowed:
                problems.append(
                    f"{where}: {selector.metric} has no label {label!r} (it has: {', '.join(sorted(allowed))})"
                )
    return problems


# ---- the rules ----------------------------------------------------------------------------


def rule_files() -> list[Path]:
    return sorted((PROMETHEUS / "rules").glob("*.yml"))


def rules() -> list[dict]:
    """Every rule of every file, with its group's name under ``_group``."""
    out = []
    for path in rule_files():
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                out.append({**rule, "_group": group["name"], "_file": path.name})
    return out


def rules_file(exprs: dict[str, str]) -> str:
    """A rules file recording each expression under its key: ``promtool check rules`` parses them."""
    return yaml.safe_dump(
        {"groups": [{"name": "expressions", "rules": [{"record": k, "expr": v} for k, v in exprs.items()]}]}
    )
