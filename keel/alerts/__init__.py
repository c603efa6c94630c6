"""Alerts: one deduplicated alert per failing condition (policy), delivered to the console, a JSONL file and a webhook (sinks). Monitoring and the landing sensor both raise them."""
