"""The serving API keeps its contract: it validates what it is given, answers only what its
OpenAPI schema documents, and speaks the Open Inference Protocol's error shape under /v2."""

import json

import pytest
import schemathesis

from tests.factories.serving import client_for, conformance_failures

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning")

PREDICT = "/v1/models/churn/predict"
INFER = "/v2/models/churn/infer"

# Request-time values that do not fit churn's features, as raw JSON (Infinity and NaN are not
# JSON, but Python's encoder and others write them), and what the refusal must name.
REFUSED = [
    ('"n_7d": Infinity', "features.n_7d: Infinity is not a finite number"),
    ('"n_7d": -Infinity', "features.n_7d: -Infinity is not a finite number"),
    ('"last_amount": NaN', "features.last_amount: NaN is not a finite number"),
    ('"last_amount": 1e309', "features.last_amount: Infinity is not a finite number"),
    ('"avg_7d": "NaN"', 'features.avg_7d: "NaN" is a string'),
    ('"avg_7d": "Infinity"', 'features.avg_7d: "Infinity" is a string'),
    ('"n_7d": true', "features.n_7d: true is a boolean"),
    ('"avg_7d": 1' + "0" * 400, "features.avg_7d: 100000…(401 digits) is too large for a float64"),
    ('"n_7d": 2.5', "features.n_7d: 2.5 is not a whole number"),
    ('"n_7d": -1', "features.n_7d: -1 is below 0, the minimum of a count"),
    ('"last_amount": 10001', "features.last_amount: 10001 is above 10000, the maximum of column 'amount'"),
    ('"amount_7d": -0.01', "features.amount_7d: -0.01 is below 0"),
    ('"big_spender": 1', "features.big_spender: 1 is not a boolean"),
]
TAKEN = [
    {"n_7d": 3},
    {"n_7d": 3.0},
    {"last_amount": 10_000, "amount_7d": 0},
    {"avg_7d": -5.5, "big_spender": False},
    {"n_7d": None},
]


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast path", "FastAPI route"])
def test_request_time_features_must_fit_their_declaration(world, settings, online_project, fast_path):
    client, server = client_for(world, settings, online_project, fast_path=fast_path)
    for features, message in REFUSED:
        raw = '{"entity_id": "u1", "features": {' + features + "}}"
        answer = client.post(PREDICT, content=raw, headers={"content-type": "application/json"})
        assert answer.status_code == 422 and message in answer.json()["error"], (features, answer.text)
    for features in TAKEN:
        answer = client.post(PREDICT, json={"entity_id": "u1", "features": features})
        assert answer.status_code == 200, (features, answer.text)
    metrics = client.get("/metrics").text
    assert f'keel_serving_requests_total{{alias="",model="churn",status="rejected",version=""}} {len(REFUSED)}.0' in (
        metrics
    )
    assert all(r["features"]["n_7d"] != 2.5 for r in server.inference_log.records)
    # A body that is not UTF-8 is as unreadable as one that is not JSON, on either path.
    answer = client.post(PREDICT, content=b"\xedSL\xa9", headers={"content-type": "application/json"})
    assert answer.status_code == 422 and list(answer.json()) == ["error"], answer.text


def infer_body(**overrides) -> dict:
    """Two rows for churn, one tensor per feature; ``overrides`` replaces a tensor's data or datatype."""
    inputs = []
    for name, datatype, data in [
        ("n_7d", "INT64", [3, None]),
        ("amount_7d", "FP64", [20.0, None]),
        ("last_amount", "FP64", [5.0, 10_000]),
        ("avg_7d", "FP64", [6.5, None]),
        ("big_spender", "BOOL", [False, None]),
    ]:
        tensor = {"name": name, "shape": [2], "datatype": datatype, "data": data}
        tensor.update(overrides.get(name, {}))
        inputs.append(tensor)
    return {"id": "r1", "inputs": inputs}


def test_open_inference_inputs_must_fit_their_declaration(world, settings, online_project):
    client, _ = client_for(world, settings, online_project)
    assert client.post(INFER, json=infer_body()).status_code == 200
    assert client.post(INFER, json=infer_body(n_7d={"datatype": "FP64", "data": [3.0, 4]})).status_code == 200
    cases = [
        ({"n_7d": {"data": [1, float("inf")]}}, "inputs.n_7d[1]: Infinity is not a finite number"),
        ({"last_amount": {"data": [float("nan"), 1]}}, "inputs.last_amount[0]: NaN is not a finite number"),
        ({"avg_7d": {"data": [1.0, "NaN"]}}, 'inputs.avg_7d[1]: "NaN" is a string'),
        ({"amount_7d": {"data": [True, 1.0]}}, "inputs.amount_7d[0]: true is a boolean"),
        ({"n_7d": {"data": [1, -2]}}, "inputs.n_7d[1]: -2 is below 0"),
        ({"last_amount": {"data": [1, 20_000]}}, "inputs.last_amount[1]: 20000 is above 10000"),
        ({"big_spender": {"data": [1, 0]}}, "inputs.big_spender[0]: 1 is not a boolean"),
        ({"n_7d": {"datatype": "BYTES"}}, "inputs.n_7d: datatype BYTES does not fit n_7d"),
        ({"big_spender": {"datatype": "FP64"}}, "inputs.big_spender: datatype FP64 does not fit big_spender"),
    ]
    for overrides, message in cases:
        answer = client.post(
            INFER, content=json.dumps(infer_body(**overrides)), headers={"content-type": "application/json"}
        )
        assert answer.status_code == 422 and message in answer.json()["error"], (overrides, answer.text)
    extra = infer_body()
    extra["inputs"].append({"name": "colour", "shape": [2], "datatype": "BYTES", "data": ["red", "blue"]})
    answer = client.post(INFER, json=extra)
    assert answer.status_code == 422 and "inputs: ['colour'] are not inputs of model 'churn'" in answer.json()["error"]
    raw = json.dumps(infer_body(last_amount={"data": [1.0, 2.0]})).replace("2.0]", "1e309]")
    answer = client.post(INFER, content=raw, headers={"content-type": "application/json"})
    assert answer.status_code == 422 and "inputs.last_amount[1]: Infinity" in answer.json()["error"]


def assert_oip_error(answer, status: int) -> None:
    """The Open Inference Protocol's error object: ``{"error": "<message>"}`` and nothing else."""
    body = answer.json()
    assert answer.status_code == status, answer.text
    assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"], body


def test_v2_errors_follow_the_open_inference_protocol(world, settings, online_project):
    client, _ = client_for(world, settings, online_project, max_body_bytes=4000)
    assert_oip_error(client.get("/v2/models/nope"), 404)
    assert_oip_error(client.post("/v2/models/nope/infer", json=infer_body()), 404)
    assert_oip_error(client.get("/v2/models/churn/versions/1/infer"), 404)
    assert_oip_error(client.get("/v2/nothing"), 404)
    assert_oip_error(client.get(INFER), 405)
    assert_oip_error(client.put("/v2/health/ready"), 405)
    assert_oip_error(client.post(INFER, content=b"{not json", headers={"content-type": "application/json"}), 422)
    assert_oip_error(client.post(INFER, content=b"\xedSL\xa9", headers={"content-type": "application/json"}), 422)
    assert_oip_error(client.post(INFER, json={"inputs": []}), 422)
    assert_oip_error(client.post(INFER, json={"inputs": "n_7d"}), 422)
    assert_oip_error(client.post(INFER, json=infer_body(n_7d={"data": [1, -2]})), 422)
    assert_oip_error(client.post(INFER, json=infer_body(n_7d={"data": list(range(1000))})), 413)  # the ASGI layer
    assert client.get(INFER).headers["allow"] == "POST"
    guarded, _ = client_for(world, settings, online_project, api_keys=("k",), protect_predict=True)
    assert_oip_error(guarded.post(INFER, json=infer_body()), 401)
    assert guarded.post(INFER, json=infer_body(), headers={"x-api-key": "k"}).status_code == 200
    unready, _ = client_for(world, settings, online_project, names=("churn", "ghost"))
    answer = unready.get("/v2/health/ready")
    assert answer.status_code == 503 and answer.json() == {"ready": False}


def test_every_status_the_server_returns_is_in_its_openapi_schema(world, settings, online_project, monkeypatch):
    """Each status a route can answer, produced for real and checked by schemathesis against the schema."""
    small = {"max_body_bytes": 3000, "max_entities": 2}
    guarded, guarded_server = client_for(
        world, settings, online_project, api_keys=("k",), protect_predict=True, **small
    )
    open_client, _ = client_for(world, settings, online_project, **small)
    unready, _ = client_for(world, settings, online_project, names=("churn", "ghost"))
    key = {"x-api-key": "k"}
    body = {"entity_id": "u1"}
    too_big = {"entity_id": "x" * 4000}
    cases = [
        (guarded, "POST", "/v1/models/{name}/predict", {"name": "churn"}, body, key, 200),
        (guarded, "POST", "/v1/models/{name}/predict", {"name": "churn"}, body, {}, 401),
        (guarded, "POST", "/v1/models/{name}/predict", {"name": "nope"}, body, key, 404),
        (guarded, "POST", "/v1/models/{name}/predict", {"name": "churn"}, too_big, key, 413),
        (guarded, "POST", "/v1/models/{name}/predict", {"name": "churn"}, {"entity_ids": ["a", "b", "c"]}, key, 422),
        (guarded, "POST", "/v2/models/{name}/infer", {"name": "churn"}, infer_body(), key, 200),
        (guarded, "POST", "/v2/models/{name}/infer", {"name": "churn"}, infer_body(), {}, 401),
        (guarded, "POST", "/v2/models/{name}/infer", {"name": "nope"}, infer_body(), key, 404),
        (guarded, "POST", "/v2/models/{name}/infer", {"name": "churn"}, {"inputs": [too_big]}, key, 413),
        (guarded, "POST", "/v2/models/{name}/infer", {"name": "churn"}, {"inputs": []}, key, 422),
        (guarded, "GET", "/v2/models/{name}", {"name": "churn"}, None, {}, 200),
        (guarded, "GET", "/v2/models/{name}", {"name": "nope"}, None, {}, 404),
        (guarded, "GET", "/health/live", None, None, {}, 200),
        (guarded, "GET", "/health/ready", None, None, {}, 200),
        (unready, "GET", "/health/ready", None, None, {}, 503),
        (guarded, "GET", "/v2/health/live", None, None, {}, 200),
        (guarded, "GET", "/v2/health/ready", None, None, {}, 200),
        (unready, "GET", "/v2/health/ready", None, None, {}, 503),
        (guarded, "GET", "/metrics", None, None, {}, 200),
        (guarded, "GET", "/admin/models", None, None, key, 200),
        (guarded, "GET", "/admin/models", None, None, {}, 401),
        (open_client, "GET", "/admin/models", None, None, {}, 403),
        (guarded, "POST", "/admin/reload", None, None, key, 200),
        (guarded, "POST", "/admin/reload", None, None, {"authorization": "Bearer nope"}, 401),
        (open_client, "POST", "/admin/reload", None, None, {}, 403),
    ]

    def broken(*args, **kwargs):
        raise RuntimeError("booster is corrupt")

    failures, statuses = [], {}
    for client, method, path, params, payload, headers, status in cases:
        schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
        operation = schema[path][method]
        given = {"body": payload} if payload is not None else {}
        case = operation.Case(path_parameters=params, headers=headers or None, **given)
        response = case.call()
        assert response.status_code == status, (method, path, params, headers, response.text)
        statuses.setdefault(f"{method} {path}", set()).add(status)
        failures += conformance_failures(case, response, server_errors=True)

    # A fault of ours answers 500, documented like the rest.
    monkeypatch.setattr(guarded_server, "predict_entities", broken)
    monkeypatch.setattr(guarded_server, "infer_vectors", broken)
    schema = schemathesis.openapi.from_asgi("/openapi.json", guarded.app)
    for path, payload in [("/v1/models/{name}/predict", body), ("/v2/models/{name}/infer", infer_body())]:
        case = schema[path]["POST"].Case(path_parameters={"name": "churn"}, body=payload, headers=key)
        response = case.call()
        assert response.status_code == 500 and "corrupt" not in response.text, response.text
        failures += conformance_failures(case, response, server_errors=True)
    assert failures == []

    documented = json.loads(guarded.get("/openapi.json").text)["paths"]
    metrics_types = list(documented["/metrics"]["get"]["responses"]["200"]["content"])
    assert len(metrics_types) == 1 and metrics_types[0].startswith("text/plain"), metrics_types
    for path, operations in documented.items():
        for method, operation in operations.items():
            for status in statuses.get(f"{method.upper()} {path}", ()):
                assert str(status) in operation["responses"], (method, path, status)
            # Every refusal and failure is the JSON error object, whatever the route answers otherwise.
            for status, response in operation["responses"].items():
                if status >= "400":
                    assert list(response["content"]) == ["application/json"], (method, path, status)
                    assert response["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/ErrorResponse"
                    } or path.endswith("ready"), (method, path, status)
            assert {"413", "500"} <= operation["responses"].keys(), (method, path)
    assert guarded.get("/metrics").headers["content-type"].startswith("text/plain; version=0.0.4")
