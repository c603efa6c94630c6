"""Scale-out: a training set over more events than one process may hold, in entity shards on Dask.

Data: ``--events`` card transactions of ``--entities`` users (power-law activity) over ``--days``
days, written straight into an embedded lakehouse by pyiceberg's ``append``, a few days at a
time: the rows skip Keel's row validation and write-audit-publish (they are made valid), and
land partitioned by (day, bucket(user_id)) as ingests write them. The spine: ``--spine``
(user, time) rows, half drawn by activity, half uniformly.

Runs, each a training set of the demo's ``user_transactions`` group within a ``--budget``:

1. the unsharded engine on all of it, in a child process watched by RSS and stopped when it
   passes the budget (its peak, or where it was stopped, is printed);
2. the sharded engine on a Dask cluster started here (scheduler and worker processes on
   loopback), with 1 worker and then 2: time, shards, each process's peak RSS (the driver, and
   each worker's largest task), and the speed-up from 1 to 2 workers;
3. the largest size the unsharded engine fits in the budget (``--fit-events``; default: the
   size the shard planner would put in one shard): the unsharded engine and the sharded one (the
   shard count of run 2) on the same data, and their ratio.

    .venv/bin/python bench/scale.py [--events 50000000] [--entities 5000000] [--spine 5000000] [--budget 4GB]
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing as mp
import shutil
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc

from keel.compute import disconnect, peak_rss, reset_peak
from keel.config import Settings
from keel.devservers.compute import DaskScheduler, DaskWorker
from keel.features import shards as sharding
from keel.store import FeatureStore
from pipelines.features import user_transactions
from pipelines.sources import COUNTRIES, CURRENCIES, MERCHANT_CATEGORIES, transactions

START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
US_PER_DAY = 86_400_000_000
FEATURES = [f"user_transactions.{f.name}" for f in user_transactions.features]
GB = 2**30


def settings_for(home: Path, budget: int, **env: str) -> Settings:
    return Settings.from_env(
        {"KEEL_HOME": str(home), "KEEL_CODE_VERSION": "bench", "KEEL_MAX_MEMORY": str(budget), **env}
    )


def weights(n_entities: int, rng) -> np.ndarray:
    w = rng.permutation(1.0 / np.arange(1, n_entities + 1) ** 0.9)
    return w / w.sum()


def users(ids: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise("u", pa.array(ids).cast(pa.string()), "")


def generate(home: Path, n_events: int, n_entities: int, days: int, seed: int = 7) -> float:
    """Write the events into the lakehouse under ``home``, a few days at a time; returns seconds."""
    t0 = time.perf_counter()
    store = FeatureStore.from_settings(settings_for(home, GB))
    lake = store.lake
    lake.ensure_table(
        transactions.table_name, transactions.arrow_schema(), day_column="event_ts", bucket_column="user_id"
    )
    table = lake.table(transactions.table_name)
    rng = np.random.default_rng(seed)
    p = weights(n_entities, rng)
    step = max(1, days // 10)
    written = 0
    for first in range(0, days, step):
        span = min(step, days - first)
        n = n_events * (first + span) // days - written
        when = first * US_PER_DAY + rng.integers(0, span * US_PER_DAY, n)
        chunk = pa.table(
            {
                "event_id": pc.binary_join_element_wise(
                    "t-", pa.array(np.arange(written, written + n)).cast(pa.string()), ""
                ),
                "user_id": users(rng.choice(n_entities, size=n, p=p)),
                "event_ts": pa.array(int(START.timestamp() * 1e6) + when, pa.timestamp("us", tz="UTC")),
                "amount": np.round(np.exp(rng.normal(3.8, 1.0, n)), 2),
                "currency": pa.array(CURRENCIES).take(pa.array(rng.integers(0, len(CURRENCIES), n))),
                "country": pa.array(COUNTRIES).take(pa.array(rng.integers(0, len(COUNTRIES), n))),
                "merchant_category": pa.array(MERCHANT_CATEGORIES).take(
                    pa.array(rng.integers(0, len(MERCHANT_CATEGORIES), n))
                ),
                "is_refund": rng.random(n) < 0.02,
            },
            schema=transactions.arrow_schema(),
        )
        table.append(chunk)
        written += n
        print(f"  wrote {written:,} of {n_events:,} events", flush=True)
    return time.perf_counter() - t0


def make_spine(n_spine: int, n_entities: int, days: int, seed: int = 11) -> pa.Table:
    rng = np.random.default_rng(seed)
    p = weights(n_entities, np.random.default_rng(7))
    who = np.where(
        rng.random(n_spine) < 0.5, rng.choice(n_entities, size=n_spine, p=p), rng.integers(0, n_entities, n_spine)
    )
    when = int(START.timestamp() * 1e6) + rng.integers(0, days * US_PER_DAY, n_spine)
    return pa.table({"user_id": users(who), "event_ts": pa.array(when, pa.timestamp("us", tz="UTC"))})


def _unsharded_child(home: str, budget: int, spine: pa.Table, out) -> None:
    store = FeatureStore.from_settings(settings_for(Path(home), budget))
    t0 = time.perf_counter()
    store.get_training_set(spine, FEATURES, shards=1)
    out.put(time.perf_counter() - t0)


def unsharded(home: Path, budget: int, spine: pa.Table, stop_above: bool) -> tuple[float | None, int, bool]:
    """The unsharded engine in a child process: (seconds or None, its peak RSS, whether it was stopped
    for passing the budget). The child's RSS is sampled every 50 ms."""
    out = mp.get_context("fork").Queue()
    child = mp.get_context("fork").Process(target=_unsharded_child, args=(str(home), budget, spine, out))
    child.start()
    proc, peak, stopped = psutil.Process(child.pid), 0, False
    while child.is_alive():
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        if stop_above and peak > budget:
            child.kill()
            stopped = True
            break
        time.sleep(0.05)
    child.join()
    return (None if stopped else out.get(timeout=5)), peak, stopped


def sharded(home: Path, budget: int, spine: pa.Table, workers: int, shards: int | None = None) -> dict:
    """The sharded engine on a cluster of ``workers`` worker processes started here."""
    scheduler = DaskScheduler().start()
    env = settings_for(home, budget).as_env()
    pool = [DaskWorker(scheduler.address, env=env).start() for _ in range(workers)]
    try:
        store = FeatureStore.from_settings(settings_for(home, budget, KEEL_COMPUTE=scheduler.address))
        reset_peak()
        t0 = time.perf_counter()
        result = store.get_training_set(spine, FEATURES, shards=shards)
        seconds = time.perf_counter() - t0
        report = result.shards
        per_worker = {w: max(t.peak_rss for t in report.tasks if t.worker == w) for w in report.workers}
        return {"seconds": seconds, "shards": report.shards, "driver": peak_rss(), "workers": per_worker,
                "rows": result.table.num_rows, "slowest": max(t.seconds for t in report.tasks)}  # fmt: skip
    finally:
        disconnect(scheduler.address)
        for w in pool:
            w.stop()
        scheduler.stop()


def show(label: str, run: dict, budget: int) -> None:
    peaks = [run["driver"], *run["workers"].values()]
    over = "ABOVE" if max(peaks) > budget else "within"
    print(
        f"{label}: {run['seconds']:7.1f}s  {run['shards']} shards  driver {run['driver'] / GB:.2f} GB, "
        + ", ".join(f"worker {i + 1} {p / GB:.2f} GB" for i, p in enumerate(run["workers"].values()))
        + f"  (every process {over} the budget; slowest shard {run['slowest']:.1f}s)"
    )


def big(args, budget: int) -> dict:
    """Runs 1 and 2: all the events, unsharded (stopped past the budget), then sharded on 1 and 2 workers."""
    print(f"generating {args.events:,} events of {args.entities:,} users over {args.days} days ...", flush=True)
    seconds = generate(args.home / "big", args.events, args.entities, args.days)
    spine = make_spine(args.spine, args.entities, args.days)
    print(f"data: written in {seconds:.0f}s; spine {spine.num_rows:,} rows; budget {budget / GB:.1f} GB per process")

    took, peak, stopped = unsharded(args.home / "big", budget, spine, stop_above=True)
    print(
        f"1 unsharded, all {args.events:,} events: "
        + (f"stopped at {peak / GB:.2f} GB, above the budget" if stopped else f"{took:.1f}s, peak {peak / GB:.2f} GB")
    )
    one = sharded(args.home / "big", budget, spine, workers=1)
    show("2 sharded, 1 worker ", one, budget)
    two = sharded(args.home / "big", budget, spine, workers=2)
    show("2 sharded, 2 workers", two, budget)
    print(f"  speed-up from 1 to 2 workers: {one['seconds'] / two['seconds']:.2f}x")
    return one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=50_000_000)
    parser.add_argument("--entities", type=int, default=5_000_000)
    parser.add_argument("--spine", type=int, default=5_000_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--budget", default="4GB", help="memory budget of every process, e.g. 4GB")
    parser.add_argument("--fit-events", type=int, help="size of run 3 (default: one shard's worth at the budget)")
    parser.add_argument("--home", type=Path, default=Path("/tmp/keel-bench-scale"))
    parser.add_argument("--only-fit", action="store_true", help="run 3 alone")
    parser.add_argument("--fit-shards", type=int, default=16, help="run 3's shards when run alone (else run 2's)")
    args = parser.parse_args()
    budget = settings_for(args.home, 1 << 30, KEEL_MAX_MEMORY=args.budget).max_memory

    shutil.rmtree(args.home, ignore_errors=True)
    shards = args.fit_shards
    if not args.only_fit:
        one = big(args, budget)
        shards = one["shards"]

    # The size the shard planner puts in one shard (its estimate is on the safe side of the measured).
    features = len(user_transactions.features)
    per_event = sharding.EVENT_BYTES + sharding.FEATURE_BYTES * features
    per_probe = (sharding.EVENT_BYTES + 2 * sharding.FEATURE_BYTES * features) * args.spine / args.events
    fit = args.fit_events or int((budget - sharding.PROCESS_BYTES) / (per_event + per_probe))
    ratio = fit / args.events
    fit_entities, fit_spine = max(1, int(args.entities * ratio)), max(1, int(args.spine * ratio))
    generate(args.home / "fit", fit, fit_entities, args.days)
    small = make_spine(fit_spine, fit_entities, args.days)
    took, peak, stopped = unsharded(args.home / "fit", budget, small, stop_above=False)
    again = sharded(args.home / "fit", budget, small, workers=1, shards=shards)
    print(
        f"3 {fit:,} events, {fit_spine:,} spine rows: unsharded {took:.1f}s (peak {peak / GB:.2f} GB, "
        f"{'ABOVE' if peak > budget else 'within'} the budget); sharded in {again['shards']} on 1 worker "
        f"{again['seconds']:.1f}s (peak {max(again['workers'].values()) / GB:.2f} GB): ratio {again['seconds'] / took:.2f}x"
    )
    shutil.rmtree(args.home, ignore_errors=True)


if __name__ == "__main__":
    main()
