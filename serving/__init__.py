"""The serving process: loads MLflow-registered models by alias and hydrates features from the online store.

It depends on keel, never on Dagster. The process itself arrives with the serving issue.
"""
