"""Model monitoring: declarations, drift statistics and reports, performance, data quality, monitor runs, replay, alerts, Prometheus export."""
