"""Live performance: the delayed-label join, the metrics and calibration, and the verdict against training."""

import datetime as dt
import json

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics

from keel.models.reference import HOLDOUT, LABEL, PREDICTION, SPLIT, TRAIN
from keel.models.spec import ModelError
from keel.monitoring.declarations import MonitorSpec
from keel.monitoring.performance import (
    SCHEMA,
    PerformanceReport,
    labelled_predictions,
    metrics_of,
    performance_rows,
    reliability,
    window_performance,
)

START = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
END = START + dt.timedelta(days=1)
WEEK = dt.timedelta(days=7)
US = dt.timedelta(microseconds=1)
TS = pa.timestamp("us", tz="UTC")


def answers(entities, times, predictions, versions=None) -> pa.Table:
    """Logged answers as the performance job reads them from the inference log."""
    return pa.table(
        {
            "entity_id": pa.array(entities, pa.string()),
            "ts": pa.array(times, TS),
            "version": pa.array(versions or [1] * len(entities), pa.int64()),
            "prediction": pa.array(predictions, pa.float64()),
        }
    )


def label_events(users, times, values, column="churned") -> pa.Table:
    """Rows of the outcomes label source: who, when, and the outcome (None for an unknown one)."""
    kind = pa.bool_() if column == "churned" else pa.float64()
    return pa.table(
        {"user_id": pa.array(users, pa.string()), "event_ts": pa.array(times, TS), column: pa.array(values, kind)}
    )


def sample(labels, predictions, split) -> pa.Table:
    """A version's reference sample, reduced to what performance reads: label, split and score."""
    return pa.table(
        {LABEL: labels, SPLIT: pa.array(split, pa.string()), PREDICTION: pa.array(predictions, pa.float64())}
    )


def perfect_holdout(n: int = 40) -> pa.Table:
    """A hold-out the model ranked perfectly (AUC 1.0), beside training rows ranked exactly backwards."""
    y = np.arange(n) % 2 == 0
    score = np.where(y, 0.9, 0.1)
    return sample(
        pa.array(np.concatenate([y, y])),
        np.concatenate([score, 1 - score]),
        [HOLDOUT] * n + [TRAIN] * n,
    )


def first_label_in_window(log: pa.Table, labels: pa.Table, label: str, window: dt.timedelta) -> list[tuple]:
    """The join's rule, written as a loop: the earliest non-NULL label of the entity timed in [ts, ts + window]."""
    out = []
    events = labels.to_pylist()
    for row in log.to_pylist():
        later = [
            e
            for e in events
            if e["user_id"] == row["entity_id"] and e[label] is not None and e["event_ts"] >= row["ts"]
        ]
        first = min(later, key=lambda e: e["event_ts"], default=None)
        value = first[label] if first is not None and first["event_ts"] <= row["ts"] + window else None
        out.append((row["entity_id"], row["ts"], row["prediction"], value))
    return sorted(out, key=_order)


def _order(row: tuple) -> tuple:
    return row[:3]


def joined_rows(joined: pa.Table) -> list[tuple]:
    return sorted(
        ((r["entity_id"], r["ts"], r["prediction"], r["label"]) for r in joined.to_pylist()),
        key=_order,
    )


# The delayed-label join --------------------------------------------------------------------------


def test_each_prediction_gets_the_first_label_after_it_within_the_window():
    t = START + dt.timedelta(hours=3)
    cases = {
        # user: (label times relative to the prediction, their values) -> the label the prediction gets
        "at_once": ([dt.timedelta(0)], [True], True),
        "earlier_known": ([-US, dt.timedelta(days=1)], [True, False], False),
        "only_earlier": ([-dt.timedelta(days=2), -US], [True, True], None),
        "window_edge": ([WEEK], [True], True),
        "past_window": ([WEEK + US], [True], None),
        "unknown_first": ([dt.timedelta(hours=1), dt.timedelta(hours=2)], [None, True], True),
        "first_wins": ([dt.timedelta(days=2), dt.timedelta(days=1)], [True, False], False),
        "no_labels": ([], [], None),
    }
    users, times, values = [], [], []
    for user, (offsets, outcomes, _) in cases.items():
        users += [user] * len(offsets)
        times += [t + o for o in offsets]
        values += outcomes
    # Another entity's labels right after the prediction never count.
    users.append("someone_else")
    times.append(t)
    values.append(True)
    log = answers(list(cases), [t] * len(cases), [0.5] * len(cases))
    labels = label_events(users, times, values)

    joined = labelled_predictions(log, labels, ["user_id"], "churned", "event_ts", WEEK)

    assert joined.column_names == ["entity_id", "ts", "version", "prediction", "label"]
    got = dict(zip(joined.column("entity_id").to_pylist(), joined.column("label").to_pylist(), strict=True))
    assert got == {user: expected for user, (_, _, expected) in cases.items()}
    assert joined.num_rows == log.num_rows


def test_the_join_matches_a_brute_force_loop_on_seeded_data():
    rng = np.random.default_rng(11)
    users = np.array([f"u{i}" for i in range(12)])
    n, m = 300, 80
    pred_s = rng.choice(np.arange(0, 86_400 * 2, 60), size=n, replace=False)
    log = answers(
        users[rng.integers(0, 12, n)].tolist(),
        [START + dt.timedelta(seconds=int(s)) for s in pred_s],
        np.round(rng.random(n), 6).tolist(),
    )
    # Labels from three days before to twelve after, each identified by its value; a tenth unknown.
    label_s = rng.choice(np.arange(-86_400 * 3, 86_400 * 12, 60), size=m, replace=False)
    values = [None if rng.random() < 0.1 else float(i) for i in range(m)]
    labels = label_events(
        users[rng.integers(0, 12, m)].tolist(),
        [START + dt.timedelta(seconds=int(s)) for s in label_s],
        values,
        column="spend_next",
    )
    window = dt.timedelta(days=1)

    joined = labelled_predictions(log, labels, ["user_id"], "spend_next", "event_ts", window)

    expected = first_label_in_window(log, labels, "spend_next", window)
    assert joined_rows(joined) == expected
    # The data exercises every side of the rule: labelled, an earlier label passed over, none in the window yet.
    events = labels.to_pylist()
    earlier = [
        any(e["user_id"] == user and e["spend_next"] is not None and e["event_ts"] < ts for e in events)
        for user, ts, *_ in expected
    ]
    got = [v for *_, v in expected]
    assert sum(v is not None for v in got) > 50 and sum(v is None for v in got) > 50
    assert sum(e and v is not None for e, v in zip(earlier, got, strict=True)) > 10


@settings(max_examples=60, deadline=None)
@given(
    predictions=st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 20)), max_size=12),
    labels=st.lists(
        st.tuples(st.sampled_from("abcd"), st.integers(-5, 30), st.booleans()), max_size=15, unique_by=lambda x: x[:2]
    ),
    window_s=st.integers(0, 15),
)
def test_the_join_matches_the_brute_force_loop_on_any_small_case(predictions, labels, window_s):
    """Integer-second times on a small grid, so labels often fall exactly on a prediction or the window's edge."""
    log = answers(
        [e for e, _ in predictions],
        [START + dt.timedelta(seconds=s) for _, s in predictions],
        [float(i) for i in range(len(predictions))],
    )
    events = label_events(
        [e for e, _, _ in labels],
        [START + dt.timedelta(seconds=s) for _, s, _ in labels],
        [float(i) if known else None for i, (_, _, known) in enumerate(labels)],
        column="spend_next",
    )
    window = dt.timedelta(seconds=window_s)

    joined = labelled_predictions(log, events, ["user_id"], "spend_next", "event_ts", window)

    assert joined_rows(joined) == first_label_in_window(log, events, "spend_next", window)


def test_several_join_keys_match_the_logged_entity_id_in_sorted_key_order():
    # Serving logs a composite entity as its key values joined by '|' in sorted key order: shop_id, user_id.
    log = answers(["7|u1", "7|u2"], [START, START], [0.2, 0.8])
    labels = pa.table(
        {
            "user_id": ["u1", "u2", "u2"],
            "shop_id": pa.array([7, 8, 7], pa.int64()),
            "event_ts": pa.array([START + dt.timedelta(hours=1)] * 3, TS),
            "churned": [True, True, False],
        }
    )
    joined = labelled_predictions(log, labels, ["user_id", "shop_id"], "churned", "event_ts", WEEK)
    assert joined.column("label").to_pylist() == [True, False]


# Window metrics -----------------------------------------------------------------------------------


def seeded_window(n: int, seed: int, *, labelled_share: float = 0.8):
    """``n`` answers of version 1 over the window; most get a label an hour later, the rest none yet."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.35
    p = np.clip(np.where(y, rng.beta(4, 3, n), rng.beta(2, 5, n)), 0, 1).round(4)
    p[:3] = [0.5, 0.5, 0.0]  # on the decision threshold, and a hard zero
    times = [START + dt.timedelta(seconds=int(s)) for s in rng.choice(86_400, n, replace=False)]
    users = [f"u{i}" for i in range(n)]
    known = rng.random(n) < labelled_share
    known[:3] = True
    log = answers(users, times, p.tolist())
    labels = label_events(
        [u for u, k in zip(users, known, strict=True) if k],
        [t + dt.timedelta(hours=1) for t, k in zip(times, known, strict=True) if k],
        y[known].tolist(),
    )
    return log, labels, y[known].astype(int), p[known]


def test_classifier_metrics_equal_scikit_learn_on_the_labelled_rows_only(churn):
    log, labels, y, p = seeded_window(500, 3)
    holdout = perfect_holdout()
    monitor = MonitorSpec(churn)

    (report,) = window_performance(monitor, START, END, log, labels, {1: holdout})

    assert (report.model, report.version, report.metric) == ("churn", 1, "roc_auc")
    assert (report.predictions, report.labelled) == (500, len(y))
    assert 350 < len(y) < 450
    decided = p >= 0.5
    assert decided[:2].all() and (0 < y.sum() < len(y))
    expected = {
        "roc_auc": metrics.roc_auc_score(y, p),
        "average_precision": metrics.average_precision_score(y, p),
        "log_loss": metrics.log_loss(y, np.clip(p, 1e-15, 1 - 1e-15)),
        "accuracy": metrics.accuracy_score(y, decided),
        "precision": metrics.precision_score(y, decided),
        "recall": metrics.recall_score(y, decided),
        "brier": metrics.brier_score_loss(y, p),
        "positive_rate": y.mean(),
        "mean_prediction": p.mean(),
    }
    assert set(report.live) == set(expected) | {"ece"}
    for name, value in expected.items():
        assert report.live[name] == pytest.approx(value, rel=1e-12, abs=1e-15), name
    # Training is judged on the hold-out rows of the sample, never its training rows (ranked backwards).
    assert report.training["roc_auc"] == 1.0 and report.training["accuracy"] == 1.0
    assert report.training["precision"] == 1.0 and report.training["recall"] == 1.0


def test_regressor_metrics_equal_scikit_learn(spend):
    rng = np.random.default_rng(5)
    n = 200
    y = rng.normal(100, 20, n)
    p = y + rng.normal(0, 5, n)
    times = [START + dt.timedelta(minutes=i) for i in range(n)]
    users = [f"u{i}" for i in range(n)]
    log = answers(users, times, p.tolist())
    labels = label_events(users, [t + dt.timedelta(days=1) for t in times], y.tolist(), column="spend_next")
    holdout = sample(pa.array([1.0, 2.0, 3.0, 4.0]), [1.5, 2.5, 3.5, 4.5], [HOLDOUT] * 4)

    (report,) = window_performance(MonitorSpec(spend), START, END, log, labels, {1: holdout})

    assert set(report.live) == {"rmse", "mae", "r2"} and report.calibration == []
    assert report.live["rmse"] == pytest.approx(np.sqrt(metrics.mean_squared_error(y, p)), rel=1e-12)
    assert report.live["mae"] == pytest.approx(metrics.mean_absolute_error(y, p), rel=1e-12)
    assert report.live["r2"] == pytest.approx(metrics.r2_score(y, p), rel=1e-12)
    assert report.training == {"rmse": 0.5, "mae": 0.5, "r2": pytest.approx(0.8)}
    assert not report.higher_is_better


def brute_force_reliability(y, p) -> list[dict]:
    out = []
    for i in range(10):
        lo, hi = i / 10, (i + 1) / 10
        members = [(yi, pi) for yi, pi in zip(y, p, strict=True) if lo <= pi < hi or (i == 9 and pi == 1.0)]
        if members:
            out.append(
                {
                    "bin": f"[{lo:.1f}, {hi:.1f}{']' if i == 9 else ')'}",
                    "count": len(members),
                    "mean_prediction": sum(pi for _, pi in members) / len(members),
                    "observed_rate": sum(yi for yi, _ in members) / len(members),
                }
            )
    return out


def test_reliability_bins_and_ece_equal_a_brute_force_computation(churn):
    rng = np.random.default_rng(8)
    p = np.concatenate([rng.random(300) ** 2, [0.0, 0.1, 0.5, 0.95, 1.0, 1.0]])
    y = (rng.random(len(p)) < p).astype(int)

    live, table = metrics_of(churn, pa.chunked_array([y]), pa.chunked_array([p]))

    expected = brute_force_reliability(y.tolist(), p.tolist())
    assert [(b["bin"], b["count"]) for b in table] == [(b["bin"], b["count"]) for b in expected]
    for got, want in zip(table, expected, strict=True):
        assert got["mean_prediction"] == pytest.approx(want["mean_prediction"], rel=1e-12)
        assert got["observed_rate"] == pytest.approx(want["observed_rate"], rel=1e-12)
    assert table[0]["bin"] == "[0.0, 0.1)" and table[-1]["bin"] == "[0.9, 1.0]"
    assert sum(b["count"] for b in table) == len(p)
    ece = sum(b["count"] * abs(b["mean_prediction"] - b["observed_rate"]) for b in expected) / len(p)
    assert live["ece"] == pytest.approx(ece, rel=1e-12)


def test_reliability_of_a_small_hand_made_case():
    y = np.array([0, 1, 1, 0, 1])
    p = np.array([0.05, 0.15, 0.12, 0.9, 1.0])
    assert reliability(y, p) == [
        {"bin": "[0.0, 0.1)", "count": 1, "mean_prediction": 0.05, "observed_rate": 0.0},
        {"bin": "[0.1, 0.2)", "count": 2, "mean_prediction": pytest.approx(0.135), "observed_rate": 1.0},
        {"bin": "[0.9, 1.0]", "count": 2, "mean_prediction": 0.95, "observed_rate": 0.5},
    ]


def test_versions_are_judged_apart_and_unlabelled_answers_are_counted_not_scored(churn):
    t = START + dt.timedelta(hours=1)
    log = answers(
        ["a", "b", "c", "d", "e", "f"],
        [t] * 6,
        [0.9, 0.2, 0.8, 0.1, 0.6, 0.4],
        versions=[1, 1, 1, 1, 2, 2],
    )
    # a..d labelled for version 1; c's label predates its answer, so c stays unlabelled; version 2 has none.
    labels = label_events(
        ["a", "b", "c", "d"], [t, t + WEEK, t - US, t + dt.timedelta(days=1)], [True, False, True, True]
    )
    monitor = MonitorSpec(churn, min_labels=3)

    one, two = window_performance(monitor, START, END, log, labels, {1: perfect_holdout(), 2: perfect_holdout()})

    assert (one.version, one.predictions, one.labelled) == (1, 4, 3)
    assert one.live["roc_auc"] == 0.5  # a (0.9) and d (0.1) positive, b (0.2) negative: one of two pairs ordered
    assert one.live["mean_prediction"] == pytest.approx((0.9 + 0.2 + 0.1) / 3)
    assert one.level == "drop"
    assert (two.version, two.predictions, two.labelled, two.live) == (2, 2, 0, {})
    assert two.level == "unknown" and two.training["roc_auc"] == 1.0


def test_an_empty_window_has_no_reports(churn):
    empty = answers([], [], [])
    assert window_performance(MonitorSpec(churn), START, END, empty, label_events([], [], []), {}) == []


# The verdict against training ---------------------------------------------------------------------


def report(live, training, *, metric="roc_auc", higher_is_better=True, tolerance=0.25, labelled=100):
    return PerformanceReport(
        "churn", 1, metric, START, END, 120, labelled, 50, tolerance, higher_is_better,
        live={metric: live}, training={metric: training},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("live", "level"),
    [
        (0.9, "ok"),  # better than training
        (0.75, "ok"),
        (0.625, "ok"),  # a drop of exactly half the tolerance is not yet a warning
        (0.5625, "warn"),
        (0.5, "warn"),  # a drop of exactly the tolerance is a warning, not yet a drop
        (0.4375, "drop"),
        (0.0, "drop"),
    ],
)
def test_a_higher_is_better_metric_warns_past_half_the_tolerance_and_drops_past_it(live, level):
    r = report(live, 0.75)
    assert r.drop == 0.75 - live and r.level == level


@pytest.mark.parametrize(
    ("live", "level"),
    [(0.125, "ok"), (0.25, "ok"), (0.375, "ok"), (0.4375, "warn"), (0.5, "warn"), (0.5625, "drop")],
)
def test_a_lower_is_better_metric_is_judged_the_other_way(live, level):
    r = report(live, 0.25, metric="log_loss", higher_is_better=False)
    assert r.drop == live - 0.25 and r.level == level


def test_too_few_labels_or_an_undefined_metric_is_not_judged():
    assert report(0.0, 0.75, labelled=49).level == "unknown"
    assert report(0.0, 0.75, labelled=50).level == "drop"
    assert report(float("nan"), 0.75).level == "unknown" and report(float("nan"), 0.75).drop is None
    assert report(0.5, float("nan")).level == "unknown"
    missing = PerformanceReport("churn", 1, "roc_auc", START, END, 120, 100, 50, 0.25, True)
    assert missing.drop is None and missing.level == "unknown"


def test_the_monitor_sets_direction_tolerance_and_label_count_of_the_verdict(churn, spend):
    t = START + dt.timedelta(hours=2)
    users = ["a", "b", "c", "d"]
    log = answers(users, [t] * 4, [0.9, 0.3, 0.6, 0.1])
    labels = label_events(users, [t] * 4, [True, True, False, False])  # 3 of 4 pairs ordered: AUC 0.75
    holdout = {1: perfect_holdout()}
    levels = {
        tolerance: window_performance(
            MonitorSpec(churn, tolerance=tolerance, min_labels=4), START, END, log, labels, holdout
        )[0]
        for tolerance in (0.2, 0.3, 0.6)
    }
    assert {k: (r.live["roc_auc"], r.drop, r.level) for k, r in levels.items()} == {
        0.2: (0.75, 0.25, "drop"),
        0.3: (0.75, 0.25, "warn"),
        0.6: (0.75, 0.25, "ok"),
    }
    (few,) = window_performance(MonitorSpec(churn, tolerance=0.2, min_labels=5), START, END, log, labels, holdout)
    assert few.level == "unknown"

    # RMSE: lower is better. Training RMSE 0.5; live answers off by 1.0, 0.625 and 0.25.
    truth = [0.0, 1.0, 2.0, 3.0]
    train = {1: sample(pa.array(truth), [v + 0.5 for v in truth], [HOLDOUT] * 4)}
    spent = label_events(users, [t] * 4, truth, column="spend_next")
    got = {}
    for error in (1.0, 0.625, 0.25):
        off = answers(users, [t] * 4, [v + error for v in truth])
        (r,) = window_performance(MonitorSpec(spend, tolerance=0.2, min_labels=4), START, END, off, spent, train)
        got[error] = (r.live["rmse"], r.training["rmse"], r.level)
    assert got == {1.0: (1.0, 0.5, "drop"), 0.625: (0.625, 0.5, "warn"), 0.25: (0.25, 0.5, "ok")}


# Rows of monitoring.performance ---------------------------------------------------------------------


def test_rows_carry_the_verdict_on_the_model_metric_and_the_reliability_table_on_ece(churn):
    log, labels, _, _ = seeded_window(200, 4)
    silent = answers(["z"], [START], [0.4], versions=[2])
    log = pa.concat_tables([log, silent])
    reports = window_performance(
        MonitorSpec(churn, tolerance=0.05), START, END, log, labels, {1: perfect_holdout(), 2: perfect_holdout()}
    )

    rows = performance_rows(reports, "run-7")

    assert rows.schema == SCHEMA
    one = {r["metric"]: r for r in rows.to_pylist() if r["version"] == 1}
    assert set(one) == set(reports[0].live)
    assert one["roc_auc"]["level"] == reports[0].level == "drop"
    assert {r["level"] for m, r in one.items() if m != "roc_auc"} == {"info"}
    assert json.loads(one["ece"]["calibration"]) == reports[0].calibration
    assert all(r["calibration"] is None for m, r in one.items() if m != "ece")
    assert one["recall"]["value"] == reports[0].live["recall"] and one["recall"]["training_value"] == 1.0
    assert {(r["predictions"], r["labelled"], r["run_id"]) for r in one.values()} == {
        (200, reports[0].labelled, "run-7")
    }
    # A version with no label yet: its training values, no live values, not judged.
    two = {r["metric"]: r for r in rows.to_pylist() if r["version"] == 2}
    assert two["roc_auc"]["level"] == "unknown" and two["roc_auc"]["training_value"] == 1.0
    assert all(r["value"] is None for r in two.values()) and two["ece"]["calibration"] == "[]"


def test_undefined_metrics_are_written_as_null():
    r = PerformanceReport(
        "churn", 1, "roc_auc", START, END, 60, 60, 50, 0.05, True,
        live={"roc_auc": float("nan"), "precision": float("inf"), "recall": 0.5}, training={"roc_auc": 0.8},
    )  # fmt: skip
    rows = {row["metric"]: row for row in performance_rows([r], "run-1").to_pylist()}
    assert (rows["roc_auc"]["value"], rows["roc_auc"]["level"]) == (None, "unknown")
    assert rows["precision"]["value"] is None and rows["recall"]["value"] == 0.5
    assert rows["recall"]["training_value"] is None


# Bad input ----------------------------------------------------------------------------------------


def test_a_classification_label_that_is_not_0_or_1_names_the_model_the_values_and_the_fix(churn):
    t = START + dt.timedelta(hours=1)
    log = answers(["a", "b"], [t, t], [0.2, 0.7])
    labels = pa.table(
        {"user_id": ["a", "b"], "event_ts": pa.array([t, t], TS), "churned": pa.array([0, 3], pa.int64())}
    )
    with pytest.raises(ModelError, match=r"model 'churn': label 'churned' has values \[3\]; .* is 0/1 or bool"):
        window_performance(MonitorSpec(churn), START, END, log, labels, {1: perfect_holdout()})
