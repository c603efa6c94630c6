"""Models: the declaration and training, the MLflow registry and roles, promotion, reproduction, baselines and references, batch prediction."""
