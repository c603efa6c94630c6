"""The Kafka connection the stream sensors use, configured from KEEL_KAFKA_BOOTSTRAP."""

import os

import dagster as dg

from keel.config import VARIABLES, Settings


class KafkaResource(dg.ConfigurableResource):
    """Kafka brokers (``bootstrap``, unset when the project streams no events) and the stream worker's group."""

    bootstrap: str | None = None
    group_id: str = "keel-stream"

    def servers(self) -> str | None:
        if not self.bootstrap:
            return None
        # Checked as keel.config checks KEEL_KAFKA_BOOTSTRAP, so a bad value names the variable and the fix.
        return Settings.from_env({VARIABLES["kafka_bootstrap"].name: self.bootstrap}).kafka_bootstrap


def kafka_resource(settings: Settings | None = None) -> KafkaResource:
    if settings is not None:
        return KafkaResource(bootstrap=settings.kafka_bootstrap)
    var = VARIABLES["kafka_bootstrap"].name
    return KafkaResource(bootstrap=dg.EnvVar(var) if os.environ.get(var, "").strip() else None)
