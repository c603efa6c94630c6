"""Clients of the served world (tests/serving/conftest.py): the app over it with an inference log
that keeps what it is given, and what schemathesis' conformance checks say of an answer."""

import dataclasses
import datetime as dt

from fastapi.testclient import TestClient
from schemathesis import checks
from schemathesis.core.failures import FailureGroup

from keel.config import ServingSettings
from serving.app import create_app
from serving.breaker import CircuitBreaker
from serving.models import ModelSet
from serving.server import Server

LAST = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)


class Recorder:
    """An inference log that keeps what it is given."""

    def __init__(self):
        self.records, self.closed = [], False

    def log(self, record):
        self.records.append(record)

    def close(self):
        self.closed = True


def client_for(world, settings, online_project, *, names=("churn",), fast_path=True, **overrides):
    """A TestClient of the app serving ``names`` (a name with no registered model keeps it unready)."""
    serving = dataclasses.replace(ServingSettings(), **overrides)
    models = ModelSet(settings, online_project, list(names))
    models.refresh()
    server = Server(
        models=models,
        online=world["online"],
        project=online_project,
        canary=serving.canary,
        shadow=serving.shadow,
        breaker=CircuitBreaker(serving.breaker_failures, serving.breaker_reset_s),
        inference_log=Recorder(),
    )
    return TestClient(create_app(server, serving, fast_path=fast_path)), server


CONFORMANCE = (checks.status_code_conformance, checks.content_type_conformance, checks.response_schema_conformance)


def conformance_failures(case, response, *, server_errors: bool = False) -> list[str]:
    """What schemathesis' response-conformance checks say of one answer (nothing when it conforms);
    a 5xx fails too unless ``server_errors`` are what the caller provoked."""
    try:
        case.validate_response(
            response, checks=[*CONFORMANCE, *(() if server_errors else (checks.not_a_server_error,))]
        )
    except FailureGroup as group:
        return [f"{case.method} {case.formatted_path} -> {response.status_code}: {f.title}" for f in group.exceptions]
    return []
