"""keel.monitoring.statistics against SciPy and brute-force references, on small samples with ties, NULLs, NaN and inf."""

import math
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from scipy.spatial.distance import jensenshannon

from keel.monitoring.statistics import (
    MAX_CATEGORIES,
    OTHER,
    PLOT_BINS,
    CategoricalDrift,
    DriftError,
    NumericDrift,
    categorical_drift,
    compare,
    numeric_drift,
    sample_indices,
)

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True)

# Small integers make ties within and across the samples; the specials must all be dropped.
number = st.one_of(
    st.integers(-3, 3).map(float),
    st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False),
    st.sampled_from([None, math.nan, math.inf, -math.inf]),
)
numbers = st.lists(number, max_size=40)
category = st.one_of(st.sampled_from(["a", "b", "c", "d", "é", ""]), st.none())
categories = st.lists(category, max_size=40)


def close(ours: float, reference: float) -> bool:
    both_nan = math.isnan(ours) and math.isnan(reference)
    return both_nan or math.isclose(ours, reference, rel_tol=1e-9, abs_tol=1e-12)


def as_input(values: list, arrow: bool):
    """The same values as an Arrow float column (None as NULL) or a NumPy object array."""
    return pa.array(values, pa.float64()) if arrow else np.array(values, dtype=object)


def finite(values: list) -> np.ndarray:
    return np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)


def null_rate(values: list) -> float:
    return sum(v is None or math.isnan(v) for v in values) / len(values) if values else math.nan


def brute_psi(ref: np.ndarray, cur: np.ndarray, bins: int) -> tuple[list[float], list[float], list[float], float]:
    """PSI by the module docstring's definition, one value at a time."""
    edges = sorted(set(np.quantile(ref, np.arange(1, bins) / bins).tolist()))

    def shares(values: np.ndarray) -> list[float]:
        counts = [0] * (len(edges) + 1)
        for v in values:
            counts[next((i for i, edge in enumerate(edges) if v <= edge), len(edges))] += 1
        return [n / len(values) for n in counts]

    p, q = shares(ref), shares(cur)
    psi = 0.0
    for pi, qi in zip(p, q, strict=True):
        pi, qi = max(pi, 1e-4), max(qi, 1e-4)
        psi += (qi - pi) * math.log(qi / pi)
    return edges, p, q, psi


@SETTINGS
@given(numbers, numbers, st.integers(2, 12), st.booleans())
def test_numeric_drift_matches_scipy_and_brute_force(reference, current, bins, arrow):
    got = numeric_drift(as_input(reference, arrow), as_input(current, not arrow), bins=bins)
    ref, cur = finite(reference), finite(current)

    assert (got.reference_count, got.current_count) == (ref.size, cur.size)
    for ours, expected in (
        (got.reference_null_rate, null_rate(reference)),
        (got.current_null_rate, null_rate(current)),
    ):
        assert ours == expected or (math.isnan(ours) and math.isnan(expected))

    pooled = np.concatenate((ref, cur))
    if pooled.size:
        lo, hi = pooled.min(), pooled.max()
        edges = np.linspace(lo, hi, PLOT_BINS + 1) if lo < hi else np.linspace(lo - 0.5, hi + 0.5, PLOT_BINS + 1)
        assert got.plot_edges == tuple(edges.tolist())
        for side, values in ((got.plot_reference, ref), (got.plot_current, cur)):
            counts = np.histogram(values, bins=edges)[0]
            assert side == pytest.approx(counts / values.size if values.size else counts, abs=1e-15)
    else:
        assert got.plot_edges == got.plot_reference == got.plot_current == ()

    if ref.size:
        edges, p, q, psi = brute_psi(ref, cur if cur.size else ref, bins)
        # Edges equal to the bit, or a tied value could land in another bin than np.quantile's.
        assert got.psi_edges == tuple(edges)
        assert got.psi_reference == pytest.approx(p, abs=1e-15)
        assert got.psi_current == pytest.approx(q if cur.size else [0.0] * len(p), abs=1e-15)
    else:
        assert got.psi_edges == got.psi_reference == got.psi_current == ()

    if not (ref.size and cur.size):
        assert all(math.isnan(x) for x in (got.psi, got.ks, got.ks_pvalue, got.wasserstein, got.wasserstein_norm))
        return
    assert close(got.psi, psi)
    with np.errstate(divide="ignore"):  # SciPy's p-value for one value a side (NaN) divides by 0 on the way
        ks = stats.ks_2samp(ref, cur, method="asymp")
    assert got.ks == ks.statistic
    assert close(got.ks_pvalue, ks.pvalue)
    wasserstein = stats.wasserstein_distance(ref, cur)
    assert close(got.wasserstein, wasserstein)
    std = np.std(ref) if ref.min() < ref.max() else 0.0
    assert close(got.wasserstein_norm, wasserstein / (std or abs(np.mean(ref)) or 1.0))


@SETTINGS
@given(categories, categories, st.booleans())
def test_categorical_drift_matches_scipy_and_brute_force(reference, current, arrow):
    def as_cat(values):
        return pa.array(values, pa.string()) if arrow else np.array(values, dtype=object)

    got = categorical_drift(as_cat(reference), as_cat(current))
    r = Counter(v for v in reference if v is not None)
    c = Counter(v for v in current if v is not None)
    union = sorted(r.keys() | c.keys(), key=lambda k: (-r[k], -c[k], k))

    assert got.categories == tuple(union)
    assert got.reference_counts == tuple(r[k] for k in union)
    assert got.current_counts == tuple(c[k] for k in union)
    assert (got.reference_count, got.current_count) == (r.total(), c.total())
    assert got.new_categories == tuple(k for k in union if k not in r)
    assert got.new_category_count == len(c.keys() - r.keys())
    if c:
        assert close(got.new_category_rate, sum(n for k, n in c.items() if k not in r) / c.total())
    if reference:
        assert got.reference_null_rate == reference.count(None) / len(reference)

    if not (r and c):
        assert math.isnan(got.chi2) and math.isnan(got.chi2_pvalue) and math.isnan(got.js)
        return
    table = np.array([[r[k] for k in union], [c[k] for k in union]])
    if len(union) == 1:
        assert (got.chi2, got.chi2_pvalue, got.js) == (0.0, 1.0, 0.0)
    else:
        chi2 = stats.chi2_contingency(table, correction=False)
        assert close(got.chi2, chi2.statistic)
        assert close(got.chi2_pvalue, chi2.pvalue)
    assert close(got.js, jensenshannon(table[0], table[1], base=2))


def test_integer_counts_with_many_ties_match_scipy():
    rng = np.random.default_rng(3)
    ref, cur = rng.poisson(3.0, 4000).astype(float), rng.poisson(3.4, 2500).astype(float)
    got = numeric_drift(ref, cur, bins=10)
    ks = stats.ks_2samp(ref, cur, method="asymp")
    assert got.ks == ks.statistic
    assert close(got.ks_pvalue, ks.pvalue)
    assert close(got.wasserstein, stats.wasserstein_distance(ref, cur))
    _, p, q, psi = brute_psi(ref, cur, 10)
    # Deciles of a Poisson(3) repeat: fewer, wider bins.
    assert len(got.psi_edges) < 9
    assert got.psi_reference == pytest.approx(p, abs=1e-15)
    assert got.psi_current == pytest.approx(q, abs=1e-15)
    assert close(got.psi, psi)


def test_no_drift_is_small_and_a_planted_shift_is_found():
    rng = np.random.default_rng(7)
    ref, same, shifted = rng.normal(0, 1, 5000), rng.normal(0, 1, 5000), rng.normal(1, 1, 5000)
    calm, moved = numeric_drift(ref, same), numeric_drift(ref, shifted)
    assert calm.psi < 0.1 and calm.ks_pvalue > 0.01 and calm.wasserstein_norm < 0.1
    assert moved.psi > 0.2 and moved.ks_pvalue < 1e-6 and moved.wasserstein_norm > 0.8

    names = np.array(list("abcdefgh"))
    weights = np.array([30, 20, 15, 10, 10, 8, 5, 2]) / 100
    ref_c = names[rng.choice(8, 5000, p=weights)]
    calm_c = categorical_drift(ref_c, names[rng.choice(8, 5000, p=weights)])
    moved_c = categorical_drift(ref_c, names[rng.choice(8, 5000, p=weights[::-1])])
    assert calm_c.js < 0.05 and calm_c.chi2_pvalue > 0.01
    assert moved_c.js > 0.3 and moved_c.chi2_pvalue < 1e-6


def test_compare_gives_the_single_column_numbers():
    rng = np.random.default_rng(5)

    def table(n: int, shift: float) -> pa.Table:
        return pa.table(
            {
                "amount": pa.array(rng.lognormal(shift, 1.0, n)),
                "count": pa.array(rng.poisson(2 + shift, n), mask=rng.random(n) < 0.1),
                "ratio": pa.array(np.where(rng.random(n) < 0.05, np.nan, rng.normal(shift, 1, n)), pa.float32()),
                "country": pa.array(rng.choice(["DE", "FR", "NL", "PL"], n)).dictionary_encode(),
                "is_refund": pa.array(rng.random(n) < 0.1 + shift / 10),
            }
        )

    reference, current = table(700, 0.0), table(500, 0.5)
    kinds = {"count": "numeric", "country": "categorical", "amount": "numeric", "is_refund": "categorical"}
    kinds |= {"ratio": "numeric"}
    got = compare(reference, current, kinds, bins=8)
    assert list(got) == list(kinds)
    for column, kind in kinds.items():
        single = numeric_drift if kind == "numeric" else categorical_drift
        extra = {"bins": 8} if kind == "numeric" else {}
        assert got[column] == single(reference.column(column), current.column(column), **extra)
        assert isinstance(got[column], NumericDrift if kind == "numeric" else CategoricalDrift)
    assert compare(reference, current, kinds, bins=8, workers=1) == got
    assert got["count"].reference_null_rate == reference.column("count").null_count / 700
    assert set(got["is_refund"].categories) == {"true", "false"}


def test_empty_all_nan_and_infinite_sides():
    empty = numeric_drift(np.array([], dtype=float), np.array([1.0, 2.0]))
    assert empty.reference_count == 0 and math.isnan(empty.reference_null_rate)
    assert math.isnan(empty.psi) and math.isnan(empty.ks) and math.isnan(empty.ks_pvalue)
    assert empty.psi_edges == empty.psi_reference == empty.psi_current == ()
    assert empty.plot_reference == (0.0,) * PLOT_BINS and sum(empty.plot_current) == 1.0

    all_nan = numeric_drift(pa.array([1.0, 2.0, 3.0]), pa.array([None, math.nan, math.nan], pa.float64()))
    assert all_nan.current_count == 0 and all_nan.current_null_rate == 1.0
    assert math.isnan(all_nan.wasserstein) and all_nan.psi_current == (0.0,) * len(all_nan.psi_reference)

    # +-inf is neither a value nor a NULL: it is left out of the counts and the null rate.
    inf = numeric_drift(np.array([1.0, math.inf, 2.0, -math.inf]), np.array([1.0, 2.0]))
    assert inf.reference_count == 2 and inf.reference_null_rate == 0.0 and inf.ks == 0.0

    table = pa.table({"x": pa.array([None, None], pa.float64()), "c": pa.array([None, None], pa.string())})
    got = compare(table, table, {"x": "numeric", "c": "categorical"})
    assert got["x"].reference_count == 0 and math.isnan(got["x"].ks) and got["x"].plot_edges == ()
    assert got["c"].categories == () and math.isnan(got["c"].chi2_pvalue) and math.isnan(got["c"].new_category_rate)
    assert got["x"].reference_null_rate == got["c"].current_null_rate == 1.0

    no_rows = pa.Table.from_batches([], schema=table.schema)
    got = compare(no_rows, table, {"x": "numeric", "c": "categorical"})
    assert math.isnan(got["x"].reference_null_rate) and math.isnan(got["c"].reference_null_rate)
    assert got["c"].current_null_rate == 1.0 and math.isnan(got["c"].js)


def test_every_string_type_gives_the_same_counts():
    values, current = ["b", None, "a", "b", ""], ["a", None, "z"]
    expected = categorical_drift(pa.array(values), pa.array(current))
    assert expected.categories == ("b", "a", "", "z") and expected.reference_null_rate == 0.2
    for type_ in (pa.large_string(), pa.string_view()):
        assert categorical_drift(pa.array(values, type_), pa.array(current, type_)) == expected
    dictionary = pa.chunked_array([pa.array(current).dictionary_encode()])
    assert categorical_drift(pa.array(values).dictionary_encode(), dictionary) == expected
    assert categorical_drift(np.array(values, dtype=object), current) == expected


def test_constant_reference():
    same = numeric_drift(np.full(10, 3.0), np.full(4, 3.0))
    assert (same.psi, same.ks, same.ks_pvalue, same.wasserstein, same.wasserstein_norm) == (0.0, 0.0, 1.0, 0.0, 0.0)
    assert same.psi_edges == (3.0,) and same.psi_reference == (1.0, 0.0)
    assert same.plot_edges[0] == 2.5 and same.plot_edges[-1] == 3.5

    moved = numeric_drift(np.full(10, 3.0), np.array([3.0] * 5 + [4.0] * 5))
    assert moved.wasserstein == pytest.approx(0.5) and moved.wasserstein_norm == pytest.approx(0.5 / 3)
    assert moved.psi_current == (0.5, 0.5) and moved.psi > 1

    # From a constant 0 there is no scale at all: the distance stays in the column's units.
    zero = numeric_drift(np.zeros(10), np.array([0.0, 2.0]))
    assert zero.wasserstein_norm == zero.wasserstein == pytest.approx(1.0)


def test_many_categories_are_capped_for_the_plot_but_all_counted():
    ref = [f"k{i:02d}" for i in range(40) for _ in range(40 - i)]
    cur = ref[::2] + ["new1"] * 7 + ["new2"] * 3
    got = categorical_drift(pa.array(ref), pa.array(cur))
    assert len(got.categories) == MAX_CATEGORIES + 1 and got.categories[-1] == OTHER
    assert got.categories[:3] == ("k00", "k01", "k02")
    assert sum(got.reference_counts) == len(ref) and sum(got.current_counts) == len(cur)
    assert got.new_categories == ("new1", "new2") and got.new_category_rate == pytest.approx(10 / len(cur))
    r, c = Counter(ref), Counter(cur)
    union = sorted(r.keys() | c.keys())
    chi2 = stats.chi2_contingency(np.array([[r[k] for k in union], [c[k] for k in union]]), correction=False)
    assert close(got.chi2, chi2.statistic) and close(got.chi2_pvalue, chi2.pvalue)


def test_sample_indices_are_a_fixed_uniform_sample():
    assert sample_indices(100, 100) is None and sample_indices(0, 5) is None
    rows = sample_indices(10_000, 2_000, seed=1)
    assert np.array_equal(rows, sample_indices(10_000, 2_000, seed=1))
    assert not np.array_equal(rows, sample_indices(10_000, 2_000, seed=2))
    assert rows.size == np.unique(rows).size == 2_000 and np.all(np.diff(rows) > 0)
    assert 0 <= rows[0] < 50 and 9_950 <= rows[-1] < 10_000
    # Uniform: each tenth of the rows holds about a tenth of the sample (200 +- 5 sd).
    per_tenth = np.bincount(rows // 1_000, minlength=10)
    assert np.all(np.abs(per_tenth - 200) < 70), per_tenth
    assert np.array_equal(sample_indices(6, 5, seed=0), np.sort(np.random.default_rng(0).choice(6, 5, replace=False)))


def test_errors_name_the_column_the_value_and_the_fix():
    reference = pa.table({"amount": [1.0, 2.0], "country": ["DE", "FR"], "n": [1, 2]})
    current = pa.table({"amount": [1.5, 2.5], "country": ["DE", "DE"]})
    with pytest.raises(DriftError, match=r"column 'amount': kind 'continuous' is not known \(use 'numeric' or 'ca"):
        compare(reference, current, {"amount": "continuous"})
    with pytest.raises(DriftError, match=r"column 'n' is not in the current table \(its columns: amount, country\)"):
        compare(reference, current, {"n": "numeric"})
    with pytest.raises(
        DriftError, match=r"column 'amount': categorical drift .* reference column is double .*'numeric'"
    ):
        compare(reference, current, {"amount": "categorical"})
    with pytest.raises(DriftError, match=r"column 'country': numeric drift .* column is string \(declare it 'categ"):
        compare(reference, current, {"country": "numeric"})
    with pytest.raises(DriftError, match=r"bins=1 must be an integer >= 2"):
        compare(reference, current, {"amount": "numeric"}, bins=1)
    with pytest.raises(DriftError, match=r"values are bool \(declare it 'categorical'\)"):
        numeric_drift(np.array([True, False]), np.array([1.0]))
    with pytest.raises(
        DriftError, match=r"categorical drift needs strings or booleans, but the current column is int64"
    ):
        categorical_drift(["a"], np.array([1, 2]))
    with pytest.raises(DriftError, match=r"must be 1-D, not of shape \(2, 2\)"):
        numeric_drift(np.ones((2, 2)), np.ones(3))
    with pytest.raises(DriftError, match=r"max_rows=0 must be >= 1"):
        sample_indices(10, 0)
