"""Sensors and schedules reacting to things outside Dagster."""

from keel.config import Settings


def every(default_s: int) -> int:
    """Seconds between a sensor's evaluations: ``KEEL_SENSOR_INTERVAL_S`` when set (read when the
    code location loads), else the sensor's own ``default_s``."""
    return Settings.from_env().sensor_interval_s or default_s
