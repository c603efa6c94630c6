"""Online read latency: ``FeatureStore.get_online_features`` against a raw redis-py pipeline.

A Redis server is started on a loopback port (``keel.devservers``; or ``--redis-url``). Two
online groups of ten features each (counts, sums, averages, a string and a timestamp:
``bench/online_features.py``, typed) hold ``--entities`` users, written through
``OnlineStore.write``. Then, interleaved so both see
the same server state:

- ours: ``get_online_features(ids, 20 features)``: resolve (cached), one pipelined round
  trip of one HMGET per (group, entity), decode to Python values, age and status per value;
- floor: the same HMGETs (same keys, same fields, ``_ts`` included) in a raw redis-py
  pipeline, bytes left undecoded.

For 1 and for 100 entities per lookup, ``--lookups`` timed lookups each (after a warm-up)
give p50 / p95 / p99 in microseconds, and the ratio of ours to the floor.

    .venv/bin/python bench/online_read.py [--entities 10000] [--lookups 5000]
"""

import argparse
import random
import time

import numpy as np
import redis
from online_features import entity_ids, feature_columns, fill, online_project

from keel.devservers import RedisServer
from keel.online.redis_backend import RedisOnlineStore
from keel.online.store import record_name
from keel.store import FeatureStore


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    p50, p95, p99 = np.percentile(np.array(samples) * 1e6, [50, 95, 99])
    return p50, p95, p99


def measure(fs: FeatureStore, client: redis.Redis, groups, features, ids, batch: int, lookups: int, prefix: str):
    fields = {g.name: [b"_ts", *[f.name.encode() for f in g.features]] for g in groups}
    records = {g.name: record_name(g) for g in groups}
    rng = random.Random(batch)
    ours, floor = [], []
    for i in range(lookups + lookups // 10):
        chosen = rng.sample(ids, batch)
        t0 = time.perf_counter()
        found = fs.get_online_features(chosen, features)
        t1 = time.perf_counter()
        pipe = client.pipeline(transaction=False)
        for g in groups:
            for e in chosen:
                pipe.hmget(f"{prefix}:{records[g.name]}:{e}", fields[g.name])
        raw = pipe.execute()
        t2 = time.perf_counter()
        assert len(found) == batch and len(raw) == batch * len(groups)
        if i >= lookups // 10:  # the first tenth warms up
            ours.append(t1 - t0)
            floor.append(t2 - t1)
    return percentiles(ours), percentiles(floor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entities", type=int, default=10_000)
    parser.add_argument("--lookups", type=int, default=5_000)
    parser.add_argument("--redis-url", help="an existing Redis (default: start one on a free loopback port)")
    args = parser.parse_args()

    server = None if args.redis_url else RedisServer().start()
    url = args.redis_url or server.url
    try:
        project = online_project(typed=True)
        groups = list(project.feature_groups)
        store = RedisOnlineStore(url, prefix="bench")
        fs = FeatureStore(None, project, store)
        t = time.perf_counter()
        ids = entity_ids(args.entities)
        fill(store, groups, ids, feature_columns(np.random.default_rng(7), args.entities, groups))
        print(f"wrote {args.entities:,} entities x {len(groups)} groups in {time.perf_counter() - t:.2f}s to {url}")
        features = [f"{g.name}.{f.name}" for g in groups for f in g.features]
        client = redis.Redis.from_url(url)
        print(f"{'lookup':<28}{'ours p50/p95/p99 us':>24}{'floor p50/p95/p99 us':>26}{'p99 ratio':>11}")
        for batch in (1, 100):
            lookups = args.lookups if batch == 1 else max(args.lookups // 10, 200)
            ours, floor = measure(fs, client, groups, features, ids, batch, lookups, "bench")
            label = f"{batch} entit{'y' if batch == 1 else 'ies'} x {len(features)} features"
            print(
                f"{label:<28}{'/'.join(f'{v:.0f}' for v in ours):>24}{'/'.join(f'{v:.0f}' for v in floor):>26}"
                f"{ours[2] / floor[2]:>10.2f}x"
            )
        client.close()
        store.close()
    finally:
        if server:
            server.stop()


if __name__ == "__main__":
    main()
