"""Sensors and schedules reacting to things outside Dagster."""
