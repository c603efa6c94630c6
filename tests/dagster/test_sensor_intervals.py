"""KEEL_SENSOR_INTERVAL_S sets one evaluation interval for every sensor; unset, each keeps its own."""

import dagster as dg
import pytest

from pipelines import project
from pipelines.models import MODELS
from sensors.alerts import alert_sensor_definitions
from sensors.automation import automation_sensor_definitions
from sensors.landing import sensor_definitions
from sensors.model_registry import model_registry_sensor_definitions
from sensors.retrain import retrain_sensor_definitions
from sensors.stream import stream_sensor_definitions

CHECK = dg.AssetCheckKey(dg.AssetKey(["monitoring", "churn_drift"]), "drift")


def intervals() -> dict[str, int]:
    made = [
        alert_sensor_definitions([CHECK]),
        automation_sensor_definitions(),
        sensor_definitions(project, []),
        model_registry_sensor_definitions(MODELS),
        retrain_sensor_definitions(MODELS),
        stream_sensor_definitions(project),
    ]
    return {sensor.name: sensor.minimum_interval_seconds for d in made for sensor in d.sensors}


def test_every_sensor_keeps_its_own_interval_by_default(keel_home):
    assert intervals() == {
        "monitoring_alerts": 60,
        "keel_automation": 30,
        "landing_files": 30,
        "model_registry": 30,
        "retrain_churn": 60,
        "stream_health": 30,
    }


@pytest.mark.parametrize("seconds", [5, 600])
def test_one_variable_sets_every_sensors_interval(keel_home, monkeypatch, seconds):
    monkeypatch.setenv("KEEL_SENSOR_INTERVAL_S", str(seconds))
    assert set(intervals().values()) == {seconds}
    assert f"each {seconds} s" in automation_sensor_definitions().sensors[0].description
