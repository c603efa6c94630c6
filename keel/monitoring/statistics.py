"""Drift statistics: how a current sample of each column differs from a reference sample.

Every statistic of a column comes from one sort of each side (numeric) or one count of each
side's categories (categorical); nothing is re-sorted or re-scanned per statistic.

Numeric columns (integers, floats, decimals; NULL, NaN and +-inf are dropped, so the counts
are of finite values, and a null rate is the NULL-or-NaN share of all rows):

- ``ks``: the two-sample Kolmogorov-Smirnov statistic, sup |F_ref - F_cur| over the pooled
  values; ``ks_pvalue`` is Smirnov's asymptotic p-value as ``scipy.stats.ks_2samp(...,
  method="asymp")`` computes it: ``kstwo.sf(ks, round(n_ref * n_cur / (n_ref + n_cur)))``,
  NaN for one value on each side (that size rounds to 0).
- ``wasserstein``: the integral of |F_ref - F_cur| over the pooled values (the first
  Wasserstein distance, in the column's units). ``wasserstein_norm`` divides it by the
  reference's standard deviation (ddof=0); a constant reference c has none, so the divisor is
  |c|, or 1 when c is 0: a fixed floor such as 1e-12 would turn any change from a constant
  zero into ~1e12 and leave a threshold nothing to distinguish.
- ``psi``: the population stability index on reference-quantile bins. The inner edges are
  ``np.quantile(reference, np.arange(1, bins) / bins)`` (linear method) with duplicates
  removed, and the outer bins reach -inf and +inf. A value v falls in bin i when
  edges[i-1] < v <= edges[i] (right-closed: ``np.searchsorted(edges, v, side="left")``). The
  bin proportions p (reference) and q (current) are floored at ``PSI_EPS`` = 1e-4 and used as
  floored, without renormalising; PSI = sum((q - p) * ln(q / p)). The stored proportions are
  the unfloored ones.
- plot bins: ``PLOT_BINS`` = 20 equal-width bins from the smallest to the largest value of
  both sides (v falls in bin i when edges[i] <= v < edges[i+1], the last bin closed, as in
  ``np.histogram``; a single pooled value c gets the range c - 0.5 to c + 0.5), with each
  side's proportions.

Categorical columns (strings or booleans, booleans as "true"/"false"; NULL dropped):

- ``chi2`` / ``chi2_pvalue``: Pearson's chi-square test of the 2 x K table of counts over the
  union of the K categories seen, without continuity correction (as
  ``scipy.stats.chi2_contingency(..., correction=False)``); with K == 1 the two samples have
  the same support, so the statistic is 0 and the p-value 1.
- ``js``: the Jensen-Shannon distance (base 2, so in [0, 1]) between the two frequency
  vectors over the same union.
- ``categories`` lists at most ``MAX_CATEGORIES`` categories, the most frequent in the
  reference first (then by current count, then by name), and folds the rest into
  ``OTHER``; the statistics always use every category. ``new_categories`` lists at most as
  many of the categories never seen in the reference, the most frequent first;
  ``new_category_count`` and ``new_category_rate`` count all of them.

A side with no values left is not an error: its counts are 0, every statistic comparing the
sides is NaN, its bin proportions are 0 (with no reference values there are no PSI bins at
all), and a null rate over zero rows is NaN.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PSI_EPS = 1e-4
PLOT_BINS = 20
MAX_CATEGORIES = 30
OTHER = "(other)"
KINDS = ("numeric", "categorical")
NAN = float("nan")


class DriftError(ValueError):
    """Drift statistics were asked of a column that cannot give them; the message says the fix."""


@dataclass(frozen=True)
class NumericDrift:
    """A numeric column's drift statistics and the histograms behind them (see the module docstring)."""

    psi: float
    ks: float
    ks_pvalue: float
    wasserstein: float
    wasserstein_norm: float
    reference_count: int
    current_count: int
    reference_null_rate: float
    current_null_rate: float
    psi_edges: tuple[float, ...]
    psi_reference: tuple[float, ...]
    psi_current: tuple[float, ...]
    plot_edges: tuple[float, ...]
    plot_reference: tuple[float, ...]
    plot_current: tuple[float, ...]


@dataclass(frozen=True)
class CategoricalDrift:
    """A categorical column's drift statistics and its (capped) category counts (see the module docstring)."""

    chi2: float
    chi2_pvalue: float
    js: float
    categories: tuple[str, ...]
    reference_counts: tuple[int, ...]
    current_counts: tuple[int, ...]
    reference_count: int
    current_count: int
    reference_null_rate: float
    current_null_rate: float
    new_categories: tuple[str, ...]
    new_category_count: int
    new_category_rate: float


def numeric_drift(reference: Any, current: Any, *, bins: int = 10) -> NumericDrift:
    """Drift of one numeric column: 1-D NumPy or Arrow arrays; NULL, NaN and +-inf are dropped."""
    _check_bins(bins)
    ref = _numeric_side(reference, "values", "reference")
    cur = _numeric_side(current, "values", "current")
    return _numeric_drift(ref, cur, bins)


def categorical_drift(reference: Any, current: Any) -> CategoricalDrift:
    """Drift of one categorical column: strings or booleans (Arrow, or NumPy str/bool/object); NULL is dropped."""
    ref = _category_side(reference, "values", "reference")
    cur = _category_side(current, "values", "current")
    return _categorical_drift(ref, cur)


def compare(
    reference: pa.Table,
    current: pa.Table,
    kinds: Mapping[str, str],
    *,
    bins: int = 10,
    workers: int | None = None,
) -> dict[str, NumericDrift | CategoricalDrift]:
    """Drift of each column in ``kinds`` (column -> "numeric" | "categorical"), in the order of ``kinds``.

    Columns run on up to ``workers`` threads (default: 2, or 1 on a one-core machine): the
    sorts and merges release the GIL, and two threads took 30-40% off the benchmark's
    1M x 60 comparison on two cores. SciPy's KS p-value holds the GIL and, for large
    samples that differ a little (2.2 <= n * ks**2 < 370 with n = n_ref * n_cur / (n_ref +
    n_cur)), is the slowest statistic of all: about a second per column at n = 500,000.
    """
    _check_bins(bins)
    for column, kind in kinds.items():
        if kind not in KINDS:
            raise DriftError(f"column {column!r}: kind {kind!r} is not known (use 'numeric' or 'categorical')")
        for side, table in (("reference", reference), ("current", current)):
            if column not in table.column_names:
                raise DriftError(
                    f"column {column!r} is not in the {side} table (its columns: {', '.join(table.column_names)})"
                )
            check = _check_numeric_type if kind == "numeric" else _check_category_type
            check(table.schema.field(column).type, column, side)

    def run(column: str) -> NumericDrift | CategoricalDrift:
        ref, cur = reference.column(column), current.column(column)
        if kinds[column] == "numeric":
            return _numeric_drift(_numeric_side(ref, column, "reference"), _numeric_side(cur, column, "current"), bins)
        return _categorical_drift(_category_side(ref, column, "reference"), _category_side(cur, column, "current"))

    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise DriftError(f"workers={workers!r} must be at least 1")
    if workers == 1:
        return {column: run(column) for column in kinds}
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip(kinds, pool.map(run, kinds), strict=True))


def sample_indices(n: int, max_rows: int, seed: int = 0) -> np.ndarray | None:
    """Sorted row numbers of a uniform sample of ``max_rows`` of ``n`` rows without replacement, fixed by ``seed``.

    None when all ``n`` rows fit: the caller then uses every row, with no copy.
    """
    if n < 0:
        raise DriftError(f"sample_indices: n={n!r} rows must be >= 0")
    if max_rows < 1:
        raise DriftError(f"sample_indices: max_rows={max_rows!r} must be >= 1, e.g. 50_000")
    if n <= max_rows:
        return None
    rows = np.random.default_rng(seed).choice(n, size=max_rows, replace=False)
    rows.sort()
    return rows


def _check_bins(bins: int) -> None:
    if isinstance(bins, bool) or not isinstance(bins, int | np.integer) or bins < 2:
        raise DriftError(f"bins={bins!r} must be an integer >= 2, e.g. 10")


# --- numeric -----------------------------------------------------------------------------


def _check_numeric_type(type_: pa.DataType, column: str, side: str) -> None:
    # The null type is a column of nothing but NULLs (an empty object array, a Parquet column never set).
    if not (
        pa.types.is_integer(type_)
        or pa.types.is_floating(type_)
        or pa.types.is_decimal(type_)
        or pa.types.is_null(type_)
    ):
        hint = "declare it 'categorical'" if _is_category_type(type_) else "cast it to a number first"
        raise DriftError(f"column {column!r}: numeric drift needs numbers, but the {side} column is {type_} ({hint})")


def _numeric_side(values: Any, column: str, side: str) -> tuple[np.ndarray, int, int]:
    """(the finite values sorted, the number of NULL or NaN rows, the number of rows)."""
    if isinstance(values, pa.Array | pa.ChunkedArray):
        _check_numeric_type(values.type, column, side)
        if values.type != pa.float64():
            # Past 2**53 an integer rounds to the nearest float; drift does not need the last digit.
            values = pc.cast(values, pa.float64(), safe=False)
        if values.null_count:
            values = pc.fill_null(values, NAN)
        x = values.to_numpy()
    else:
        x = np.asarray(values)
        if x.dtype == object:
            return _numeric_side(pa.array(x, from_pandas=True), column, side)
        if x.dtype.kind not in "iuf":
            hint = "declare it 'categorical'" if x.dtype.kind in "bUS" else "cast it to a number first"
            raise DriftError(
                f"column {column!r}: numeric drift needs numbers, but the {side} values are {x.dtype} ({hint})"
            )
    if x.ndim != 1:
        raise DriftError(f"column {column!r}: the {side} values must be 1-D, not of shape {x.shape}")
    # Sorting puts -inf first, then +inf and NaN last, so the finite values are one slice.
    s = np.sort(x.astype(np.float64, copy=False))
    first_nan = int(np.searchsorted(s, NAN))
    lo = int(np.searchsorted(s[:first_nan], -np.inf, side="right"))
    hi = int(np.searchsorted(s[:first_nan], np.inf, side="left"))
    return s[lo:hi], s.size - first_nan, s.size


def _numeric_drift(ref: tuple[np.ndarray, int, int], cur: tuple[np.ndarray, int, int], bins: int) -> NumericDrift:
    a, a_nan, a_rows = ref
    b, b_nan, b_rows = cur
    fields: dict[str, Any] = {
        "reference_count": a.size,
        "current_count": b.size,
        "reference_null_rate": a_nan / a_rows if a_rows else NAN,
        "current_null_rate": b_nan / b_rows if b_rows else NAN,
    }
    if a.size:
        edges = np.unique(_sorted_quantiles(a, np.arange(1, bins) / bins))
        p, q = _bin_shares(a, edges, side="right"), _bin_shares(b, edges, side="right")
        fields |= dict(psi_edges=tuple(edges.tolist()), psi_reference=tuple(p.tolist()), psi_current=tuple(q.tolist()))
    else:
        fields |= dict(psi_edges=(), psi_reference=(), psi_current=())
    plot_edges = _plot_edges(a, b)
    inner = plot_edges[1:-1]
    fields |= dict(
        plot_edges=tuple(plot_edges.tolist()),
        plot_reference=tuple(_bin_shares(a, inner, side="left").tolist()) if plot_edges.size else (),
        plot_current=tuple(_bin_shares(b, inner, side="left").tolist()) if plot_edges.size else (),
    )
    if not (a.size and b.size):
        return NumericDrift(psi=NAN, ks=NAN, ks_pvalue=NAN, wasserstein=NAN, wasserstein_norm=NAN, **fields)
    pf = np.maximum(np.asarray(fields["psi_reference"]), PSI_EPS)
    qf = np.maximum(np.asarray(fields["psi_current"]), PSI_EPS)
    ks, wasserstein = _ks_wasserstein(a, b)
    # SciPy's effective sample size for the asymptotic p-value, the larger size first as it orders them.
    m, n = sorted((float(a.size), float(b.size)), reverse=True)
    en = np.round(m * n / (m + n))
    # One value on each side rounds the effective size to 0, where SciPy's p-value is NaN too.
    from scipy import stats  # imported when used: scipy costs 0.8 s, and every Dagster run imports this module

    ks_pvalue = float(np.clip(stats.kstwo.sf(ks, en), 0.0, 1.0)) if en >= 1 else NAN
    return NumericDrift(
        psi=float(np.sum((qf - pf) * np.log(qf / pf))),
        ks=ks,
        ks_pvalue=ks_pvalue,
        wasserstein=wasserstein,
        wasserstein_norm=wasserstein / _spread(a),
        **fields,
    )


def _spread(s: np.ndarray) -> float:
    """What ``wasserstein_norm`` divides by: the std (ddof=0) of sorted ``s``, else |mean|, else 1."""
    # Tested on the sorted ends, as np.std of one value repeated need not come out exactly 0.
    if s[0] != s[-1]:
        centred = s - np.mean(s)
        std = math.sqrt(float(centred @ centred) / s.size)
        # Only values near the bottom of float64's range (squares underflowing) give 0 here.
        if std > 0:
            return std
    return abs(float(np.mean(s))) or 1.0


def _ks_wasserstein(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """KS and Wasserstein of two sorted, non-empty samples, from one merge of the two."""
    n1, n2 = a.size, b.size
    pooled = np.concatenate((a, b))
    # A stable sort of two sorted runs is a linear merge; ``order`` says which side each value came from.
    order = np.argsort(pooled, kind="stable")
    values = pooled[order]
    # n1 * n2 * (F_ref - F_cur) after each pooled value, as floats holding exact integers (below 2**53):
    # each reference value adds n2, each current one takes n1 away.
    gap = np.multiply(order < n1, float(n1 + n2))
    gap -= n1
    gap = np.cumsum(gap, out=gap)[:-1]
    steps = np.diff(values)
    # Inside a run of equal values the ECDFs are mid-step; only the run's last value counts for KS,
    # and zeroing the others costs Wasserstein nothing since their steps are 0.
    size = np.abs(gap)
    size *= steps > 0
    wasserstein = float(size @ steps) / (float(n1) * float(n2))
    top = size.max()
    if top == 0:
        # All values equal: the ECDFs step together, once, at the end.
        return 0.0, wasserstein
    # Where the exact gap peaks, evaluate F_ref - F_cur as SciPy rounds it (each side's count over its
    # size) and keep the largest: that is SciPy's statistic to the bit, though the peak may be reached
    # at several places that round differently.
    at = np.flatnonzero(size == top)
    c1 = np.rint((gap[at] + (at + 1) * n1) / (n1 + n2))
    return float(np.max(np.abs(c1 / n1 - (at + 1 - c1) / n2))), wasserstein


def _sorted_quantiles(s: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """``np.quantile(s, probs)`` (linear method) of sorted ``s``, read off by index instead of re-partitioned."""
    position = (s.size - 1) * probs
    below = np.floor(position)
    t = position - below
    lo = np.minimum(below.astype(np.intp), s.size - 1)
    hi = np.minimum(lo + 1, s.size - 1)
    a, b = s[lo], s[hi]
    # The same two-sided interpolation as NumPy's, so an edge equals NumPy's to the bit and a tied
    # value lands in the same bin.
    return np.where(t >= 0.5, b - (b - a) * (1 - t), a + (b - a) * t)


def _bin_shares(s: np.ndarray, edges: np.ndarray, *, side: str) -> np.ndarray:
    """Share of sorted ``s`` per bin of the inner ``edges``; side="right" closes bins on the right, "left" on the left."""
    if s.size == 0:
        return np.zeros(edges.size + 1)
    below = np.searchsorted(s, edges, side=side)
    return np.diff(below, prepend=0, append=s.size) / s.size


def _plot_edges(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ends = [x[[0, -1]] for x in (a, b) if x.size]
    if not ends:
        return np.empty(0)
    lo, hi = float(min(e[0] for e in ends)), float(max(e[1] for e in ends))
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, PLOT_BINS + 1)


# --- categorical -------------------------------------------------------------------------


def _is_category_type(type_: pa.DataType) -> bool:
    if pa.types.is_dictionary(type_):
        type_ = type_.value_type
    return (
        pa.types.is_string(type_)
        or pa.types.is_large_string(type_)
        or pa.types.is_string_view(type_)
        or pa.types.is_boolean(type_)
        or pa.types.is_null(type_)
    )


def _check_category_type(type_: pa.DataType, column: str, side: str) -> None:
    if not _is_category_type(type_):
        raise DriftError(
            f"column {column!r}: categorical drift needs strings or booleans, but the {side} column is {type_} "
            "(declare it 'numeric', or cast it to string if its values are codes)"
        )


def _category_side(values: Any, column: str, side: str) -> tuple[pa.Array, np.ndarray, int, int]:
    """(the distinct non-null categories as large strings, their counts, the number of NULL rows, the number of rows)."""
    if not isinstance(values, pa.Array | pa.ChunkedArray):
        x = np.asarray(values)
        if x.ndim != 1:
            raise DriftError(f"column {column!r}: the {side} values must be 1-D, not of shape {x.shape}")
        values = pa.array(x, from_pandas=True)
    _check_category_type(values.type, column, side)
    if pa.types.is_string_view(values.type):
        # pyarrow 25's value_counts of a string_view reports its NULL as a valid "".
        values = pc.cast(values, pa.large_string())
    counted = pc.value_counts(values)
    distinct, counts = counted.field(0), counted.field(1).to_numpy()
    valid = distinct.is_valid()
    # Distinct values are few, so decoding and casting them here is cheap.
    distinct = pc.cast(distinct.filter(valid), pa.large_string())
    counts = counts[valid.to_numpy(zero_copy_only=False)]
    return distinct, counts, values.null_count, len(values)


def _categorical_drift(
    ref: tuple[pa.Array, np.ndarray, int, int], cur: tuple[pa.Array, np.ndarray, int, int]
) -> CategoricalDrift:
    ref_values, ref_counts, ref_nulls, ref_rows = ref
    cur_values, cur_counts, cur_nulls, cur_rows = cur
    # The union: the reference's categories, then the current's new ones.
    at = pc.index_in(cur_values, value_set=ref_values)
    new = at.is_null().to_numpy(zero_copy_only=False)
    known_at = at.filter(at.is_valid()).to_numpy()
    union = pa.concat_arrays([ref_values, cur_values.filter(pa.array(new))])
    r = np.concatenate((ref_counts, np.zeros(int(new.sum()), np.int64)))
    c = np.zeros(r.size, np.int64)
    c[known_at] = cur_counts[~new]
    c[len(ref_values) :] = cur_counts[new]
    n_ref, n_cur = int(r.sum()), int(c.sum())

    order = pc.sort_indices(
        pa.table({"r": r, "c": c, "v": union}),
        sort_keys=[("r", "descending"), ("c", "descending"), ("v", "ascending")],
    ).to_numpy()
    shown = order[:MAX_CATEGORIES]
    names, shown_r, shown_c = union.take(shown).to_pylist(), r[shown].tolist(), c[shown].tolist()
    if order.size > MAX_CATEGORIES:
        rest = order[MAX_CATEGORIES:]
        names, shown_r, shown_c = names + [OTHER], shown_r + [int(r[rest].sum())], shown_c + [int(c[rest].sum())]
    # ``order`` puts the new categories (reference count 0) last, most frequent first.
    new_order = order[order.size - int(new.sum()) :]
    fields: dict[str, Any] = dict(
        categories=tuple(names),
        reference_counts=tuple(shown_r),
        current_counts=tuple(shown_c),
        reference_count=n_ref,
        current_count=n_cur,
        reference_null_rate=ref_nulls / ref_rows if ref_rows else NAN,
        current_null_rate=cur_nulls / cur_rows if cur_rows else NAN,
        new_categories=tuple(union.take(new_order[:MAX_CATEGORIES]).to_pylist()),
        new_category_count=int(new.sum()),
        new_category_rate=float(cur_counts[new].sum()) / n_cur if n_cur else NAN,
    )
    if not (n_ref and n_cur):
        return CategoricalDrift(chi2=NAN, chi2_pvalue=NAN, js=NAN, **fields)
    observed = np.vstack((r, c)).astype(np.float64)
    if r.size == 1:
        # One category: the samples share their support, and there is nothing to test.
        return CategoricalDrift(chi2=0.0, chi2_pvalue=1.0, js=0.0, **fields)
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / observed.sum()
    chi2 = float(np.sum((observed - expected) ** 2 / expected))
    p, q = observed[0] / n_ref, observed[1] / n_cur
    m = (p + q) / 2
    from scipy import special, stats  # as above

    divergence = (np.sum(special.rel_entr(p, m)) + np.sum(special.rel_entr(q, m))) / math.log(2)
    return CategoricalDrift(
        chi2=chi2,
        chi2_pvalue=float(stats.chi2.sf(chi2, r.size - 1)),
        # Rounding can leave a hair below 0 for identical vectors, where the square root would be NaN.
        js=math.sqrt(max(divergence / 2, 0.0)),
        **fields,
    )
