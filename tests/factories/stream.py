"""The demo project's Kafka topics and what a producer put on them, read back from the broker."""

import json
import time

from kafka import KafkaConsumer, TopicPartition

from keel.stream.kafka_io import end_offsets
from pipelines import project

TOPICS = {s.kafka_topic: 2 for s in project.sources if s.kafka_topic}
SOURCES = {s.kafka_topic: s for s in project.sources if s.kafka_topic}


def produced(bootstrap: str) -> dict[str, list[dict]]:
    """Every message on the source topics, parsed where it parses: topic -> [{partition, offset, event}]."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    tps = [TopicPartition(t, p) for t, n in TOPICS.items() for p in range(n)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    ends = end_offsets(bootstrap, tps)
    out = {t: [] for t in TOPICS}
    deadline = time.monotonic() + 10
    while any(consumer.position(tp) < ends[tp] for tp in tps) and time.monotonic() < deadline:
        for tp, records in consumer.poll(timeout_ms=200).items():
            for r in records:
                try:
                    event = json.loads(r.value)
                except ValueError:
                    event = None
                out[tp.topic].append({"partition": r.partition, "offset": r.offset, "event": event})
    consumer.close()
    return out


def valid_messages(messages) -> dict[str, set[str]]:
    """Per topic, the event ids of the messages the producer did not spoil."""
    out = {}
    for topic, items in messages.items():
        out[topic] = {
            m["event"]["event_id"]
            for m in items
            if m["event"]
            and "user_id" in m["event"]
            and m["event"]["event_ts"].endswith("Z")
            and not any(isinstance(v, str) and v.startswith("not ") for v in m["event"].values())
        }
    return out
