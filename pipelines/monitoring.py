"""How the shop's models are monitored: thresholds beyond the defaults, and when labels land."""

from keel.monitoring import MonitorSpec
from pipelines.models import churn

churn_monitor = MonitorSpec(
    model=churn,
    # A churn label says whether the user did anything in the 30 days after its time, so it lands 30 days late.
    label_delay="30d",
    # Labels are weekly: a prediction is judged by its user's next label, up to a week later.
    label_window="7d",
    min_rows=100,
)

MONITORS = (churn_monitor,)
