"""The stream health sensor: consumer lag and raw-table freshness as observations of raw/<source>."""

import json
import threading
import time

import dagster as dg

from keel.config import Settings
from keel.stream.producer import EventProducer
from keel.stream.worker import StreamWorker
from keel.stream.worker_config import StreamConfig
from pipelines import project
from resources import lakehouse_resource
from resources.kafka import KafkaResource
from sensors.stream import stream_health_sensor

TOPICS = {s.kafka_topic: 2 for s in project.sources if s.kafka_topic}


def tick(settings, bootstrap, group_id="keel-stream", cursor=None):
    context = dg.build_sensor_context(
        cursor=cursor,
        resources={
            "lakehouse": lakehouse_resource(settings),
            "kafka": KafkaResource(bootstrap=bootstrap, group_id=group_id),
        },
    )
    return stream_health_sensor(project).evaluate_tick(context)


def test_skips_without_kafka(settings):
    result = tick(settings, None)
    assert not result.asset_events
    assert "KEEL_KAFKA_BOOTSTRAP is not set" in result.skip_message


def test_records_lag_and_freshness_per_source(keel_home, kafka_topics, monkeypatch):
    bootstrap = kafka_topics(TOPICS)
    monkeypatch.setenv("KEEL_KAFKA_BOOTSTRAP", bootstrap)
    settings = Settings.from_env()
    group = f"sensor-{time.monotonic_ns()}"
    with EventProducer(bootstrap, project.sources, users=20, seed=5, mix={"clicks": 1.0}) as producer:
        first = producer.produce(120)
    worker = StreamWorker(
        settings,
        project,
        StreamConfig(group_id=group, batch_seconds=0.2, metrics_port=0, session_timeout_ms=1000, online=False),
    )
    # Stop once everything produced so far is appended (and committed).
    lake = worker.lake
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while lake.read("raw.clicks").num_rows < first.total and time.monotonic() < deadline:
        time.sleep(0.1)
    worker.stop()
    thread.join(20)
    with EventProducer(bootstrap, project.sources, users=20, seed=6, mix={"clicks": 1.0}) as producer:
        producer.produce(30)

    result = tick(settings, bootstrap, group)
    observations = {e.asset_key.path[-1]: e for e in result.asset_events}
    assert set(observations) == {"clicks", "signups", "transactions"}
    clicks = observations["clicks"].metadata
    assert clicks["consumer_lag"].value == 30
    by_partition = clicks["lag_by_partition"].value
    assert sum(p["lag"] for p in by_partition.values()) == 30
    assert sum(p["committed"] for p in by_partition.values()) == 120
    assert 0 <= clicks["freshness_s"].value < 60
    assert observations["signups"].metadata["consumer_lag"].value == 0
    assert "freshness_s" not in observations["signups"].metadata
    assert json.loads(result.cursor)["readings"]["clicks"]["lag"] == 30
