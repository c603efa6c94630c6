"""``keel stream`` as a process: SIGTERM drains and commits; SIGKILL loses nothing and duplicates nothing."""

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from kafka import KafkaAdminClient
from prometheus_client.parser import text_string_to_metric_families

from keel.config import Settings
from keel.devservers import free_port
from keel.ingest.batch import QUARANTINE_TABLE
from keel.lakehouse.tables import Lakehouse
from keel.online.consistency import check_consistency
from keel.online.store import OnlineStore, entity_key
from keel.store import FeatureStore
from keel.stream.producer import EventProducer
from pipelines import project
from tests.factories.stream import SOURCES, TOPICS, produced, valid_messages
from tests.factories.timing import wait_for

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def stream_env(keel_home, kafka_topics, clean_redis_url, monkeypatch):
    bootstrap = kafka_topics(TOPICS)
    monkeypatch.setenv("KEEL_KAFKA_BOOTSTRAP", bootstrap)
    monkeypatch.setenv("KEEL_REDIS_URL", clean_redis_url)
    return bootstrap


@pytest.fixture
def start_worker(tmp_path):
    """``start(group, batch_seconds)`` runs ``keel stream``; any worker still running at the end is killed."""
    started = []

    def start(group: str, batch_seconds: float) -> Worker:
        started.append(Worker(tmp_path, group, batch_seconds))
        return started[-1]

    yield start
    for worker in started:
        if worker.process.poll() is None:
            worker.process.kill()
            worker.process.wait(10)


class Worker:
    """``keel stream`` in a child process, its metrics on a free port."""

    def __init__(self, tmp: Path, group: str, batch_seconds: float) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        self.log_path = tmp / f"worker-{self.port}.log"
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "keel.cli",
                "stream",
                "--group-id",
                group,
                "--batch-seconds",
                str(batch_seconds),
                "--metrics-port",
                str(self.port),
                "--session-timeout-ms",
                "1000",
                "--log-every",
                "1",
            ],
            cwd=REPO,
            env=env,
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str, **labels) -> float:
        """Sum of a metric's samples matching ``labels`` (0 before the worker serves metrics)."""
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=1).read().decode()
        except OSError:
            assert self.process.poll() is None, f"worker exited early:\n{self.log()}"
            return 0.0
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    def consumed(self) -> float:
        return self.metric("keel_stream_events_total", outcome="consumed")

    def signal(self, sig) -> int:
        self.process.send_signal(sig)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"worker did not exit on {sig!r}:\n{self.log()}") from None


def committed_offsets(bootstrap: str, group: str) -> dict:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        return {(tp.topic, tp.partition): m.offset for tp, m in admin.list_group_offsets({group: None})[group].items()}
    finally:
        admin.close()


def ends_of(messages) -> dict:
    ends = {}
    for topic, items in messages.items():
        for m in items:
            ends[(topic, m["partition"])] = max(ends.get((topic, m["partition"]), 0), m["offset"] + 1)
    return ends


def assert_exactly_once(lake: Lakehouse, messages) -> None:
    for topic, ids in valid_messages(messages).items():
        rows = lake.read(SOURCES[topic].table_name)["event_id"].to_pylist()
        assert len(rows) == len(set(rows)), f"{topic}: {len(rows) - len(set(rows))} duplicate rows"
        assert set(rows) == ids, f"{topic}: {len(ids - set(rows))} missing, {len(set(rows) - ids)} unexpected"


def assert_online_matches_offline(settings: Settings, lake: Lakehouse) -> None:
    with OnlineStore.from_settings(settings) as online:
        report = check_consistency(FeatureStore(lake, project), online, sample=10_000)
        assert report.compared > 0
        assert report.match_rate == 1.0, report.mismatches[:5]
        # And the values are the latest: as of each user's newest event of the group's source.
        for name in ("user_clicks", "user_transactions"):
            group = project.group(name)
            events = lake.read(group.source.table_name, columns=["user_id", "event_ts"])
            newest = {}
            for user, ts in zip(events["user_id"].to_pylist(), events["event_ts"].to_pylist(), strict=True):
                newest[user] = max(ts, newest.get(user, ts))
            users = sorted(newest)
            records = online.read([(group, [group.features[0].name])], [entity_key([u]) for u in users])[0]
            stale = [
                u for u, r in zip(users, records, strict=True) if r is None or r.ts != int(newest[u].timestamp() * 1e6)
            ]
            assert not stale, f"{name}: online values not at the newest event for {stale[:5]}"


def test_sigterm_drains_the_micro_batch_and_commits(stream_env, start_worker):
    bootstrap = stream_env
    with EventProducer(bootstrap, project.sources, users=40, seed=11, bad_every=30) as producer:
        report = producer.produce(300)
    group = f"term-{time.monotonic_ns()}"
    worker = start_worker(group, batch_seconds=120)
    wait_for(lambda: worker.consumed() >= report.total, what=f"worker to consume {report.total} events")
    settings = Settings.from_env()
    lake = Lakehouse.from_settings(settings)
    # Consumed and served online, but nothing appended yet: the batch interval is long.
    assert sum(lake.read(s.table_name).num_rows for s in SOURCES.values()) == 0
    with OnlineStore.from_settings(settings) as online:
        wait_for(lambda: online.sample(project.group("user_clicks"), 5), timeout=5, what="online values")

    assert worker.signal(signal.SIGTERM) == 0, worker.log()

    messages = produced(bootstrap)
    assert_exactly_once(lake, messages)
    quarantine = lake.read(QUARANTINE_TABLE)
    assert quarantine.num_rows == report.bad == 10
    assert committed_offsets(bootstrap, group) == ends_of(messages)
    assert "stopped: 300 consumed" in worker.log()


def test_sigkill_mid_stream_then_restart_loses_and_duplicates_nothing(stream_env, start_worker):
    bootstrap = stream_env
    settings = Settings.from_env()
    lake = Lakehouse.from_settings(settings)
    producer = EventProducer(bootstrap, project.sources, users=60, seed=12, bad_every=50)
    done = threading.Event()
    thread = threading.Thread(target=lambda: (producer.run(rate=250, seconds=6), done.set()), daemon=True)
    thread.start()
    group = f"kill-{time.monotonic_ns()}"
    first = start_worker(group, batch_seconds=1)

    def appended_with_more_waiting() -> bool:
        written = first.metric("keel_stream_rows_written_total")
        valid = first.metric("keel_stream_events_total", outcome="valid")
        return written > 0 and valid > written + 20

    wait_for(appended_with_more_waiting, what="a committed micro-batch with more events waiting")
    assert first.signal(signal.SIGKILL) == -signal.SIGKILL
    in_iceberg = sum(lake.read(s.table_name).num_rows for s in SOURCES.values())
    assert in_iceberg > 0

    second = start_worker(group, batch_seconds=1)
    assert done.wait(30)
    producer.close()
    messages = produced(bootstrap)
    expected = sum(len(ids) for ids in valid_messages(messages).values())
    assert expected > in_iceberg
    wait_for(
        lambda: sum(lake.read(s.table_name).num_rows for s in SOURCES.values()) >= expected,
        timeout=30,
        what="the restarted worker to append every event",
    )
    assert second.signal(signal.SIGTERM) == 0, second.log()
    assert "from Iceberg offsets: shop." in second.log()

    assert_exactly_once(lake, messages)
    quarantine = lake.read(QUARANTINE_TABLE)
    spots = list(zip(quarantine["file"].to_pylist(), quarantine["row_number"].to_pylist(), strict=True))
    assert len(spots) == len(set(spots)) == sum(1 for items in messages.values() for m in items) - expected
    assert committed_offsets(bootstrap, group) == ends_of(messages)
    assert_online_matches_offline(settings, lake)


def assigned(worker: Worker) -> list[int]:
    """How many partitions each assignment gave the worker, from its log, in order."""
    return [int(line.split("assigned ")[1].split()[0]) for line in worker.log().splitlines() if "assigned " in line]


def test_two_workers_share_the_partitions_and_survive_a_kill_and_a_rejoin(stream_env, start_worker):
    """One consumer group, two ``keel stream`` processes: the partitions split between them; one is
    SIGKILLed mid-stream and the other takes its partitions over; a new one joins and they split
    again. Every event lands once, nothing is lost at either rebalance, and online equals offline."""
    bootstrap = stream_env
    settings = Settings.from_env()
    lake = Lakehouse.from_settings(settings)
    partitions = sum(TOPICS.values())
    producer = EventProducer(bootstrap, project.sources, users=60, seed=13, bad_every=50)
    done = threading.Event()
    thread = threading.Thread(target=lambda: (producer.run(rate=300, seconds=10), done.set()), daemon=True)
    thread.start()
    group = f"pair-{time.monotonic_ns()}"
    a, b = start_worker(group, batch_seconds=1), start_worker(group, batch_seconds=1)

    def split() -> bool:
        got_a, got_b = assigned(a), assigned(b)
        return bool(got_a and got_b) and got_a[-1] + got_b[-1] == partitions and min(got_a[-1], got_b[-1]) > 0

    wait_for(split, what=f"the {partitions} partitions to split between the two workers")
    wait_for(lambda: a.consumed() > 0 and b.metric("keel_stream_rows_written_total") > 0, what="both to work")
    assert b.signal(signal.SIGKILL) == -signal.SIGKILL
    wait_for(lambda: assigned(a)[-1] == partitions, timeout=30, what="the survivor to take every partition")
    before = a.consumed()
    wait_for(lambda: a.consumed() > before, what="the survivor to consume the killed worker's partitions")

    c = start_worker(group, batch_seconds=1)
    wait_for(lambda: assigned(c) and assigned(c)[-1] > 0 and assigned(a)[-1] < partitions, timeout=30, what="a rejoin")
    assert done.wait(30)
    producer.close()
    messages = produced(bootstrap)
    expected = sum(len(ids) for ids in valid_messages(messages).values())
    wait_for(
        lambda: sum(lake.read(s.table_name).num_rows for s in SOURCES.values()) >= expected,
        timeout=30,
        what="every event appended",
    )
    assert a.signal(signal.SIGTERM) == 0, a.log()
    # A worker leaving starts a rebalance, and a commit to Kafka during one fails (Iceberg holds the
    # offsets): the last worker stops once it holds every partition, so its commit covers them all.
    wait_for(lambda: assigned(c)[-1] == partitions, timeout=30, what="the last worker to take every partition")
    assert c.signal(signal.SIGTERM) == 0, c.log()

    assert_exactly_once(lake, messages)
    assert committed_offsets(bootstrap, group) == ends_of(messages)
    assert_online_matches_offline(settings, lake)
