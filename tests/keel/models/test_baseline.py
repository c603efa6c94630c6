"""Baseline statistics: exact values on small tables, and a property test against a brute-force reference."""

import json
import math
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.models.baseline import QUANTILES, baseline_stats, prediction_stats


def test_numeric_and_categorical_features_and_predictions():
    table = pa.table(
        {
            "amount": pa.array([1.0, 2.0, None, 4.0, float("nan"), 6.0], pa.float64()),
            "items": pa.array([1, 1, 2, 3, 5, None], pa.int64()),
            "currency": pa.array(["EUR", "USD", "EUR", None, "GBP", "EUR"]),
            "is_refund": pa.array([False, True, False, False, None, False]),
            "ignored": pa.array(["x"] * 6),
        }
    )
    stats = baseline_stats(
        table, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], ["items", "amount", "currency", "is_refund"], bins=4, top_k=2
    )
    json.dumps(stats, allow_nan=False)
    assert stats["row_count"] == 6
    assert list(stats["features"]) == ["items", "amount", "currency", "is_refund"]

    amount = stats["features"]["amount"]
    assert amount["kind"] == "numeric" and amount["dtype"] == "double"
    assert amount["null_rate"] == pytest.approx(2 / 6)  # NULL and NaN are both missing
    assert amount["count"] == 4
    assert amount["quantiles"][0] == 1.0 and amount["quantiles"][-1] == 6.0
    assert amount["default"] == 3.0  # the median of 1, 2, 4, 6
    assert amount["mean"] == pytest.approx(3.25)
    assert amount["std"] == pytest.approx(np.std([1.0, 2.0, 4.0, 6.0]))
    assert amount["histogram"] == {"edges": [1.0, 2.25, 3.5, 4.75, 6.0], "counts": [2, 0, 1, 1]}

    items = stats["features"]["items"]
    assert items["null_rate"] == pytest.approx(1 / 6) and items["default"] == 2.0

    currency = stats["features"]["currency"]
    assert currency["kind"] == "categorical" and currency["null_rate"] == pytest.approx(1 / 6)
    assert currency["categories"] == [
        {"value": "EUR", "count": 3, "frequency": 0.6},
        {"value": "GBP", "count": 1, "frequency": 0.2},  # ties break by value: GBP before USD
    ]
    assert currency["other_count"] == 1 and currency["other_frequency"] == pytest.approx(0.2)
    assert currency["distinct"] == 3 and currency["default"] == "EUR"

    refund = stats["features"]["is_refund"]
    assert refund["default"] is False and refund["categories"][0] == {"value": False, "count": 4, "frequency": 0.8}

    prediction = stats["prediction"]
    assert prediction["count"] == 6 and prediction["default"] == pytest.approx(0.35)
    assert sum(prediction["histogram"]["counts"]) == 6


def test_degenerate_columns():
    table = pa.table(
        {
            "constant": pa.array([7.0, 7.0, 7.0]),
            "empty": pa.array([None, None, None], pa.float64()),
            "no_strings": pa.array([None, None, None], pa.string()),
            "when": pa.array([1, 2, 3], pa.timestamp("us", "UTC")),
        }
    )
    stats = baseline_stats(table, None, table.column_names)
    json.dumps(stats, allow_nan=False)
    features = stats["features"]
    assert features["constant"]["histogram"] == {"edges": [7.0, 7.0], "counts": [3]}
    assert features["constant"]["std"] == 0.0 and features["constant"]["default"] == 7.0
    assert features["empty"]["null_rate"] == 1.0 and features["empty"]["default"] is None
    assert features["empty"]["quantiles"] is None
    assert features["no_strings"] == {
        "dtype": "string",
        "kind": "categorical",
        "null_rate": 1.0,
        "count": 0,
        "distinct": 0,
        "categories": [],
        "other_count": 0,
        "other_frequency": 0.0,
        "default": None,
    }
    assert features["when"]["kind"] == "other"
    assert stats["prediction"] is None
    assert baseline_stats(table.slice(0, 0), [], ["constant"])["features"]["constant"]["null_rate"] == 0.0


def test_dictionary_encoded_strings_are_categories():
    column = pa.array(["a", "b", "a"]).dictionary_encode()
    stats = baseline_stats(pa.table({"c": column}), None, ["c"])["features"]["c"]
    assert stats["kind"] == "categorical" and stats["default"] == "a"


def test_bad_inputs_name_the_problem():
    table = pa.table({"x": [1.0, 2.0]})
    with pytest.raises(ValueError, match=r"feature\(s\) \['y'\] are not columns"):
        baseline_stats(table, None, ["y"])
    with pytest.raises(ValueError, match=r"shape \(3,\), expected \(2,\)"):
        baseline_stats(table, [0.1, 0.2, 0.3], ["x"])
    with pytest.raises(ValueError, match="one score per row"):
        prediction_stats(np.zeros((2, 2)))


def reference_numeric(values: list[float | None], bins: int) -> dict:
    """Plain-Python statistics over the finite values (NULL and NaN missing)."""
    finite = sorted(v for v in values if v is not None and math.isfinite(v))
    missing = sum(1 for v in values if v is None or math.isnan(v))

    def quantile(q: float) -> float:
        # Linear interpolation between closest ranks (NumPy's default method).
        pos = q * (len(finite) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return finite[lo] + (finite[hi] - finite[lo]) * (pos - lo)

    out = {"null_rate": missing / len(values), "count": len(finite)}
    if finite:
        lo, hi = finite[0], finite[-1]
        counts = [0] * bins
        for v in finite:
            # Half-open bins [e_i, e_i+1), the last one closed, as a fixed-width histogram.
            i = bins - 1 if v == hi else int((v - lo) / (hi - lo) * bins) if hi > lo else 0
            counts[min(i, bins - 1)] += 1
        out |= {"quantiles": [quantile(q) for q in QUANTILES], "mean": sum(finite) / len(finite), "counts": counts}
    return out


finite_floats = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(st.one_of(st.none(), st.just(float("nan")), finite_floats), min_size=1, max_size=60),
    words=st.lists(st.one_of(st.none(), st.sampled_from(["a", "b", "c", "d", "e"])), min_size=1, max_size=60),
    bins=st.integers(1, 8),
    top_k=st.integers(1, 4),
)
def test_matches_brute_force_reference(values, words, bins, top_k):
    n = min(len(values), len(words))
    values, words = values[:n], words[:n]
    table = pa.table({"x": pa.array(values, pa.float64(), from_pandas=False), "w": pa.array(words, pa.string())})
    stats = baseline_stats(table, None, ["x", "w"], bins=bins, top_k=top_k)
    json.dumps(stats, allow_nan=False)

    x, ref = stats["features"]["x"], reference_numeric(values, bins)
    assert x["null_rate"] == pytest.approx(ref["null_rate"]) and x["count"] == ref["count"]
    if ref["count"]:
        assert x["quantiles"] == pytest.approx(ref["quantiles"], rel=1e-9, abs=1e-6)
        assert x["mean"] == pytest.approx(ref["mean"], rel=1e-9, abs=1e-6)
        assert sum(x["histogram"]["counts"]) == ref["count"]
        if x["quantiles"][0] < x["quantiles"][-1] and len(x["histogram"]["counts"]) == bins:
            # Values sitting exactly on an inner edge may fall either side through rounding of the edges.
            on_edge = any(v in x["histogram"]["edges"][1:-1] for v in values if v is not None)
            if not on_edge:
                assert x["histogram"]["counts"] == ref["counts"]

    w = stats["features"]["w"]
    present = [v for v in words if v is not None]
    tally = sorted(Counter(present).items(), key=lambda kv: (-kv[1], kv[0]))
    assert [(c["value"], c["count"]) for c in w["categories"]] == tally[:top_k]
    assert w["other_count"] == sum(c for _, c in tally[top_k:])
    assert w["null_rate"] == pytest.approx((n - len(present)) / n)
    assert w["default"] == (tally[0][0] if tally else None)
