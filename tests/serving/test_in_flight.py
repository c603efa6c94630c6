"""The requests-in-flight gauge the serving autoscaler reads: up while a request is answered, down after."""

import asyncio

import pytest

from serving.app import BoundedRequests
from serving.metrics import ServingMetrics

NAME = "keel_serving_requests_in_flight"


def test_a_request_counts_in_flight_until_it_is_answered_or_fails():
    metrics = ServingMetrics()
    seen = []

    async def app(scope, receive, send):
        seen.append(metrics.registry.get_sample_value(NAME))
        if scope["path"] == "/boom":
            raise RuntimeError("the app failed")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = BoundedRequests(app, max_body_bytes=100, in_flight=metrics.in_flight)

    async def call(path: str) -> None:
        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            seen.append(message["type"])

        scope = {"type": "http", "method": "GET", "path": path, "headers": []}
        await middleware(scope, receive, send)

    asyncio.run(call("/health/live"))
    assert seen[0] == 1.0 and metrics.registry.get_sample_value(NAME) == 0.0
    seen.clear()
    with pytest.raises(RuntimeError, match="the app failed"):
        asyncio.run(call("/boom"))
    assert seen == [1.0] and metrics.registry.get_sample_value(NAME) == 0.0
