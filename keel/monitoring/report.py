"""The drift report: one self-contained HTML page per model and window, drawn from ``monitoring.drift``.

The page holds the window's verdict, a table of every feature's statistics, the drifted
share over time, and per target a histogram of reference against current and its judged
statistic over time with the threshold drawn in. Plots are inline SVG, so the file opens
anywhere (from the Dagster UI's link, a CI artifact, an e-mail) with nothing to fetch.
Everything comes from the table's rows, so a report of any past window can be drawn again.

``log_report`` puts a written report into MLflow as an artifact of the training run of the
version it judges, and returns the MLflow UI page that shows it: a browser opens an http link
from the Dagster UI, never a file:// one.

"Most drifted" orders targets by how many times over its drift threshold the judged statistic
is (``times_threshold``), so PSI, Jensen-Shannon and p-values rank on one scale; the check's
message, the report's table and the UI's plots all use that order.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

import pyarrow as pa
import pyarrow.compute as pc

from keel.monitoring.declarations import STATISTICS

if TYPE_CHECKING:
    from keel.config import Settings
    from keel.monitoring.drift import TargetDrift

LEVEL_COLOURS = {"drift": "#c0392b", "warn": "#d68910", "ok": "#1e8449", "unknown": "#7f8c8d"}
REFERENCE_COLOUR, CURRENT_COLOUR = "#5d6d7e", "#2e86c1"
ORDER = {"drift": 0, "warn": 1, "unknown": 2, "ok": 3}
# Reports logged to MLflow live under this folder of the version's training run.
ARTIFACT_FOLDER = "drift_reports"


class ReportLogError(RuntimeError):
    """The report could not be logged to MLflow; the message names the model, version, store and cause."""


@dataclass(frozen=True)
class LoggedReport:
    """Where a report was logged: the run, the artifact's path in it, and the MLflow UI page showing it."""

    run_id: str
    experiment_id: str
    artifact_path: str
    url: str

    @property
    def artifact_uri(self) -> str:
        return f"runs:/{self.run_id}/{self.artifact_path}"


def render(
    history: pa.Table, *, model: str, window_start: dt.datetime | None = None, version: int | None = None
) -> str:
    """The report of ``model``'s window (default: the latest in ``history``) as HTML."""
    rows = _rows_of(history, model)
    if not rows:
        raise ValueError(
            f"drift report: monitoring.drift has no rows for model {model!r}; run its drift monitoring first "
            f"(the monitor_{model} job, or backfill monitoring/{model}_drift)"
        )
    starts = sorted({r["window_start"] for r in rows})
    start = window_start or starts[-1]
    current = [r for r in rows if r["window_start"] == start]
    if not current:
        shown = ", ".join(s.isoformat() for s in starts[-5:])
        raise ValueError(f"drift report: model {model!r} has no window starting {start.isoformat()} (latest: {shown})")
    versions = sorted({r["version"] for r in current})
    version = version if version is not None else versions[-1]
    current = [r for r in current if r["version"] == version]
    dataset = next((r for r in current if r["target"] == "dataset"), None)
    targets = sorted(
        (r for r in current if r["target"] != "dataset"), key=lambda r: (r["target"] != "feature", *_rank(r))
    )
    over_time = _series(rows, version)
    parts = [
        _head(model, version, start, current[0]["window_end"], dataset, current[0]),
        _summary_table(targets),
        "<h2>Share of features drifted, by window</h2>",
        _line_chart(over_time.get(("dataset", "share_drifted"), []), dataset["threshold"] if dataset else None),
        "<h2>Each target</h2>",
    ]
    for r in targets:
        parts.append(_target_section(r, over_time.get((r["target"], r["name"]), [])))
    return _page(f"Drift: {model} v{version}, {start:%Y-%m-%d %H:%M}", "\n".join(parts))


def plots_markdown(history: pa.Table, *, model: str, window_start: dt.datetime, version: int, top: int = 4) -> str:
    """The report's main plots as Markdown for the Dagster UI: the drifted share over time, then
    reference against current for the prediction and the ``top`` most drifted features.

    The images are SVG data URIs, which the UI's Markdown renderer shows inline, so the plots
    open from the materialization with nothing to serve.
    """
    rows = _rows_of(history, model)
    current = [r for r in rows if r["window_start"] == window_start and r["version"] == version]
    over_time = _series(rows, version)
    dataset = next((r for r in current if r["target"] == "dataset"), None)
    threshold = dataset["threshold"] if dataset else None
    parts = [
        "**Share of features drifted, by window**"
        + (f" (dashed: the {_pct(threshold)} threshold)" if threshold is not None else ""),
        _image(_line_chart(over_time.get(("dataset", "share_drifted"), []), threshold)),
    ]
    features = sorted((r for r in current if r["target"] == "feature"), key=_rank)
    shown = [r for r in current if r["target"] == "prediction"] + features[:top]
    for r in shown:
        plot = json.loads(r["plot"]) if r["plot"] else {}
        parts.append(
            f"**{r['target']}: {r['name']}**, {r['level']} ({r['statistic']} {_fmt(r['value'])}, threshold "
            f"{_fmt(r['threshold'])}): reference (grey) against current (blue)"
        )
        parts.append(_image(_histogram(plot)))
    return "\n\n".join(parts)


def times_threshold(statistic: str, value: float | None, threshold: float | None) -> float | None:
    """How many times over its drift threshold ``value`` is: ``value / threshold`` for a statistic
    where larger is worse (PSI, KS, Wasserstein, Jensen-Shannon), ``threshold / value`` for a
    p-value. 1 is at the threshold, 3 three times past it; None when there is no value to judge."""
    if value is None or threshold is None or value != value:
        return None
    worse, bound = (value, threshold) if STATISTICS[statistic][1] else (threshold, value)
    if bound <= 0:
        return math.inf if worse > 0 else 1.0
    return worse / bound


def most_drifted(targets: Sequence[TargetDrift]) -> list[TargetDrift]:
    """``targets`` from the furthest past its threshold to the least (``times_threshold``), then by name."""
    return sorted(
        targets,
        key=lambda t: (_descending(times_threshold(t.threshold.statistic, t.value, t.threshold.threshold)), t.name),
    )


def _rank(row: dict) -> tuple[int, float, str]:
    """A ``monitoring.drift`` row's place in a report: by level, then as ``most_drifted`` orders."""
    known = row["statistic"] in STATISTICS
    times = times_threshold(row["statistic"], row["value"], row["threshold"]) if known else None
    return (ORDER.get(row["level"], 9), _descending(times), row["name"])


def _descending(times: float | None) -> float:
    # Rounded, so ratios equal but for float noise (0.6 / 0.2 against 0.75 / 0.25) tie and go by name.
    return math.inf if times is None else -round(times, 9)


def _rows_of(history: pa.Table, model: str) -> list[dict]:
    return history.filter(pc.equal(history.column("model"), model)).to_pylist()


def _image(svg: str) -> str:
    if not svg.startswith("<svg"):
        return svg
    return f"![plot](data:image/svg+xml;base64,{base64.b64encode(svg.encode()).decode()})"


def _svg_attributes(width: int, height: int) -> str:
    # The namespace lets the same markup stand alone as an image (a data URI), not only inline in a page.
    return f"xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img'"


def write(history: pa.Table, path: Path, **kwargs) -> Path:
    """Render and write atomically (a reader never sees half a page)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(render(history, **kwargs), encoding="utf-8")
    tmp.replace(path)
    return path


def report_path(home: Path, model: str, window_start: dt.datetime) -> Path:
    return home / "reports" / "drift" / model / f"{window_start:%Y-%m-%dT%H%M}.html"


def artifact_path(model: str, window_start: dt.datetime) -> str:
    """The report's path in the run: one per model and window, so a rerun of the window replaces it."""
    return f"{ARTIFACT_FOLDER}/{model}/{window_start:%Y-%m-%dT%H%M}.html"


def artifact_url(ui_url: str, experiment_id: str, run_id: str, path: str) -> str:
    """The MLflow UI page of a run with its artifacts tab open on ``path``.

    Read from MLflow 3.17's UI build (server/js/build): it routes on the URL's fragment (a hash
    router, as MLflow's own "View run at" links ``<ui>/#/experiments/<id>/runs/<run>`` show); the
    run page's route ``/experiments/:experimentId/runs/:runUuid/*`` opens the artifacts tab for
    ``artifacts/...`` (or the older ``artifactPath/...``) and preselects the file after it, the form
    the UI's own ``getRunPageRoute(experiment, run, path)`` builds; and it shows ``.html`` artifacts
    rendered, in a sandboxed frame, fetched from ``<ui>/get-artifact?path=...&run_uuid=...``.
    """
    return (
        f"{ui_url.rstrip('/')}/#/experiments/{quote(experiment_id, safe='')}/runs/{quote(run_id, safe='')}"
        f"/artifacts/{quote(path, safe='/')}"
    )


def log_report(settings: Settings, path: Path, *, model: str, version: int, window_start: dt.datetime) -> LoggedReport:
    """Log the written report ``path`` (of ``model`` v``version``, window ``window_start``) into the
    version's training run at ``artifact_path``, replacing an earlier one, and return where it is.

    Raises ``ReportLogError`` when the version, its run or the artifact store cannot be reached
    or written; the report on disk is left as it is.
    """
    from keel.models.registry import get_version
    from keel.models.registry_client import mlflow_client

    artifact = artifact_path(model, window_start)
    run_id = None
    try:
        run_id = get_version(settings, model, version).run_id
        client = mlflow_client(settings)
        experiment_id = client.get_run(run_id).info.experiment_id
        client.log_text(run_id, path.read_text(encoding="utf-8"), artifact)
    except Exception as exc:  # MLflow raises its own, requests', boto's or OS errors for a store it cannot use
        run = f" (run {run_id})" if run_id else ""
        store, cause = _without_credentials(settings.mlflow_uri, settings.mlflow_uri, _first_line(exc))
        raise ReportLogError(
            f"drift report of model {model!r} v{version}{run}, window {window_start:%Y-%m-%d %H:%M}: could not log "
            f"{artifact} to MLflow at {store} ({type(exc).__name__}: {cause}); the report is still at "
            f"{path}; check that the MLflow store and its artifact store are reachable and writable, then rerun "
            "the window"
        ) from exc
    return LoggedReport(
        run_id=run_id,
        experiment_id=experiment_id,
        artifact_path=artifact,
        url=artifact_url(settings.mlflow_ui_url, experiment_id, run_id, artifact),
    )


def _without_credentials(uri: str, *texts: str) -> tuple[str, ...]:
    """``texts`` with the user and password of ``uri`` taken out: the message lands in run logs and
    metadata, and a database or server URI may carry a password (MLflow's errors repeat the URI)."""
    credentials = urlsplit(uri).netloc.rpartition("@")[0]
    return tuple(text.replace(f"{credentials}@", "") for text in texts) if credentials else texts


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "no message"


def _series(rows: list[dict], version: int) -> dict[tuple[str, str], list[tuple[dt.datetime, float | None, str]]]:
    out: dict[tuple[str, str], list] = {}
    for r in sorted(rows, key=lambda r: r["window_start"]):
        if r["version"] == version:
            out.setdefault((r["target"], r["name"]), []).append((r["window_start"], r["value"], r["level"]))
    return out


def _head(model, version, start, end, dataset, first) -> str:
    level = dataset["level"] if dataset else "unknown"
    share = (
        f"{dataset['value']:.0%} of features drifted (dataset drift at {dataset['threshold']:.0%})" if dataset else ""
    )
    notes = json.loads(dataset["plot"]).get("notes", []) if dataset and dataset["plot"] else []
    facts = [
        ("window", f"{start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC"),
        ("answers", f"{first['current_rows']:,} (compared: {first['sample_rows']:,})"),
        ("reference rows", f"{first['reference_rows']:,}"),
        ("computed", f"{first['computed_at']:%Y-%m-%d %H:%M} UTC, run {first['run_id']}"),
    ]
    lines = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in facts)
    return (
        f"<h1>{html.escape(model)} v{version} <span class='badge' style='background:{LEVEL_COLOURS[level]}'>"
        f"{html.escape(level)}</span></h1><p>{html.escape(share)}</p><table class='facts'>{lines}</table>"
        + "".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes)
    )


def _summary_table(targets: list[dict]) -> str:
    header = [
        "target",
        "name",
        "kind",
        "judged by",
        "value",
        "threshold",
        "level",
        "psi",
        "ks",
        "ks p",
        "wass.",
        "js",
        "chi2 p",
        "null ref/cur",
    ]
    body = []
    for r in targets:
        cells = [
            r["target"],
            f"<a href='#{_anchor(r)}'>{html.escape(r['name'])}</a>",
            r["kind"] or "",
            r["statistic"] or "",
            _fmt(r["value"]),
            _fmt(r["threshold"]),
            f"<b style='color:{LEVEL_COLOURS.get(r['level'], '#000')}'>{r['level']}</b>",
            *(_fmt(r[k]) for k in ("psi", "ks", "ks_pvalue", "wasserstein_norm", "js", "chi2_pvalue")),
            f"{_pct(r['reference_null_rate'])} / {_pct(r['current_null_rate'])}",
        ]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in header)
    return f"<table class='grid'><tr>{head}</tr>{''.join(body)}</table>"


def _target_section(r: dict, series: list) -> str:
    plot = json.loads(r["plot"]) if r["plot"] else {}
    new = json.loads(r["new_categories"] or "[]")
    extra = f"<p>new categories: {html.escape(', '.join(map(str, new[:20])))}</p>" if new else ""
    return (
        f"<section id='{_anchor(r)}'><h3>{html.escape(r['target'])}: {html.escape(r['name'])} "
        f"<small style='color:{LEVEL_COLOURS.get(r['level'], '#000')}'>{r['level']} "
        f"({html.escape(r['statistic'] or '')} {_fmt(r['value'])}, threshold {_fmt(r['threshold'])})</small></h3>"
        f"<div class='row'>{_histogram(plot)}{_line_chart(series, r['threshold'])}</div>{extra}</section>"
    )


def _histogram(plot: dict, width: int = 420, height: int = 180) -> str:
    """Reference and current shares side by side per bin (numeric) or category."""
    if "categories" in plot:
        labels = [str(c) for c in plot["categories"]]
        ref, cur = _shares(plot["reference"]), _shares(plot["current"])
    elif plot.get("edges"):
        edges = plot["edges"]
        labels = [f"{_fmt(edges[i])}" for i in range(len(edges) - 1)]
        ref, cur = [v or 0.0 for v in plot["reference"]], [v or 0.0 for v in plot["current"]]
    else:
        return "<p>no values to plot</p>"
    n = max(len(labels), 1)
    top = max([*ref, *cur, 1e-12])
    slot = (width - 40) / n
    bars = []
    for i in range(len(labels)):
        for j, (values, colour) in enumerate(((ref, REFERENCE_COLOUR), (cur, CURRENT_COLOUR))):
            value = values[i] if i < len(values) else 0.0
            h = (height - 40) * value / top
            x = 30 + i * slot + j * slot / 2
            bars.append(
                f"<rect x='{x:.1f}' y='{height - 20 - h:.1f}' width='{max(slot / 2 - 1, 1):.1f}' height='{h:.1f}' "
                f"fill='{colour}'><title>{html.escape(labels[i])}: {value:.3f}</title></rect>"
            )
    ticks = "".join(
        f"<text x='{30 + i * slot:.1f}' y='{height - 5}' font-size='9'>{html.escape(labels[i][:10])}</text>"
        for i in range(0, len(labels), max(1, len(labels) // 6))
    )
    legend = (
        f"<text x='30' y='12' font-size='11' fill='{REFERENCE_COLOUR}'>reference</text>"
        f"<text x='110' y='12' font-size='11' fill='{CURRENT_COLOUR}'>current</text>"
    )
    return f"<svg {_svg_attributes(width, height)}>{legend}{''.join(bars)}{ticks}</svg>"


def _line_chart(series: list, threshold: float | None, width: int = 420, height: int = 180) -> str:
    """The judged statistic by window, coloured by level, with the threshold as a dashed line."""
    points = [(t, v, level) for t, v, level in series if v is not None]
    if not points:
        return "<p>no history yet</p>"
    values = [v for _, v, _ in points] + ([threshold] if threshold is not None else [])
    lo, hi = min(0.0, *values), max(values) or 1.0
    t0, t1 = points[0][0].timestamp(), points[-1][0].timestamp()
    span = (t1 - t0) or 1.0

    def xy(t, v):
        return 40 + (width - 50) * (t.timestamp() - t0) / span, height - 25 - (height - 40) * (v - lo) / (
            (hi - lo) or 1.0
        )

    path = " ".join(
        f"{'M' if i == 0 else 'L'}{x:.1f},{y:.1f}" for i, (x, y) in enumerate(xy(t, v) for t, v, _ in points)
    )
    dots = "".join(
        f"<circle cx='{x:.1f}' cy='{y:.1f}' r='3' fill='{LEVEL_COLOURS.get(level, '#000')}'>"
        f"<title>{t:%Y-%m-%d %H:%M}: {v:.4g} ({level})</title></circle>"
        for (t, v, level), (x, y) in ((p, xy(p[0], p[1])) for p in points)
    )
    line = ""
    if threshold is not None:
        _, y = xy(points[0][0], threshold)
        line = f"<line x1='40' x2='{width - 10}' y1='{y:.1f}' y2='{y:.1f}' stroke='#c0392b' stroke-dasharray='4 3'/>"
    axis = (
        f"<text x='2' y='{height - 25}' font-size='9'>{_fmt(lo)}</text><text x='2' y='20' font-size='9'>{_fmt(hi)}</text>"
        f"<text x='40' y='{height - 5}' font-size='9'>{points[0][0]:%m-%d}</text>"
        f"<text x='{width - 50}' y='{height - 5}' font-size='9'>{points[-1][0]:%m-%d}</text>"
    )
    return (
        f"<svg {_svg_attributes(width, height)}>{line}<path d='{path}' fill='none' stroke='#34495e'/>{dots}{axis}</svg>"
    )


def _shares(counts: list) -> list[float]:
    total = sum(c or 0 for c in counts)
    return [(c or 0) / total if total else 0.0 for c in counts]


def _anchor(r: dict) -> str:
    return "t-" + "".join(ch if ch.isalnum() else "-" for ch in f"{r['target']}-{r['name']}")


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _pct(value) -> str:
    return "" if value is None else f"{value:.1%}"


def _page(title: str, body: str) -> str:
    style = (
        "body{font-family:system-ui,sans-serif;margin:24px;color:#222}"
        "table.grid{border-collapse:collapse;font-size:12px}"
        "table.grid td,table.grid th{border:1px solid #ddd;padding:3px 6px;text-align:right}"
        "table.grid td:nth-child(2){text-align:left}"
        "table.facts th{text-align:left;padding-right:12px}"
        ".badge{color:#fff;border-radius:4px;padding:2px 8px;font-size:14px}"
        ".row{display:flex;gap:24px;flex-wrap:wrap}.note{color:#7f8c8d}"
        "section{border-top:1px solid #eee;margin-top:12px}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{body}</body></html>"
    )
