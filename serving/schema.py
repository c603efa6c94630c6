"""The serving API's bodies as typed models, and the answers each route documents in its OpenAPI schema.

Requests are validated against these models (FastAPI's route and the ASGI fast path use the
same ``PredictRequest``). Answers are built by ``serving.server.Server`` and returned as
they are; the models here document them, so the schema says every status a route can
answer and the shape of its body, and schemathesis checks the server against it.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

EntityKey = StrictStr | StrictInt | dict[str, StrictStr | StrictInt]
Value = StrictBool | StrictInt | StrictFloat | StrictStr | None

# The text format Prometheus scrapes (prometheus_client's generate_latest writes it).
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class PredictRequest(BaseModel):
    """One entity (``entity_id``) or several (``entity_ids``), and optional request-time feature values."""

    model_config = ConfigDict(extra="forbid")
    entity_id: EntityKey | None = None
    entity_ids: Annotated[list[EntityKey], Field(min_length=1)] | None = None
    features: (
        Annotated[
            dict[str, Value],
            Field(
                description="Values given at request time, by feature name; they override the online store's. "
                "Each must fit the feature's declaration: a finite number of its type (whole for an integer), "
                "within the bounds its source declares; true or false for a bool; a string, one of the declared "
                "values where the source declares them, for a category; an ISO 8601 string with a UTC offset "
                "for a timestamp. null means missing (the training median or mode fills it)."
            ),
        ]
        | None
    ) = None

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
    datatype: StrictStr = Field(description="An Open Inference Protocol datatype that fits the feature")
    data: list[Value]


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: StrictStr | None = None
    inputs: Annotated[list[InferInput], Field(min_length=1)]


class Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str


class InferOutput(Tensor):
    data: list[float]


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None
    outputs: list[InferOutput]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    aliases: dict[str, int]
    platform: str
    inputs: list[Tensor]
    outputs: list[Tensor]


class ErrorResponse(BaseModel):
    """Every refusal and failure, on every route (the Open Inference Protocol's error object)."""

    error: str


class Live(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    models: dict[str, dict[str, int]]


class Loading(BaseModel):
    status: str
    errors: dict[str, str]


class V2Live(BaseModel):
    live: bool


class V2Ready(BaseModel):
    ready: bool


class AdminModels(BaseModel):
    models: dict[str, dict[str, int]]
    errors: dict[str, str]
    swaps: int


class Reloaded(BaseModel):
    changes: list[str]
    seconds: float


def error(description: str) -> dict[str, Any]:
    """An OpenAPI response entry of the error object."""
    return {"model": ErrorResponse, "description": description}


def json_error(description: str) -> dict[str, Any]:
    """The same, on a route whose own answers are not JSON (FastAPI would document its media type)."""
    schema = {"$ref": "#/components/schemas/ErrorResponse"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


# Answers any route may give: the ASGI layer bounds every body, and a fault of ours is a 500.
TOO_BIG = "The request body is larger than KEEL_SERVE_MAX_BODY_BYTES"
FAULT = "A fault of the server's (the server log has the traceback)"
EVERY_ROUTE = {413: error(TOO_BIG), 500: error(FAULT)}
UNAUTHORISED = error("No valid API key (Authorization: Bearer KEY or X-API-Key)")
UNREADABLE = error("The request does not fit the schema, or a value does not fit its feature; the message names it")
API_KEY_SCHEMES = {
    "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    "Bearer": {"type": "http", "scheme": "bearer"},
}
API_KEY = [{"ApiKey": []}, {"Bearer": []}]
