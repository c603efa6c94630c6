"""The serving API on FastAPI: Keel's predict-by-entity REST and the Open Inference Protocol.

FastAPI (a dependency MLflow already brings) validates bodies against typed models and
publishes the OpenAPI schema the fuzz tests run against; a malformed body answers 422
naming the field. Bodies are bounded in bytes and entities, and reads of the online store in
time. Admin
endpoints need an API key (``Authorization: Bearer KEY`` or ``X-API-Key``), compared in
constant time; predictions too when ``protect_predict`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import json
import logging
import time
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from keel.config import ServingSettings
from serving.models import RegistryPoller
from serving.server import BadInput, Server, UnknownModel

log = logging.getLogger("keel.serving")
# Predictions take a fast path in BoundedRequests; the FastAPI route documents them (OpenAPI).
PREDICT_PREFIX = "/v1/models/"

EntityKey = StrictStr | StrictInt | dict[str, StrictStr | StrictInt]
Value = StrictBool | StrictInt | StrictFloat | StrictStr | None


class PredictRequest(BaseModel):
    """One entity (``entity_id``) or several (``entity_ids``), and optional request-time feature values."""

    model_config = ConfigDict(extra="forbid")
    entity_id: EntityKey | None = None
    entity_ids: Annotated[list[EntityKey], Field(min_length=1)] | None = None
    features: dict[str, Value] | None = None

    @model_validator(mode="after")
    def one_of_entity_id_or_ids(self) -> PredictRequest:
        if (self.entity_id is None) == (self.entity_ids is None):
            raise ValueError("give exactly one of entity_id and entity_ids")
        return self


class PredictResponse(BaseModel):
    predictions: list[float]
    model: str
    version: int
    alias: str
    request_id: str
    missing_features: list[str] | list[list[str]]
    degraded: bool
    canary_share: float
    latency_ms: float


class InferInput(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr
    shape: Annotated[list[StrictInt], Field(min_length=1, max_length=2)]
    datatype: StrictStr
    data: list[Value]


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: StrictStr | None = None
    inputs: Annotated[list[InferInput], Field(min_length=1)]


def create_app(server: Server, settings: ServingSettings, poller: RegistryPoller | None = None) -> FastAPI:
    """The ASGI app over a ``Server``; ``poller`` (started and stopped with the app) keeps models fresh."""

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

    app = FastAPI(title="Keel serving", version="1", lifespan=lifespan)
    keys = [k.encode() for k in settings.api_keys]

    def authorised(request: Request) -> bool:
        return _authorised(keys, request.headers.get("x-api-key"), request.headers.get("authorization"))

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        return error(422, validation_message(exc.errors()))

    @app.get("/health/live")
    async def live():
        return {"status": "live"}

    @app.get("/health/ready")
    async def ready():
        if server.models.ready:
            return {"status": "ready", "models": {n: m.versions for n, m in server.models.snapshot().items()}}
        return JSONResponse({"status": "loading", "errors": server.models.errors}, status_code=503)

    @app.get("/v2/health/live")
    async def v2_live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def v2_ready():
        return JSONResponse({"ready": server.models.ready}, status_code=200 if server.models.ready else 503)

    # The answer is built by Server and returned as is: re-validating it against the model
    # would cost ~10% of a request. The model documents it in the OpenAPI schema.
    @app.post("/v1/models/{name}/predict", responses={200: {"model": PredictResponse}})
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

    app.add_middleware(BoundedRequests, max_body_bytes=settings.max_body_bytes, predict=fast_predict)

    @app.get("/v2/models/{name}")
    async def metadata(name: str):
        try:
            return server.describe(name)
        except UnknownModel as exc:
            return error(404, str(exc))

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, body: InferRequest, request: Request):
        def refuse(status: int, message: str) -> JSONResponse:
            server.metrics.refused(served_name(server, name), status)
            return error(status, message)

        if settings.protect_predict and not authorised(request):
            return refuse(401, "an API key is required (Authorization: Bearer KEY or X-API-Key)")
        try:
            columns, rows = _columns(body)
            if rows > settings.max_entities:
                raise BadInput(f"inputs: {rows} rows, more than {settings.max_entities} (KEEL_SERVE_MAX_ENTITIES)")
            out = server.infer_vectors(name, columns, rows)
        except UnknownModel as exc:
            return refuse(404, str(exc))
        except BadInput as exc:
            return refuse(422, str(exc))
        return {
            "model_name": name,
            "model_version": str(out["version"]),
            "id": body.id,
            "outputs": [{"name": "prediction", "shape": [rows], "datatype": "FP64", "data": out["predictions"]}],
        }

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/admin/models")
    async def admin_models(request: Request):
        if not keys:
            return error(403, "admin endpoints are off: set KEEL_SERVE_API_KEYS to enable them")
        if not authorised(request):
            return error(401, "a valid API key is required (Authorization: Bearer KEY or X-API-Key)")
        return {
            "models": {n: m.versions for n, m in server.models.snapshot().items()},
            "errors": server.models.errors,
            "swaps": server.models.swaps,
        }

    @app.post("/admin/reload")
    async def admin_reload(request: Request):
        if not keys:
            return error(403, "admin endpoints are off: set KEEL_SERVE_API_KEYS to enable them")
        if not authorised(request):
            return error(401, "a valid API key is required (Authorization: Bearer KEY or X-API-Key)")
        t = time.perf_counter()
        changes = await asyncio.to_thread(server.models.refresh)
        return {"changes": changes, "seconds": round(time.perf_counter() - t, 3)}

    return app


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
        return 401, {"error": "an API key is required (Authorization: Bearer KEY or X-API-Key)"}
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

    def __init__(self, app, *, max_body_bytes: int, predict=None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.predict = predict

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
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


def _columns(body: InferRequest) -> tuple[dict[str, list[Any]], int]:
    """Named 1-D inputs, one per feature (each of shape [rows])."""
    columns: dict[str, list[Any]] = {}
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
    if not rows:
        raise BadInput("inputs: no rows to score (shape [0])")
    return columns, rows
