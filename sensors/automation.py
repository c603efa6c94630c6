"""The sensor that evaluates the assets' automation conditions (online syncs, monitoring, data quality)."""

import dagster as dg

from sensors import every


def automation_sensor_definitions() -> dg.Definitions:
    """Dagster would add a stopped ``default_automation_condition_sensor``; this one is declared
    running, so the eager assets update when their inputs do as soon as the daemon runs."""
    interval = every(30)
    return dg.Definitions(
        sensors=[
            dg.AutomationConditionSensorDefinition(
                "keel_automation",
                target=dg.AssetSelection.all(),
                default_status=dg.DefaultSensorStatus.RUNNING,
                minimum_interval_seconds=interval,
                description=(
                    f"Evaluates every asset's automation condition each {interval} s: online/<group> syncs when its feature "
                    "table publishes new days, monitoring/* and the data quality assets judge the latest window when "
                    "their inputs update. Stop it here to keep the assets from updating on their own."
                ),
            )
        ]
    )
