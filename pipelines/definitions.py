"""The Dagster code location: everything assets/, sensors/ and resources/ build for this project."""

import dagster as dg

from assets.feature_groups import feature_group_definitions
from assets.inference_log import inference_log_definitions
from assets.maintenance import maintenance_definitions
from assets.models import model_definitions
from assets.online import online_definitions
from assets.predictions import prediction_definitions
from assets.raw_events import raw_event_definitions
from pipelines import project
from pipelines.models import MODELS
from resources import resource_definitions
from sensors.landing import sensor_definitions
from sensors.retrain import retrain_sensor_definitions
from sensors.stream import stream_sensor_definitions

raw = raw_event_definitions(project)

defs = dg.Definitions.merge(
    raw,
    feature_group_definitions(project),
    online_definitions(project),
    maintenance_definitions(),
    model_definitions(project, MODELS),
    prediction_definitions(project, MODELS),
    inference_log_definitions(project),
    sensor_definitions(project, list(raw.jobs)),
    stream_sensor_definitions(project),
    retrain_sensor_definitions(MODELS),
    resource_definitions(),
)
