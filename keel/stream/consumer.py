"""The stream worker's Kafka consumer: opening it (missing topics created), committing offsets, lag.

Kafka's committed offsets serve monitoring (consumer lag) and are the fallback start; the
offsets that count are recorded in Iceberg with each append (``keel.stream.kafka_io``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from keel.stream.worker_config import StreamConfig, StreamError

log = logging.getLogger(__name__)


def open_consumer(bootstrap: str, config: StreamConfig, client_id: str, topics: Iterable[str]):
    """A KafkaConsumer in ``config.group_id`` that commits only when told; missing topics are created first."""
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    options = {
        "group_id": config.group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": config.session_timeout_ms,
        "heartbeat_interval_ms": max(100, config.session_timeout_ms // 3),
        "max_poll_interval_ms": 300_000,
        "fetch_max_wait_ms": 50,
        "max_poll_records": config.max_poll_records,
        "client_id": client_id,
        **config.consumer_options,
    }
    try:
        from keel.devservers import create_topics

        created = create_topics(bootstrap, {t: 3 for t in topics})
        if created:
            log.info("created missing topics %s (3 partitions each)", ", ".join(created))
        return KafkaConsumer(bootstrap_servers=bootstrap, **options)
    except KafkaError as exc:
        raise StreamError(
            f"cannot reach Kafka at KEEL_KAFKA_BOOTSTRAP={bootstrap!r}: {exc} "
            "(is the broker running, and the address right?)"
        ) from None


def commit_offsets(consumer, offsets: dict[str, dict[int, int]], topics: Iterable[str]) -> None:
    """Commit the next offsets of ``topics`` (``offsets``: topic -> partition -> offset) for the
    partitions the consumer holds; a failure is logged, not raised."""
    from kafka import OffsetAndMetadata, TopicPartition
    from kafka.errors import KafkaError

    assigned = {(tp.topic, tp.partition) for tp in consumer.assignment()}
    commit = {
        TopicPartition(topic, p): OffsetAndMetadata(o, "", -1)
        for topic in topics
        for p, o in offsets.get(topic, {}).items()
        if (topic, p) in assigned
    }
    if not commit:
        return
    try:
        consumer.commit(commit)
    except KafkaError as exc:
        # Iceberg holds the offsets that count; Kafka's serve monitoring and catch up at the next commit.
        log.warning("committing offsets to Kafka failed (%s); Iceberg has them", exc)


def report_lag(consumer, partitions: Iterable, gauge) -> None:
    """Set ``gauge{topic,partition}`` to each partition's lag where the consumer knows it."""
    for tp in partitions:
        high = consumer.highwater(tp)
        if high is None:
            continue
        try:
            position = consumer.position(tp, timeout_ms=0)
        except Exception:  # noqa: BLE001 - a position being reset has no lag to show yet
            continue
        if position is not None:
            gauge.labels(tp.topic, str(tp.partition)).set(max(0, high - position))


def total_lag(consumer, partitions: Iterable) -> int:
    """Messages behind the partitions' ends, summed (for the progress log; 0 without a consumer)."""
    if consumer is None:
        return 0
    return sum(max(0, (consumer.highwater(tp) or 0) - (consumer.position(tp, timeout_ms=0) or 0)) for tp in partitions)
