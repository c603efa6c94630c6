"""The stream's health as asset observations: consumer lag per topic and freshness of each raw table."""

import datetime as dt
import json

import dagster as dg

from keel.project import Project
from keel.stream.kafka_io import group_lag, newest_event
from resources import LakehouseResource
from resources.kafka import KafkaResource
from sensors import every


def stream_health_sensor(project: Project) -> dg.SensorDefinition:
    sources = [s for s in project.sources if s.kafka_topic]

    @dg.sensor(
        name="stream_health",
        minimum_interval_seconds=every(30),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            "When KEEL_KAFKA_BOOTSTRAP is set: the stream worker's consumer lag per topic (log end offsets "
            "against the group's committed offsets) and each raw table's freshness (seconds from its newest "
            "event to now), recorded as observations of raw/<source>. The cursor holds the last readings."
        ),
    )
    def stream_health(context: dg.SensorEvaluationContext, lakehouse: LakehouseResource, kafka: KafkaResource):
        bootstrap = kafka.servers()
        if not bootstrap:
            return dg.SkipReason("KEEL_KAFKA_BOOTSTRAP is not set: no stream to watch")
        if not sources:
            return dg.SkipReason(f"project {project.name!r} declares no source with a kafka_topic")
        from kafka.errors import KafkaError

        try:
            lag = group_lag(bootstrap, kafka.group_id, [s.kafka_topic for s in sources])
        except KafkaError as exc:
            return dg.SkipReason(f"cannot reach Kafka at {bootstrap}: {exc}")
        lake = lakehouse.lakehouse()
        now = dt.datetime.now(dt.UTC)
        observations, readings = [], {}
        for source in sources:
            partitions = {p: v for (topic, p), v in sorted(lag.items()) if topic == source.kafka_topic}
            total = sum(v["lag"] for v in partitions.values())
            newest = newest_event(lake, source)
            metadata = {
                "topic": source.kafka_topic,
                "consumer_group": kafka.group_id,
                "consumer_lag": total,
                "lag_by_partition": dg.MetadataValue.json(
                    {
                        str(p): {"end": v["end"], "committed": v["committed"], "lag": v["lag"]}
                        for p, v in partitions.items()
                    }
                ),
            }
            reading = {"lag": total}
            if newest is not None:
                freshness = max(0.0, (now - newest).total_seconds())
                metadata["freshness_s"] = dg.MetadataValue.float(round(freshness, 3))
                metadata["newest_event_ts"] = dg.MetadataValue.timestamp(newest)
                reading["freshness_s"] = round(freshness, 3)
            observations.append(dg.AssetObservation(asset_key=dg.AssetKey(["raw", source.name]), metadata=metadata))
            readings[source.name] = reading
        context.log.info("stream health: " + ", ".join(f"{k} {v}" for k, v in readings.items()))
        cursor = json.dumps({"at": now.isoformat(), "readings": readings}, sort_keys=True)
        return dg.SensorResult(asset_events=observations, cursor=cursor)

    return stream_health


def stream_sensor_definitions(project: Project) -> dg.Definitions:
    return dg.Definitions(sensors=[stream_health_sensor(project)])
