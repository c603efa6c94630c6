"""Stream worker speed: events/s per worker, and produce-to-servable latency at a fixed rate.

A Kafka-protocol broker (tansu) and Redis start on loopback ports (``keel.devservers``);
one ``keel stream`` worker runs as its own process on the demo project (micro-batches every
5 s, online store in Redis). Two phases:

- capacity: ``--backlog`` events wait on the topics before the worker starts; its rate from
  its first consumed event to the last is what one worker sustains (validate, online
  features and writes, Iceberg appends).
- live: ``--rate`` events/s for ``--seconds``, with a tracer event (a click of a user no one
  else uses) every 20 ms; a prober reads the tracer's online record until its ``feature_ts``
  reaches the event's: produce -> servable latency p50 / p99. The worker's own
  event -> online histogram is shown beside it (bucket-interpolated).

Floor, measured in the same run on the same messages: a bare kafka-python consumer reading
them (no parsing), in messages/s; the ratio is floor / worker.

With ``--workers N`` the workers share one consumer group: the capacity phase prints their
rate together and each worker's own (its events over its own first-to-last consumed span).

    .venv/bin/python bench/stream.py [--rate 5000] [--seconds 20] [--backlog 50000] [--workers 2]
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from kafka import KafkaConsumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from keel.config import Settings
from keel.devservers import KafkaBroker, RedisServer, create_topics, free_port
from keel.online.store import OnlineStore, to_us
from keel.stream.kafka_io import end_offsets
from keel.stream.producer import EventProducer, iso
from pipelines import project

REPO = Path(__file__).resolve().parents[1]
PARTITIONS = 3
USERS = 10_000
TRACERS = [f"u{USERS + i:05d}" for i in range(20)]
TRACE_EVERY_S = 0.02


class Worker:
    def __init__(self, env: dict, log: Path) -> None:
        self.port = free_port()
        self.log = log
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "keel.cli",
                "stream",
                "--group-id",
                "bench",
                "--metrics-port",
                str(self.port),
                "--session-timeout-ms",
                "1000",
            ],
            cwd=REPO,
            env=env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )

    def samples(self) -> list:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2).read().decode()
        except OSError:
            if self.process.poll() is not None:
                raise SystemExit(f"worker exited:\n{self.log.read_text()[-3000:]}") from None
            return []
        return [s for family in text_string_to_metric_families(text) for s in family.samples]

    def consumed(self) -> float:
        return sum(
            s.value
            for s in self.samples()
            if s.name == "keel_stream_events_total" and s.labels.get("outcome") == "consumed"
        )

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)


class _Group:
    """The workers of one consumer group, read and stopped together."""

    def __init__(self, workers: list[Worker]) -> None:
        self.workers = workers

    def samples(self) -> list:
        return [s for w in self.workers for s in w.samples()]

    def consumed(self) -> float:
        return sum(w.consumed() for w in self.workers)

    def stop(self) -> None:
        for w in self.workers:
            w.stop()


def histogram_quantiles(samples: list, name: str, since: list, qs=(0.5, 0.99)) -> list[float]:
    """Quantiles of a Prometheus histogram (summed over labels) between two scrapes, interpolated within buckets."""
    buckets: dict[float, float] = {}
    for sign, scrape in ((1, samples), (-1, since)):
        for s in scrape:
            if s.name == f"{name}_bucket":
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + sign * s.value
    bounds = sorted(buckets)
    counts = [buckets[b] for b in bounds]
    total = counts[-1] if counts else 0
    out = []
    for q in qs:
        if not total:
            out.append(float("nan"))
            continue
        rank = q * total
        i = next(i for i, c in enumerate(counts) if c >= rank)
        lo, below = (0.0, 0.0) if i == 0 else (bounds[i - 1], counts[i - 1])
        hi = bounds[i] if bounds[i] != float("inf") else lo
        out.append(lo + (hi - lo) * (rank - below) / max(counts[i] - below, 1e-9))
    return out


def floor_rate(bootstrap: str, topics: list[str]) -> tuple[int, float]:
    """Messages/s of a bare kafka-python consumer reading every message from the start."""
    tps = [TopicPartition(t, p) for t in topics for p in range(PARTITIONS)]
    ends = end_offsets(bootstrap, tps)
    total = sum(ends.values())
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, max_poll_records=5000)
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    consumer.poll(timeout_ms=0)
    n, t0 = 0, time.perf_counter()
    while n < total:
        for records in consumer.poll(timeout_ms=200).values():
            n += sum(len(r.value) > 0 for r in records)
    elapsed = time.perf_counter() - t0
    consumer.close()
    return total, total / elapsed


class Prober(threading.Thread):
    """Sends tracer clicks and reads the online store until each one is servable."""

    def __init__(self, producer: EventProducer, settings: Settings, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.producer = producer
        self.store = OnlineStore.from_settings(settings)
        self.group = project.group("user_clicks")
        self.stop_event = stop
        self.latencies: list[float] = []
        self.lost = 0

    def run(self) -> None:
        pending: dict[str, tuple[int, float]] = {}  # tracer -> (event ts us, sent at)
        next_send, i = time.perf_counter(), 0
        while not self.stop_event.is_set() or pending:
            now = time.perf_counter()
            if not self.stop_event.is_set() and now >= next_send:
                tracer = TRACERS[i % len(TRACERS)]
                if tracer not in pending:
                    moment = time.time()
                    event = {
                        "event_id": f"trace-{i}",
                        "user_id": tracer,
                        "event_ts": iso(_utc(moment)),
                        "session_id": f"trace-{tracer}",
                        "page": "home",
                        "device": "web",
                        "dwell_s": 1.0,
                    }
                    self.producer.producer.send("shop.clicks", key=tracer.encode(), value=json.dumps(event).encode())
                    pending[tracer] = (to_us(_utc(moment)), now)
                i += 1
                next_send += TRACE_EVERY_S
            if pending:
                names = sorted(pending)
                records = self.store.read([(self.group, ["click_count_24h"])], names)[0]
                done = time.perf_counter()
                for tracer, record in zip(names, records, strict=True):
                    ts, sent = pending[tracer]
                    if record is not None and record.ts >= ts:
                        self.latencies.append(done - sent)
                        del pending[tracer]
                    elif done - sent > 30:
                        self.lost += 1
                        del pending[tracer]
            time.sleep(0.002)
        self.store.close()


def _utc(seconds: float):
    import datetime as dt

    return dt.datetime.fromtimestamp(seconds, dt.UTC)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=5000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--backlog", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=1, help="keel stream processes in the one consumer group")
    args = parser.parse_args()

    topics = sorted(s.kafka_topic for s in project.sources if s.kafka_topic)
    with KafkaBroker() as broker, RedisServer() as redis, tempfile.TemporaryDirectory(prefix="keel-bench-") as home:
        create_topics(broker.bootstrap, {t: PARTITIONS for t in topics})
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env.update(
            KEEL_HOME=home,
            KEEL_CODE_VERSION="bench",
            KEEL_KAFKA_BOOTSTRAP=broker.bootstrap,
            KEEL_REDIS_URL=redis.url,
        )
        settings = Settings.from_env(env)
        producer = EventProducer(broker.bootstrap, project.sources, users=USERS, seed=1)

        t0 = time.perf_counter()
        for _ in range(args.backlog // 5000):
            producer.produce(5000)
        producer.produce(args.backlog % 5000)
        producer.producer.flush()
        print(f"backlog: {args.backlog:,} events produced in {time.perf_counter() - t0:.1f}s", flush=True)

        workers = [Worker(env, Path(home) / f"worker-{i}.log") for i in range(args.workers)]
        spans = [None] * len(workers)  # per worker: (first time it consumed, its count then, last time, count)
        while True:
            counts = [w.consumed() for w in workers]
            now = time.perf_counter()
            for i, n in enumerate(counts):
                if n and spans[i] is None:
                    spans[i] = (now, n, now, n)
                elif spans[i] is not None and n > spans[i][3]:
                    spans[i] = (spans[i][0], spans[i][1], now, n)
            if sum(counts) >= args.backlog:
                break
            time.sleep(
                0.1
            )  # a scrape renders every metric: often enough to time the span, rarely enough not to slow it
        rates = [(n - n0) / max(t - t0_, 1e-9) for t0_, n0, t, n in (sp for sp in spans if sp)]
        first_start = min(sp[0] for sp in spans if sp)
        capacity = (sum(counts) - sum(sp[1] for sp in spans if sp)) / max(now - first_start, 1e-9)
        print(f"{len(workers)} worker(s) caught up in {now - first_start:.1f}s", flush=True)
        worker = _Group(workers)

        stop = threading.Event()
        prober = Prober(producer, settings, stop)
        prober.start()
        before_samples = worker.samples()
        before = worker.consumed()
        t0 = time.perf_counter()
        report = producer.run(args.rate, args.seconds)
        live_seconds = time.perf_counter() - t0
        stop.set()
        prober.join(60)
        deadline = time.monotonic() + 60
        while worker.consumed() < args.backlog + report.total + len(prober.latencies) and time.monotonic() < deadline:
            time.sleep(0.05)
        samples = worker.samples()
        worker_live = (worker.consumed() - before) / live_seconds
        p50_hist, p99_hist = histogram_quantiles(samples, "keel_stream_event_to_online_seconds", before_samples)
        worker.stop()
        producer.close()

        total, floor = floor_rate(broker.bootstrap, topics)

    lat = np.array(prober.latencies) * 1000
    print(
        f"live: {report.total / live_seconds:,.0f} events/s produced for {live_seconds:.1f}s ({report.total:,} events)"
    )
    print(f"{'':<44}{'events/s':>12}{'x floor':>10}")
    print(f"{'floor: bare kafka-python consume':<44}{floor:>12,.0f}{1.0:>10.1f}")
    if len(rates) == 1:
        print(f"{'keel stream, one worker, catching up':<44}{capacity:>12,.0f}{floor / capacity:>10.1f}")
    else:
        print(f"{f'keel stream, {len(rates)} workers, catching up':<44}{capacity:>12,.0f}{floor / capacity:>10.1f}")
        for i, rate in enumerate(rates):
            print(f"{f'  worker {i + 1}, its own events/s':<44}{rate:>12,.0f}{floor / rate:>10.1f}")
    print(f"{'keel stream, live (all workers)':<44}{worker_live:>12,.0f}")
    print(f"produce -> servable, tracer reads ({len(lat)} samples, {prober.lost} lost):")
    print(f"  p50 {np.percentile(lat, 50):7.1f} ms   p99 {np.percentile(lat, 99):7.1f} ms   max {lat.max():7.1f} ms")
    print(f"event -> online write, worker histogram: p50 ~{p50_hist * 1000:.0f} ms   p99 ~{p99_hist * 1000:.0f} ms")
    print(f"(floor read {total:,} messages)")


if __name__ == "__main__":
    main()
