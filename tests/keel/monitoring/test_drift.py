"""Drift of logged traffic against a version's reference sample: verdicts, rows, the HTML report."""

import base64
import datetime as dt
import json
import re
from xml.etree import ElementTree

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from keel.models.reference import LABEL, LABEL_TS, PREDICTION, SPLIT
from keel.models.spec import ModelSpec
from keel.monitoring import report as drift_report
from keel.monitoring.declarations import MonitorSpec, Threshold, replace_window
from keel.monitoring.drift import DRIFT_TABLE, SCHEMA, compare_window, drift_rows, parse_features
from tests.factories.drift import START, reference, traffic

END = START + dt.timedelta(days=1)


@pytest.fixture
def monitor(buyer, outcomes) -> MonitorSpec:
    spec = ModelSpec(name="churn", entity=buyer, features=("spend",), labels=outcomes, label="churned")
    return MonitorSpec(spec, min_rows=100)


def test_traffic_like_the_reference_is_not_flagged(monitor):
    report = compare_window(monitor, 1, START, END, traffic(2000, 7), reference(), {})

    assert report.judged and report.level == "ok"
    assert report.drift_share == 0.0 and not report.dataset_drift
    assert {f.name: f.kind for f in report.features} == {
        "amount": "numeric",
        "items": "numeric",
        "currency": "categorical",
        "is_new": "categorical",
    }
    assert all(f.level == "ok" for f in report.features)
    assert report.prediction.level == "ok"


def test_a_planted_shift_is_flagged_on_the_features_that_moved(monitor):
    shifted = traffic(2000, 7, shift=10.0, currency_p=(0.2, 0.3, 0.5))
    report = compare_window(monitor, 1, START, END, shifted, reference(), {})

    levels = {f.name: f.level for f in report.features}
    assert levels == {"amount": "drift", "currency": "drift", "items": "ok", "is_new": "ok"}
    assert report.drift_share == 0.5 and report.dataset_drift and report.level == "drift"
    amount = next(f for f in report.features if f.name == "amount")
    assert amount.threshold.statistic == "psi" and amount.value > 0.2
    assert amount.stats.ks_pvalue < 1e-6 and amount.current_mean == pytest.approx(60, abs=1)


def test_importance_weighting_and_per_feature_thresholds(monitor):
    shifted = traffic(2000, 7, shift=10.0, currency_p=(0.2, 0.3, 0.5))
    weighted = MonitorSpec(monitor.model, weighted=True, min_rows=100)
    importances = {"amount": 0.05, "currency": 0.05, "items": 0.6, "is_new": 0.3}
    report = compare_window(weighted, 1, START, END, shifted, reference(), importances)
    assert report.drift_share == pytest.approx(0.1) and report.level == "warn"

    # A looser threshold of its own keeps one feature from counting; a p-value threshold works reversed.
    own = MonitorSpec(
        monitor.model,
        min_rows=100,
        features={"amount": Threshold("psi", 50.0), "currency": Threshold("chi2_pvalue", 1e-3)},
    )
    report = compare_window(own, 1, START, END, shifted, reference(), {})
    levels = {f.name: f.level for f in report.features}
    assert levels["amount"] == "ok" and levels["currency"] == "drift"


def test_a_window_with_few_answers_is_reported_not_judged(monitor):
    report = compare_window(monitor, 1, START, END, traffic(40, 7, shift=30.0), reference(), {})
    assert not report.judged and report.level == "unknown" and not report.dataset_drift
    rows = drift_rows([report], "run-1")
    assert set(rows.column("level").to_pylist()) == {"unknown"}


def test_large_windows_are_sampled_with_a_fixed_seed(monitor):
    sampled = MonitorSpec(monitor.model, sample_rows=500)
    log = traffic(3000, 7)
    first = compare_window(sampled, 1, START, END, log, reference(), {})
    again = compare_window(sampled, 1, START, END, log, reference(), {})
    assert (first.rows, first.sample_rows) == (3000, 500)
    assert [f.value for f in first.features] == [f.value for f in again.features]


def test_labels_that_arrived_are_compared_with_the_training_labels(monitor):
    labels = pa.table({"user_id": ["a"] * 400, "churned": np.arange(400) % 2 == 0})
    report = compare_window(monitor, 1, START, END, traffic(500, 3), reference(), {}, labels)
    assert report.label is not None and report.label.kind == "categorical"
    assert report.label.level == "drift" and report.label_rows == 400  # 50% churn against 20% in training
    none_yet = compare_window(monitor, 1, START, END, traffic(500, 3), reference(), {}, labels.slice(0, 0))
    assert none_yet.label is None


def test_logged_vectors_parse_to_typed_columns_and_bad_values_become_null():
    features = pa.array(
        [
            json.dumps({"amount": 1.5, "currency": "EUR", "is_new": True, "odd name": 2}),
            json.dumps({"amount": None, "currency": None, "is_new": False}),
            json.dumps({"amount": "not a number", "currency": 7}),
        ]
    )
    kinds = {"amount": "numeric", "currency": "categorical", "is_new": "categorical", "odd name": "numeric"}
    out = parse_features(features, kinds)
    assert out.column("amount").to_pylist() == [1.5, None, None]
    assert out.column("currency").to_pylist() == ["EUR", None, "7"]
    assert out.column("is_new").to_pylist() == ["true", "false", None]
    assert out.column("odd name").to_pylist() == [2.0, None, None]


def test_rows_replace_their_window_and_leave_other_models_alone(monitor, lake):
    report = compare_window(monitor, 1, START, END, traffic(300, 5, shift=10.0), reference(), {})
    rows = drift_rows([report], "run-1")
    assert rows.schema == SCHEMA
    assert rows.num_rows == 4 + 2  # four features, the prediction, the dataset verdict
    dataset = rows.filter(pc.equal(rows.column("target"), "dataset")).to_pylist()[0]
    assert dataset["value"] == report.drift_share and dataset["level"] == report.level

    replace_window(lake, DRIFT_TABLE, SCHEMA, "churn", START, END, rows, "run-1")
    other = drift_rows([compare_window(monitor, 1, START, END, traffic(300, 6), reference(), {})], "run-2")
    other = other.set_column(other.schema.get_field_index("model"), "model", pa.array(["fraud"] * other.num_rows))
    other = other.cast(SCHEMA)
    replace_window(lake, DRIFT_TABLE, SCHEMA, "fraud", START, END, other, "run-2")
    replace_window(lake, DRIFT_TABLE, SCHEMA, "churn", START, END, rows, "run-3")

    stored = lake.read(DRIFT_TABLE)
    counts = {m: stored.filter(pc.equal(stored.column("model"), m)).num_rows for m in ("churn", "fraud")}
    assert counts == {"churn": rows.num_rows, "fraud": other.num_rows}


def test_the_html_report_shows_the_verdict_every_target_and_the_history(monitor):
    days = []
    for i, shift in enumerate((0.0, 0.0, 10.0)):
        start = START + dt.timedelta(days=i)
        log = traffic(500, i, shift=shift, currency_p=(0.2, 0.3, 0.5) if shift else (0.5, 0.3, 0.2))
        days.append(compare_window(monitor, 1, start, start + dt.timedelta(days=1), log, reference(), {}))
    history = drift_rows(days, "run-1")

    page = drift_report.render(history, model="churn")
    assert "<svg" in page and page.count("<section") == 5  # four features and the prediction
    assert "churn v1" in page and ">drift<" in page and "2026-05-03 00:00" in page
    earlier = drift_report.render(history, model="churn", window_start=START)
    assert ">ok<" in earlier
    with pytest.raises(ValueError, match="no rows for model 'fraud'"):
        drift_report.render(history, model="fraud")
    with pytest.raises(ValueError, match="no window starting"):
        drift_report.render(history, model="churn", window_start=START - dt.timedelta(days=9))


def test_the_plots_for_the_dagster_ui_are_standalone_svg_images_most_drifted_first(monitor):
    days = []
    for i, shift in enumerate((0.0, 10.0)):
        start = START + dt.timedelta(days=i)
        log = traffic(500, i, shift=shift, currency_p=(0.2, 0.3, 0.5) if shift else (0.5, 0.3, 0.2))
        days.append(compare_window(monitor, 1, start, start + dt.timedelta(days=1), log, reference(), {}))
    history = drift_rows(days, "run-1")

    text = drift_report.plots_markdown(
        history, model="churn", window_start=START + dt.timedelta(days=1), version=1, top=2
    )

    titles = re.findall(r"^\*\*(.+?)\*\*", text, flags=re.M)
    assert titles[0] == "Share of features drifted, by window"
    assert titles[1:] == ["prediction: prediction", "feature: amount", "feature: currency"]
    images = re.findall(r"!\[plot\]\(data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)\)", text)
    assert len(images) == 4
    for encoded in images:
        root = ElementTree.fromstring(base64.b64decode(encoded))
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
    bars = ElementTree.fromstring(base64.b64decode(images[2])).findall("{http://www.w3.org/2000/svg}rect")
    assert len(bars) >= 4  # reference and current per bin


def test_report_text_is_escaped(monitor):
    sample = reference().rename_columns(
        ["<b>amount", "items", "currency", "is_new", LABEL, LABEL_TS, SPLIT, PREDICTION]
    )
    log = traffic(300, 1)
    vectors = [json.loads(v) for v in log.column("features").to_pylist()]
    for v in vectors:
        v["<b>amount"] = v.pop("amount")
    log = log.set_column(2, "features", pa.array([json.dumps(v) for v in vectors]))
    page = drift_report.render(
        drift_rows([compare_window(monitor, 1, START, END, log, sample, {})], "r"), model="churn"
    )
    assert "<b>amount" not in page and "&lt;b&gt;amount" in page
