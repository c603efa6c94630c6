"""The serving process: loads MLflow-registered models by alias and hydrates features from the online store.

It depends on keel, never on Dagster. ``build_app`` makes the ASGI app from the settings;
``keel serve`` runs it on uvicorn.
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

    from keel.config import ServingSettings, Settings


def build_app(
    settings: Settings | None = None, serving: ServingSettings | None = None, *, inference_log=None
) -> FastAPI:
    """Load every served model's champion (and challenger) and return the app; the registry
    is polled every ``serving.poll_s`` while the app runs."""
    from keel.config import ServingSettings, Settings
    from keel.models.spec import load_models
    from keel.online.store import OnlineStore
    from keel.project import load_project
    from serving.app import create_app
    from serving.breaker import CircuitBreaker
    from serving.models import ModelSet, RegistryPoller
    from serving.server import Server

    settings = settings or Settings.from_env()
    serving = serving or ServingSettings.from_env()
    project = load_project(settings.project)
    names = serving.models or tuple(load_models(settings.project))
    models = ModelSet(settings, project, names)
    models.refresh()
    timeout = serving.online_timeout_ms / 1000
    online = (
        OnlineStore.from_settings(settings, socket_timeout=timeout, socket_connect_timeout=timeout)
        if settings.redis_url
        else OnlineStore.from_settings(settings)
    )
    server = Server(
        models=models,
        online=online,
        project=project,
        canary=serving.canary,
        shadow=serving.shadow,
        breaker=CircuitBreaker(serving.breaker_failures, serving.breaker_reset_s),
        inference_log=inference_log,
    )
    for name in names:
        server.metrics.canary_share.labels(name).set(serving.canary)
    # The loaded models, MLflow and the engine leave ~400k long-lived objects; a full
    # collection over them stalls a worker for ~250 ms. Frozen, collections skip them.
    gc.collect()
    gc.freeze()
    return create_app(server, serving, RegistryPoller(models, serving.poll_s))
