"""Drift statistics speed: ``keel.monitoring.statistics.compare`` against SciPy called column by column.

Data, generated in memory as Arrow with a fixed seed: a reference and a current window of
``--rows`` rows each, with 60 columns:

- 50 numeric, cycling through normal, lognormal, integer counts (Poisson: many ties),
  uniform, and exponential with 5% NaN and 2% NULL;
- 10 categorical with 3 to 200 categories of Zipf-like frequencies and 1% NULL, the
  current window bringing a few new categories in some of them.

Drift is planted in every fifth numeric column (the mean moves by half a standard deviation,
or the scale by 30%) and in every third categorical one (frequencies reshuffled).

Floor, measured in the same run on the same tables: the straightforward way, one column at
a time from the Arrow columns, each statistic by its own SciPy/NumPy call:
``scipy.stats.ks_2samp(method="asymp")``, ``scipy.stats.wasserstein_distance``, PSI from
``np.quantile`` edges and right-closed ``np.digitize`` bins, and ``np.unique`` counts into
``scipy.stats.chi2_contingency(correction=False)`` and
``scipy.spatial.distance.jensenshannon``. Ours is the best of ``--repeat`` runs, the floor
the best of ``--floor-repeat`` (it is slow, so 1 by default).

Every statistic of ours is checked against the floor's: the largest absolute difference of
each is printed, and the run fails (exit 1) when one exceeds 1e-9, or 1e-9 of the value for
values above 1 (a chi-square statistic of a million rows runs to 1e5 and more, where the
order of a sum moves the last digits).

    .venv/bin/python bench/drift.py [--rows 1000000] [--repeat 3] [--quick]
"""

import argparse
import math
import resource
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy import stats
from scipy.spatial.distance import jensenshannon

from keel.monitoring.statistics import PSI_EPS, compare

N_NUMERIC, N_CATEGORICAL = 50, 10
CATEGORY_SIZES = (3, 5, 8, 12, 20, 35, 50, 80, 120, 200)
STATISTICS = ("psi", "ks", "ks_pvalue", "wasserstein", "wasserstein_norm", "chi2", "chi2_pvalue", "js")
TOLERANCE = 1e-9


def numeric_column(rng: np.random.Generator, i: int, rows: int, drifted: bool) -> pa.Array:
    shift = 0.5 if drifted and i % 2 == 0 else 0.0
    scale = 1.3 if drifted and i % 2 == 1 else 1.0
    match i % 5:
        case 0:
            values = rng.normal(10 + shift * 3, 3 * scale, rows)
        case 1:
            values = np.exp(rng.normal(1 + shift, scale, rows))
        case 2:
            return pa.array(rng.poisson(4 * scale + shift * 2, rows))
        case 3:
            values = rng.uniform(shift, 1 + shift, rows) * scale
        case _:
            values = rng.exponential(2 * scale, rows) + shift * 2
            values[rng.random(rows) < 0.05] = np.nan
            return pa.array(values, mask=rng.random(rows) < 0.02)
    return pa.array(values)


def categorical_column(rng: np.random.Generator, size: int, rows: int, current: bool, drifted: bool) -> pa.Array:
    names = [f"c{j:03d}" for j in range(size)]
    weight = 1.0 / np.arange(1, size + 1) ** 1.1
    if current and drifted:
        weight = rng.permutation(weight)
    if current and size >= 12:
        names += [f"new{j}" for j in range(3)]
        weight = np.concatenate((weight, np.full(3, weight.min())))
    codes = rng.choice(len(names), size=rows, p=weight / weight.sum())
    return pa.array(names).take(pa.array(codes, mask=rng.random(rows) < 0.01))


def make_tables(rows: int, seed: int = 11) -> tuple[pa.Table, pa.Table, dict[str, str]]:
    rng = np.random.default_rng(seed)
    kinds = {f"x{i:02d}": "numeric" for i in range(N_NUMERIC)}
    kinds |= {f"cat{i}": "categorical" for i in range(N_CATEGORICAL)}
    tables = []
    for current in (False, True):
        columns = {f"x{i:02d}": numeric_column(rng, i, rows, current and i % 5 == 4) for i in range(N_NUMERIC)}
        for i, size in enumerate(CATEGORY_SIZES):
            columns[f"cat{i}"] = categorical_column(rng, size, rows, current, i % 3 == 0)
        tables.append(pa.table(columns))
    return tables[0], tables[1], kinds


def floor_numeric(reference: pa.ChunkedArray, current: pa.ChunkedArray, bins: int) -> dict[str, float]:
    r = pc.cast(reference, pa.float64()).to_numpy(zero_copy_only=False)
    c = pc.cast(current, pa.float64()).to_numpy(zero_copy_only=False)
    r, c = r[np.isfinite(r)], c[np.isfinite(c)]
    ks = stats.ks_2samp(r, c, method="asymp")
    wasserstein = stats.wasserstein_distance(r, c)
    edges = np.unique(np.quantile(r, np.arange(1, bins) / bins))
    p = np.bincount(np.digitize(r, edges, right=True), minlength=edges.size + 1) / r.size
    q = np.bincount(np.digitize(c, edges, right=True), minlength=edges.size + 1) / c.size
    p, q = np.maximum(p, PSI_EPS), np.maximum(q, PSI_EPS)
    scale = (abs(r.min()) or 1.0) if r.min() == r.max() else r.std()
    return {
        "psi": float(np.sum((q - p) * np.log(q / p))),
        "ks": float(ks.statistic),
        "ks_pvalue": float(ks.pvalue),
        "wasserstein": wasserstein,
        "wasserstein_norm": wasserstein / scale,
    }


def floor_categorical(reference: pa.ChunkedArray, current: pa.ChunkedArray) -> dict[str, float]:
    r = np.asarray(reference.drop_null().to_numpy(zero_copy_only=False), dtype=str)
    c = np.asarray(current.drop_null().to_numpy(zero_copy_only=False), dtype=str)
    categories, codes = np.unique(np.concatenate((r, c)), return_inverse=True)
    table = np.vstack(
        (
            np.bincount(codes[: r.size], minlength=categories.size),
            np.bincount(codes[r.size :], minlength=categories.size),
        )
    )
    chi2 = stats.chi2_contingency(table, correction=False)
    return {
        "chi2": float(chi2.statistic),
        "chi2_pvalue": float(chi2.pvalue),
        "js": float(jensenshannon(table[0], table[1], base=2)),
    }


def floor(reference: pa.Table, current: pa.Table, kinds: dict[str, str], bins: int) -> dict[str, dict[str, float]]:
    out = {}
    for column, kind in kinds.items():
        ref, cur = reference.column(column), current.column(column)
        out[column] = floor_numeric(ref, cur, bins) if kind == "numeric" else floor_categorical(ref, cur)
    return out


def best_time(repeat: int, run):
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--floor-repeat", type=int, default=1)
    parser.add_argument("--bins", type=int, default=10)
    parser.add_argument("--workers", type=int, default=None, help="threads for compare (default: its own choice)")
    parser.add_argument("--quick", action="store_true", help="100,000 rows")
    args = parser.parse_args()
    rows = 100_000 if args.quick else args.rows

    t0 = time.perf_counter()
    reference, current, kinds = make_tables(rows)
    print(
        f"data: 2 x {rows:,} rows x {len(kinds)} columns ({N_NUMERIC} numeric, {N_CATEGORICAL} categorical), "
        f"{time.perf_counter() - t0:.1f}s to generate"
    )
    ours_s, ours = best_time(
        args.repeat, lambda: compare(reference, current, kinds, bins=args.bins, workers=args.workers)
    )
    floor_s, base = best_time(args.floor_repeat, lambda: floor(reference, current, kinds, args.bins))
    print(f"ours   keel.monitoring.statistics.compare:         {ours_s:7.2f}s  (best of {args.repeat})")
    print(f"floor  SciPy/NumPy column by column:      {floor_s:7.2f}s  (best of {args.floor_repeat})")
    print(f"ratio  ours / floor:                      {ours_s / floor_s:7.3f}x")

    failed = False
    print("max |ours - floor| over the columns:")
    for statistic in STATISTICS:
        pairs = [
            (getattr(ours[c], statistic), figures[statistic]) for c, figures in base.items() if statistic in figures
        ]
        pairs = [(a, b) for a, b in pairs if not (math.isnan(a) and math.isnan(b))]
        worst = max((abs(a - b) for a, b in pairs), default=0.0)
        bad = [(a, b) for a, b in pairs if not abs(a - b) <= TOLERANCE * max(1.0, abs(b))]
        failed |= bool(bad)
        print(f"  {statistic:<17} {worst:9.3g}" + (f"  {len(bad)} beyond tolerance, e.g. {bad[0]}" if bad else ""))
    drifted = sorted(c for c, r in ours.items() if getattr(r, "psi", None) is not None and r.psi > 0.2)
    print(f"numeric columns with PSI > 0.2: {', '.join(drifted) or 'none'}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"peak memory: {peak:.1f} GB")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
