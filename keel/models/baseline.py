"""Baseline statistics of a training set: what drift monitoring compares live traffic against.

``baseline_stats`` summarises each feature column and the model's predictions once, at
training time, into a JSON-serialisable dict that is logged with the model version:

- numeric features: quantiles, a fixed-edge histogram (equal-width bins between the
  minimum and the maximum), mean, standard deviation, null rate, and the median as the
  default used when a value is missing at serving time;
- string and bool features: the ``top_k`` most frequent categories with their counts and
  frequencies, the count of everything else, null rate, and the mode as the default;
- the prediction distribution (quantiles and histogram) and the row count.

A later sample is compared by binning it with the stored edges and categories, so the
edges are kept exactly as computed. NaN counts as missing, like NULL; infinities are
counted (``inf_rate``) but left out of the quantiles, histogram, mean and std.
Every statistic is computed once per column with NumPy/pyarrow kernels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

BASELINE_FORMAT = 1
QUANTILES = (0.0, 0.01, 0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95, 0.99, 1.0)
HISTOGRAM_BINS = 20
TOP_K = 20


def baseline_stats(
    features_table: pa.Table,
    predictions: np.ndarray | Sequence[float] | None,
    feature_names: Sequence[str],
    *,
    bins: int = HISTOGRAM_BINS,
    top_k: int = TOP_K,
) -> dict:
    """Per-feature and prediction statistics of ``features_table`` (see the module docstring).

    ``feature_names`` fixes which columns are summarised and their order (the model's
    input order). ``predictions`` holds one score per row (a positive-class probability or
    a regression value); pass None to leave the prediction distribution out.
    """
    if bins < 1:
        raise ValueError(f"baseline: bins={bins} must be at least 1")
    if top_k < 1:
        raise ValueError(f"baseline: top_k={top_k} must be at least 1")
    missing = [f for f in feature_names if f not in features_table.column_names]
    if missing:
        raise ValueError(
            f"baseline: feature(s) {missing} are not columns of the table "
            f"(columns: {features_table.column_names}); pass the training set's feature columns"
        )
    n = features_table.num_rows
    features = {name: _column_stats(features_table.column(name), n, bins, top_k) for name in feature_names}
    out = {
        "format": BASELINE_FORMAT,
        "row_count": n,
        "quantile_probs": list(QUANTILES),
        "features": features,
        "prediction": None,
    }
    if predictions is not None:
        scores = np.asarray(predictions, dtype=np.float64)
        if scores.ndim != 1 or scores.shape[0] != n:
            raise ValueError(
                f"baseline: predictions have shape {scores.shape}, expected ({n},): "
                "one score per row (the positive-class probability for a classifier)"
            )
        out["prediction"] = prediction_stats(scores, bins=bins)
    return out


def prediction_stats(predictions: np.ndarray | Sequence[float], *, bins: int = HISTOGRAM_BINS) -> dict:
    """The distribution of one score per row: quantiles, histogram, mean, std, null rate."""
    scores = np.asarray(predictions, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(
            f"baseline: predictions have shape {scores.shape}; pass one score per row "
            "(the positive-class probability for a classifier)"
        )
    return _numeric_stats(scores, scores.shape[0], bins)


def _column_stats(column: pa.ChunkedArray, n: int, bins: int, top_k: int) -> dict:
    kind = column.type
    if pa.types.is_dictionary(kind):
        column = column.cast(kind.value_type)
        kind = kind.value_type
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        values = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
        # to_numpy turns NULL into NaN for float64, so NULL and NaN are counted together.
        return {"dtype": str(column.type), **_numeric_stats(values, n, bins)}
    if pa.types.is_boolean(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return {"dtype": str(column.type), **_categorical_stats(column, n, top_k)}
    return {"dtype": str(column.type), "kind": "other", "null_rate": _rate(column.null_count, n), "default": None}


def _numeric_stats(values: np.ndarray, n: int, bins: int) -> dict:
    nan = np.isnan(values)
    finite = values[np.isfinite(values)]
    stats = {
        "kind": "numeric",
        "null_rate": _rate(int(nan.sum()), n),
        "inf_rate": _rate(int(values.size - nan.sum() - finite.size), n),
        "count": int(finite.size),
    }
    if finite.size == 0:
        return {
            **stats,
            "quantiles": None,
            "mean": None,
            "std": None,
            "histogram": {"edges": [], "counts": []},
            "default": None,
        }
    quantiles = np.quantile(finite, QUANTILES)
    lo, hi = float(quantiles[0]), float(quantiles[-1])
    if lo == hi:
        # One distinct value: a single zero-width bin holds every row.
        edges, counts = np.array([lo, hi]), np.array([finite.size])
    else:
        edges = np.linspace(lo, hi, bins + 1)
        counts, _ = np.histogram(finite, bins=edges)
    return {
        **stats,
        "quantiles": _floats(quantiles),
        "mean": float(finite.mean()),
        "std": float(finite.std()),
        "histogram": {"edges": _floats(edges), "counts": [int(c) for c in counts]},
        "default": float(quantiles[QUANTILES.index(0.5)]),
    }


def _categorical_stats(column: pa.ChunkedArray, n: int, top_k: int) -> dict:
    nulls = column.null_count
    present = n - nulls
    if present:
        tallies = pc.value_counts(column.drop_null())
        tallies = pa.table({"value": tallies.field("values"), "count": tallies.field("counts")})
        # Most frequent first; ties by value so the baseline (and the mode) is deterministic.
        order = pc.sort_indices(tallies, sort_keys=[("count", "descending"), ("value", "ascending")])
        top = tallies.take(order[:top_k]).to_pylist()
        distinct = tallies.num_rows
    else:
        top, distinct = [], 0
    categories = [{"value": c["value"], "count": c["count"], "frequency": c["count"] / present} for c in top]
    other = present - sum(c["count"] for c in categories)
    return {
        "kind": "categorical",
        "null_rate": _rate(nulls, n),
        "count": present,
        "distinct": distinct,
        "categories": categories,
        "other_count": other,
        "other_frequency": other / present if present else 0.0,
        "default": categories[0]["value"] if categories else None,
    }


def _rate(count: int, n: int) -> float:
    return count / n if n else 0.0


def _floats(values: np.ndarray) -> list[float | None]:
    return [None if math.isnan(v) else float(v) for v in values]
