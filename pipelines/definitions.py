"""The Dagster code location: everything assets/, sensors/ and resources/ build for this project.

The loop's automation is on when the daemon runs (`make ui`, `make demo`): the landing,
retrain, alert and automation sensors and the daily schedules start in code (see README,
"Automation"). The stream health sensor exists only when KEEL_KAFKA_BOOTSTRAP is set.
"""

import dagster as dg

from assets.data_quality import quality_definitions
from assets.feature_groups import feature_group_definitions
from assets.inference_log import inference_log_definitions
from assets.maintenance import maintenance_definitions
from assets.models import model_definitions
from assets.monitoring import monitoring_definitions
from assets.online import online_definitions
from assets.predictions import prediction_definitions
from assets.raw_events import raw_event_definitions
from assets.serving import serving_definitions, serving_key
from keel.config import Settings
from keel.monitoring.declarations import monitors_for
from pipelines import project
from pipelines.models import MODELS
from pipelines.monitoring import MONITORS
from resources import resource_definitions
from sensors.alerts import alert_sensor_definitions
from sensors.automation import automation_sensor_definitions
from sensors.landing import sensor_definitions
from sensors.model_registry import model_registry_sensor_definitions
from sensors.retrain import retrain_sensor_definitions
from sensors.stream import stream_sensor_definitions

raw = raw_event_definitions(project)
monitoring = monitoring_definitions(project, monitors_for(MODELS, MONITORS))
quality = quality_definitions(project)
watched = [key for d in (monitoring, quality) for a in d.assets for key in a.check_keys]

defs = dg.Definitions.merge(
    raw,
    feature_group_definitions(project),
    online_definitions(project),
    maintenance_definitions(),
    model_definitions(project, MODELS),
    prediction_definitions(project, MODELS),
    serving_definitions(project, MODELS),
    inference_log_definitions(project, [serving_key(spec) for spec in MODELS]),
    monitoring,
    quality,
    sensor_definitions(project, list(raw.jobs)),
    stream_sensor_definitions(project) if Settings.from_env().kafka_bootstrap else dg.Definitions(),
    retrain_sensor_definitions(MODELS),
    model_registry_sensor_definitions(MODELS),
    alert_sensor_definitions(watched),
    automation_sensor_definitions(),
    resource_definitions(),
    # A run's steps run one after another in its own process: on a laptop a process per step
    # would cost more in start-up than the steps take, and runs already run side by side.
    dg.Definitions(executor=dg.in_process_executor),
)
