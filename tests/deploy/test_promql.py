"""The helpers the deploy checks rely on: if they read nothing, every check above them passes."""

import pytest

from tests.deploy.promql import (
    INSTRUMENTED,
    Selector,
    exported_series,
    grouping_labels,
    instrumented_families,
    monitoring_families,
    recorded_labels,
    selectors,
    unknown_names,
)


def test_the_source_reader_finds_serving_and_stream_metrics():
    serving, stream = (instrumented_families(path) for path in INSTRUMENTED)
    assert serving["keel_serving_request_seconds"] == ("Histogram", ("model", "version", "alias"))
    assert serving["keel_serving_requests"] == ("Counter", ("model", "version", "alias", "status"))
    assert serving["keel_serving_breaker_open"] == ("Gauge", ())
    assert stream["keel_stream_consumer_lag"] == ("Gauge", ("topic", "partition"))
    assert stream["keel_stream_events"] == ("Counter", ("source", "outcome"))
    assert len(serving) >= 9 and len(stream) >= 5


def test_the_stored_names_follow_prometheus_client():
    series = exported_series()
    assert series["keel_serving_requests_total"] == {"model", "version", "alias", "status", "job", "instance"}
    assert "le" in series["keel_stream_event_to_online_seconds_bucket"]
    assert "le" not in series["keel_stream_event_to_online_seconds_count"]
    assert "keel_serving_requests" not in series
    assert series["keel_drift_score"] == {"model", "version", "feature", "statistic", "job", "instance"}


def test_the_monitoring_list_parses():
    families = monitoring_families()
    assert families["keel_feature_null_rate"] == ("Gauge", ("table", "column"))
    assert families["keel_monitoring_up"] == ("Gauge", ())
    assert len(families) == 12


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        (
            'histogram_quantile(0.99, sum by (model, le) (rate(keel_serving_online_seconds_bucket{model=~"churn"}[5m])))',
            [Selector("keel_serving_online_seconds_bucket", ("model",))],
        ),
        (
            "a / on (model) group_left (alias) b offset 1d > bool 3e6",
            [Selector("a", ()), Selector("b", ())],
        ),
        (
            'time() - max without (instance) (x{job="a,b}", le!="1"}) and y',
            [Selector("x", ("job", "le")), Selector("y", ())],
        ),
        ("abs(m - avg_over_time(m[7d] offset 1d)) > 0.2 * abs(inf)", [Selector("m", ()), Selector("m", ())]),
    ],
)
def test_selectors_are_the_metrics_not_functions_keywords_or_labels(expr, expected):
    assert selectors(expr) == expected


def test_a_selector_without_a_name_is_refused():
    with pytest.raises(ValueError, match="without a metric name"):
        selectors('{job="keel-serving"}')


def test_grouping_and_recorded_labels():
    assert grouping_labels("sum by (a, b) (x) / sum by (a) (y)") == [("a", "b"), ("a",)]
    assert recorded_labels("model_version_alias:keel_serving_request_seconds:p99_5m") == {"model", "version", "alias"}


def test_unknown_metrics_and_labels_are_named():
    series = exported_series()
    recorded = {"model:keel_serving_requests:rate5m"}
    assert unknown_names("t", 'rate(keel_serving_requests_total{status="ok"}[5m])', series, recorded) == []
    assert unknown_names("t", 'model:keel_serving_requests:rate5m{model="x"}', series, recorded) == []
    problems = unknown_names(
        "t",
        'rate(keel_serving_request_total[5m]) + keel_stream_consumer_lag{source="x"} + model:keel_serving_requests:rate5m{alias="c"}',
        series,
        recorded,
    )
    assert problems == [
        "t: metric 'keel_serving_request_total' is neither exported by Keel nor recorded by a rule",
        "t: keel_stream_consumer_lag has no label 'source' (it has: instance, job, partition, topic)",
        "t: model:keel_serving_requests:rate5m has no label 'alias' (it has: model)",
    ]
