"""How the shop's models are monitored: thresholds beyond the defaults, and when labels land."""

from keel.monitoring.declarations import MonitorSpec
from pipelines.models import churn

churn_monitor = MonitorSpec(
    model=churn,
    # A churn label says whether the user did anything in the 30 days after its time, so it lands 30 days late.
    label_delay="30d",
    # Labels are weekly: a prediction is judged by its user's next label, up to a week later.
    label_window="7d",
    min_rows=100,
    # The shop's known shifts (basket size, dwell time, the sign-up mix) move about half of the
    # 26 features; counts and ratios stay put by design. At the default share of 0.5 the verdict
    # would flip day to day on one or two noisy features; 0.3 flags the shift and not the noise
    # (the quiet fortnight before it peaks at 0.19).
    drift_share=0.3,
)

MONITORS = (churn_monitor,)
