"""The serving API on FastAPI: Keel's predict-by-entity REST and the Open Inference Protocol.

FastAPI (a dependency MLflow already brings) validates bodies against typed models
(``serving.schema``) and publishes the OpenAPI schema the fuzz tests run against: every
status a route answers is documented there, and every refusal or failure, on every route,
is ``{"error": "<message>"}`` (the Open Inference Protocol's error object), a malformed body
a 422 naming the field. Request-time feature values are checked against the features'
declarations (``serving.inputs``). Bodies are bounded in bytes and entities, and reads of
the online store in time. Admin endpoints need an API key (``Authorization: Bearer KEY`` or
``X-API-Key``), compared in constant time; predictions too when ``protect_predict`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import json
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from keel.config import ServingSettings
from serving.models import RegistryPoller
from serving.schema import (
    API_KEY,
    API_KEY_SCHEMES,
    EVERY_ROUTE,
    FAULT,
    PROMETHEUS_TEXT,
    TOO_BIG,
    UNAUTHORISED,
    UNREADABLE,
    AdminModels,
    InferRequest,
    InferResponse,
    Live,
    Loading,
    ModelMetadata,
    PredictRequest,
    PredictResponse,
    Ready,
    Reloaded,
    V2Live,
    V2Ready,
    error,
    json_error,
)
from serving.server import BadInput, Server, UnknownModel

log = logging.getLogger("keel.serving")
# Predictions take a fast path in BoundedRequests; the FastAPI route documents them (OpenAPI).
PREDICT_PREFIX = "/v1/models/"
PREDICT_ROUTE, INFER_ROUTE = "/v1/models/{name}/predict", "/v2/models/{name}/infer"
NEEDS_KEY = "an API key is required (Authorization: Bearer KEY or X-API-Key)"
ADMIN_OFF = "admin endpoints are off: set KEEL_SERVE_API_KEYS to enable them"
ADMIN_KEY = "a valid API key is required (Authorization: Bearer KEY or X-API-Key)"


class PrometheusText(Response):
    media_type = PROMETHEUS_TEXT


def create_app(
    server: Server, settings: ServingSettings, poller: RegistryPoller | None = None, *, fast_path: bool = True
) -> FastAPI:
    """The ASGI app over a ``Server``; ``poller`` (started and stopped with the app) keeps models fresh.

    ``fast_path`` answers predictions in the ASGI layer (``BoundedRequests``) without FastAPI's
    per-request machinery; off, FastAPI's route answers them (the same validation and answer).
    """

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        if poller is not None:
            poller.start()
        try:
            yield
        finally:
            if poller is not None:
                poller.stop()
            if server.inference_log is not None:
                server.inference_log.close()
            # Objects frozen at start or on a swap are collected normally again on the way out.
            gc.unfreeze()

    app = FastAPI(title="Keel serving", version="1", lifespan=lifespan, responses=EVERY_ROUTE)
    keys = [k.encode() for k in settings.api_keys]
    guarded = {"security": API_KEY}
    # Predictions need a key only when protect_predict is set; the schema says so only then.
    scoring_refusals = {401: UNAUTHORISED} if settings.protect_predict else {}
    scoring_security = guarded if settings.protect_predict else None

    def authorised(request: Request) -> bool:
        return _authorised(keys, request.headers.get("x-api-key"), request.headers.get("authorization"))

    def refuse(name: str, status: int, message: str) -> JSONResponse:
        server.metrics.refused(served_name(server, name), status)
        return _error(status, message)

    def count_if_scoring(request: Request) -> bool:
        """Count an unreadable request to a scoring route as the fast path does; False for other routes."""
        if getattr(request.scope.get("route"), "path", None) not in (PREDICT_ROUTE, INFER_ROUTE):
            return False
        server.metrics.refused(served_name(server, request.path_params.get("name", "")), 422)
        return True

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        count_if_scoring(request)
        return _error(422, validation_message(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        # FastAPI answers 400 for a body it cannot decode (not UTF-8), where it answers 422 for
        # JSON it cannot parse, and the fast path 422 for both: one status for an unreadable body.
        if exc.status_code == 400 and count_if_scoring(request):
            return _error(422, f"body: {exc.detail} (send JSON in UTF-8)")
        # An unknown path (404) or method (405): the same error object as every other refusal.
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def failed(_: Request, exc: Exception):
        # Starlette raises the exception again once this is sent, and uvicorn logs its traceback.
        return _error(500, "the server failed to answer; the server log has the traceback")

    @app.get("/health/live", responses={200: {"model": Live}})
    async def live():
        return {"status": "live"}

    @app.get("/health/ready", responses={200: {"model": Ready}, 503: {"model": Loading, "description": "Loading"}})
    async def ready():
        if server.models.ready:
            return {"status": "ready", "models": {n: m.versions for n, m in server.models.snapshot().items()}}
        return JSONResponse({"status": "loading", "errors": server.models.errors}, status_code=503)

    @app.get("/v2/health/live", responses={200: {"model": V2Live}})
    async def v2_live():
        return {"live": True}

    @app.get("/v2/health/ready", responses={200: {"model": V2Ready}, 503: {"model": V2Ready, "description": "Loading"}})
    async def v2_ready():
        return JSONResponse({"ready": server.models.ready}, status_code=200 if server.models.ready else 503)

    # The answer is built by Server and returned as is: re-validating it against the model
    # would cost ~10% of a request. The model documents it in the OpenAPI schema.
    @app.post(
        PREDICT_ROUTE,
        responses={
            200: {"model": PredictResponse},
            **scoring_refusals,
            404: error("No model of that name is served here"),
            422: UNREADABLE,
        },
        openapi_extra=scoring_security,
    )
    async def predict(name: str, body: PredictRequest, request: Request):
        status, out = answer_predict(server, settings, name, body, authorised(request))
        return JSONResponse(out, status_code=status)

    def fast_predict(name: str, raw: bytes, headers: dict[bytes, bytes]) -> tuple[int, dict]:
        """The same answer as the route above, without FastAPI's per-request machinery."""
        try:
            body = PredictRequest.model_validate_json(raw)
        except ValidationError as exc:
            server.metrics.refused(served_name(server, name), 422)
            return 422, {"error": validation_message(exc.errors())}
        allowed = _authorised(keys, _text(headers.get(b"x-api-key")), _text(headers.get(b"authorization")))
        return answer_predict(server, settings, name, body, allowed)

    app.add_middleware(
        BoundedRequests,
        max_body_bytes=settings.max_body_bytes,
        predict=fast_predict if fast_path else None,
        in_flight=server.metrics.in_flight,
    )

    @app.get(
        "/v2/models/{name}",
        responses={
            200: {"model": ModelMetadata},
            404: error("No model of that name is served here"),
            422: error("The request does not fit the schema"),
        },
    )
    async def metadata(name: str):
        try:
            return server.describe(name)
        except UnknownModel as exc:
            return _error(404, str(exc))

    @app.post(
        INFER_ROUTE,
        responses={
            200: {"model": InferResponse},
            **scoring_refusals,
            404: error("No model of that name is served here"),
            422: UNREADABLE,
        },
        openapi_extra=scoring_security,
    )
    async def infer(name: str, body: InferRequest, request: Request):
        if settings.protect_predict and not authorised(request):
            return refuse(name, 401, NEEDS_KEY)
        try:
            columns, rows, datatypes = _columns(body)
            if rows > settings.max_entities:
                raise BadInput(f"inputs: {rows} rows, more than {settings.max_entities} (KEEL_SERVE_MAX_ENTITIES)")
            out = server.infer_vectors(name, columns, rows, datatypes)
        except UnknownModel as exc:
            return refuse(name, 404, str(exc))
        except BadInput as exc:
            return refuse(name, 422, str(exc))
        except Exception:  # a fault of ours: say so, count it
            log.exception("failed", extra={"model": name, "status": 500})
            return refuse(name, 500, f"model {name!r} failed to answer; the server log has the traceback")
        return {
            "model_name": name,
            "model_version": str(out["version"]),
            "id": body.id,
            "outputs": [{"name": "prediction", "shape": [rows], "datatype": "FP64", "data": out["predictions"]}],
        }

    @app.get(
        "/metrics",
        response_class=PrometheusText,
        responses={
            200: {
                "description": "Prometheus' text exposition format (version 0.0.4)",
                "content": {PROMETHEUS_TEXT: {"schema": {"type": "string"}}},
            },
            413: json_error(TOO_BIG),
            500: json_error(FAULT),
        },
    )
    async def metrics():
        return PrometheusText(server.metrics.render())

    admin = {401: UNAUTHORISED, 403: error("Admin endpoints are off (KEEL_SERVE_API_KEYS is empty)")}

    @app.get("/admin/models", responses={200: {"model": AdminModels}, **admin}, openapi_extra=guarded)
    async def admin_models(request: Request):
        if not keys:
            return _error(403, ADMIN_OFF)
        if not authorised(request):
            return _error(401, ADMIN_KEY)
        return {
            "models": {n: m.versions for n, m in server.models.snapshot().items()},
            "errors": server.models.errors,
            "swaps": server.models.swaps,
        }

    @app.post("/admin/reload", responses={200: {"model": Reloaded}, **admin}, openapi_extra=guarded)
    async def admin_reload(request: Request):
        if not keys:
            return _error(403, ADMIN_OFF)
        if not authorised(request):
            return _error(401, ADMIN_KEY)
        t = time.perf_counter()
        changes = await asyncio.to_thread(server.models.refresh)
        return {"changes": changes, "seconds": round(time.perf_counter() - t, 3)}

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            schema.setdefault("components", {})["securitySchemes"] = API_KEY_SCHEMES
        return app.openapi_schema

    app.openapi = openapi
    return app


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def answer_predict(
    server: Server, settings: ServingSettings, name: str, body: PredictRequest, authorised: bool
) -> tuple[int, dict]:
    """Status and JSON body of ``POST /v1/models/{name}/predict``."""
    status, out = _predict_or_refuse(server, settings, name, body, authorised)
    if status != 200:
        server.metrics.refused(served_name(server, name), status)
        return status, out
    if log.isEnabledFor(logging.INFO):
        log.info(
            "predicted",
            extra={
                "request_id": out["request_id"],
                "model": name,
                "version": out["version"],
                "alias": out["alias"],
                "entities": len(out["predictions"]),
                "latency_ms": out["latency_ms"],
                "degraded": out["degraded"],
            },
        )
    return 200, out


def _predict_or_refuse(
    server: Server, settings: ServingSettings, name: str, body: PredictRequest, authorised: bool
) -> tuple[int, dict]:
    if settings.protect_predict and not authorised:
        return 401, {"error": NEEDS_KEY}
    ids = [body.entity_id] if body.entity_ids is None else body.entity_ids
    if len(ids) > settings.max_entities:
        return 422, {
            "error": f"entity_ids: {len(ids)} ids, more than {settings.max_entities} (KEEL_SERVE_MAX_ENTITIES)"
        }
    try:
        return 200, server.predict_entities(name, ids, body.features, single=body.entity_ids is None)
    except UnknownModel as exc:
        return 404, {"error": str(exc)}
    except BadInput as exc:
        log.info("rejected", extra={"model": name, "status": 422, "reason": str(exc)})
        return 422, {"error": str(exc)}
    except Exception:  # a fault of ours (a model that cannot score, a broken artifact): say so, count it
        log.exception("failed", extra={"model": name, "status": 500})
        return 500, {"error": f"model {name!r} failed to answer; the server log has the traceback"}


def served_name(server: Server, name: str) -> str:
    """``name`` as a metric label: a served model's name, else ``unknown`` (paths are the client's to choose)."""
    return name if name in server.models.snapshot() else "unknown"


def validation_message(errors) -> str:
    """Pydantic's errors as one line naming each field: ``entity_ids.0: Input should be ...``."""
    problems = []
    for item in errors:
        where = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "body"
        problems.append(f"{where}: {item.get('msg', 'invalid')}")
    return "; ".join(problems[:10])


def _authorised(keys: list[bytes], api_key: str | None, authorization: str | None) -> bool:
    token = (api_key or (authorization or "").removeprefix("Bearer ")).strip().encode()
    # Every key is compared, so the time taken does not say which one nearly matched.
    return bool(token) and sum(hmac.compare_digest(token, k) for k in keys) > 0


def _text(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None


class BoundedRequests:
    """Pure ASGI middleware: a body over ``max_body_bytes`` (declared or streamed) answers 413
    before the app sees it.

    A request's time is bounded by what it may wait on, not by a timer: the online-store
    read times out after KEEL_SERVE_ONLINE_TIMEOUT_MS (and the circuit breaker skips a failing
    store), and a request holds at most KEEL_SERVE_MAX_ENTITIES entities. Prediction runs on
    the event loop (a thread hop would cost more than the predict), so a timer could not
    interrupt it anyway.
    """

    def __init__(self, app, *, max_body_bytes: int, predict=None, in_flight=None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.predict = predict
        self.in_flight = in_flight

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.in_flight is None:
            await self._http(scope, receive, send)
            return
        self.in_flight.inc()
        try:
            await self._http(scope, receive, send)
        finally:
            self.in_flight.dec()

    async def _http(self, scope, receive, send) -> None:
        too_big = f"request body larger than {self.max_body_bytes} bytes (KEEL_SERVE_MAX_BODY_BYTES)"
        headers = dict(scope.get("headers") or ())
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            await _answer(send, 413, too_big)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                await _answer(send, 413, too_big)
                return
        path = scope.get("path", "")
        if self.predict is not None and scope.get("method") == "POST" and path.startswith(PREDICT_PREFIX):
            name = path[len(PREDICT_PREFIX) :].removesuffix("/predict")
            if path.endswith("/predict") and name and "/" not in name:
                status, out = self.predict(name, body, headers)
                await _answer_json(send, status, out)
                return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _answer(send, status: int, message: str) -> None:
    await _answer_json(send, status, {"error": message})


async def _answer_json(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _columns(body: InferRequest) -> tuple[dict[str, list[Any]], int, dict[str, str]]:
    """Named 1-D inputs, one per feature (each of shape [rows]), and their declared datatypes."""
    columns: dict[str, list[Any]] = {}
    datatypes: dict[str, str] = {}
    rows = None
    for tensor in body.inputs:
        shape = tensor.shape
        if len(shape) == 2 and shape[1] != 1:
            raise BadInput(f"inputs.{tensor.name}: shape {shape}: send one input per feature, of shape [rows]")
        if shape[0] < 0 or len(tensor.data) != shape[0]:
            raise BadInput(f"inputs.{tensor.name}: shape {shape} does not match {len(tensor.data)} data values")
        if rows is not None and shape[0] != rows:
            raise BadInput(f"inputs.{tensor.name}: {shape[0]} rows, but other inputs have {rows}")
        rows = shape[0]
        if tensor.name in columns:
            raise BadInput(f"inputs.{tensor.name}: given twice")
        columns[tensor.name] = tensor.data
        datatypes[tensor.name] = tensor.datatype
    if not rows:
        raise BadInput("inputs: no rows to score (shape [0])")
    return columns, rows, datatypes
