"""The serving API over a real registry (file-backed MLflow) and a real online store."""

import dataclasses
import datetime as dt
import json
import time

import numpy as np
import pyarrow as pa
import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from schemathesis.generation.modes import GenerationMode

from keel.config import ServingSettings
from keel.devservers import RedisServer
from keel.features.materialize import day_end
from keel.models import promotion, registry
from keel.models.training import predict
from keel.online.redis_backend import RedisOnlineStore
from keel.online.sync import sync_group
from serving.app import create_app
from serving.models import ModelSet
from serving.server import Server
from tests.factories.serving import LAST, client_for, conformance_failures
from tests.factories.timing import wait_for

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning")


def test_predict_hydrates_online_values_and_matches_the_offline_prediction(world, settings, online_project):
    client, server = client_for(world, settings, online_project)
    assert client.get("/health/ready").json()["models"] == {"churn": {"champion": 1, "challenger": 2}}

    users = ["u1", "u2", "u3"]
    answer = client.post("/v1/models/churn/predict", json={"entity_ids": users})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["model"], body["version"], body["alias"], body["degraded"]) == ("churn", 1, "champion", False)

    # The same values offline, point-in-time at the synced day's end, give the same predictions.
    spine = pa.table({"user_id": users, "ts": [day_end(LAST)] * 3})
    offline = world["store"].get_training_set(spine, world["model"].feature_refs(online_project), timestamp="ts")
    loaded, features, _ = registry.load_model(settings, "churn", "champion")
    baseline = registry.load_baseline(settings, world["v1"].run_id)["features"]
    table = offline.table
    for f in features:  # the server fills a missing value with the baseline default
        col = table.column(f)
        if col.null_count:
            table = table.set_column(
                table.column_names.index(f),
                f,
                pa.array([baseline[f]["default"] if v is None else v for v in col.to_pylist()], col.type),
            )
    expected = predict(loaded, world["model"], table, features)
    np.testing.assert_allclose(body["predictions"], expected, rtol=1e-6)

    one = client.post("/v1/models/churn/predict", json={"entity_id": "u1"}).json()
    assert one["predictions"] == pytest.approx(body["predictions"][:1])
    assert isinstance(one["missing_features"], list)
    logged = server.inference_log.records
    assert [r["entity_id"] for r in logged] == [*users, "u1"]
    assert logged[0]["version"] == 1 and logged[0]["features"].keys() == set(features)


def test_unknown_users_get_defaults_and_request_values_override(world, settings, online_project):
    client, _ = client_for(world, settings, online_project)
    body = client.post("/v1/models/churn/predict", json={"entity_id": "nobody"}).json()
    assert sorted(body["missing_features"]) == sorted(world["v1"].features)
    given = client.post(
        "/v1/models/churn/predict", json={"entity_id": "nobody", "features": {"n_7d": 9, "big_spender": True}}
    ).json()
    assert "n_7d" not in given["missing_features"] and "big_spender" not in given["missing_features"]


def test_bad_requests_answer_4xx_naming_the_field(world, settings, online_project):
    client, _ = client_for(world, settings, online_project, max_entities=2, max_body_bytes=2000)
    cases = [
        ({}, 422, "give exactly one of entity_id and entity_ids"),
        ({"entity_id": "u1", "entity_ids": ["u2"]}, 422, "exactly one"),
        ({"entity_id": 1.5}, 422, "entity_id"),
        ({"entity_ids": []}, 422, "entity_ids"),
        ({"entity_ids": ["a", "b", "c"]}, 422, "more than 2"),
        ({"entity_id": "u1", "features": {"nope": 1}}, 422, "['nope'] are not inputs of model 'churn'"),
        ({"entity_id": "u1", "features": {"n_7d": "many"}}, 422, 'features.n_7d: "many" is a string'),
        ({"entity_id": "u1", "colour": "red"}, 422, "colour"),
        ({"entity_id": {"customer": "u1"}}, 422, "lacks key(s) user_id"),
    ]
    for body, status, message in cases:
        answer = client.post("/v1/models/churn/predict", json=body)
        assert answer.status_code == status and message in answer.json()["error"], (body, answer.text)
    assert client.post("/v1/models/nope/predict", json={"entity_id": "u1"}).status_code == 404
    big = client.post("/v1/models/churn/predict", json={"entity_id": "x" * 3000})
    assert big.status_code == 413
    streamed = client.post(
        "/v1/models/churn/predict",
        content=(part for part in [b'{"entity_id": "', b"x" * 3000, b'"}']),
        headers={"content-type": "application/json"},
    )
    assert streamed.status_code == 413 and "larger than 2000 bytes" in streamed.json()["error"]
    assert (
        client.post(
            "/v1/models/churn/predict", content=b"{not json", headers={"content-type": "application/json"}
        ).status_code
        == 422
    )
    # Refusals are counted, as the client's fault, under the served name; other names are "unknown".
    metrics = client.get("/metrics").text
    assert 'keel_serving_requests_total{alias="",model="churn",status="rejected",version=""} 10.0' in metrics
    assert 'keel_serving_requests_total{alias="",model="unknown",status="rejected",version=""} 1.0' in metrics
    assert 'status="error"' not in metrics


def test_a_model_that_fails_answers_500_and_is_counted_as_an_error(world, settings, online_project, monkeypatch):
    client, server = client_for(world, settings, online_project)

    def broken(*args, **kwargs):
        raise RuntimeError("booster is corrupt")

    monkeypatch.setattr(server, "predict_entities", broken)
    answer = client.post("/v1/models/churn/predict", json={"entity_id": "u1"})
    assert answer.status_code == 500 and "model 'churn' failed to answer" in answer.json()["error"]
    assert "corrupt" not in answer.text
    metrics = client.get("/metrics").text
    assert 'keel_serving_requests_total{alias="",model="churn",status="error",version=""} 1.0' in metrics


def test_canary_is_sticky_per_entity_and_shadow_logs_without_answering(world, settings, online_project):
    client, server = client_for(world, settings, online_project, canary=0.5, shadow=True)
    users = [f"u{i}" for i in range(40)]
    first = {u: client.post("/v1/models/churn/predict", json={"entity_id": u}).json()["alias"] for u in users}
    again = {u: client.post("/v1/models/churn/predict", json={"entity_id": u}).json()["alias"] for u in users}
    assert first == again
    assert 5 < sum(a == "challenger" for a in first.values()) < 35
    shadows = [r for r in server.inference_log.records if r["shadow"]]
    champions = [r for r in server.inference_log.records if r["alias"] == "champion" and not r["shadow"]]
    assert len(shadows) == len(champions) > 0 and {r["version"] for r in shadows} == {2}
    assert 'keel_serving_shadow_predictions_total{model="churn",version="2"}' in client.get("/metrics").text


def test_redis_stopped_mid_load_gives_degraded_answers_and_the_breaker_opens(world, settings, lake, online_project):
    with RedisServer() as redis_server:
        redis = RedisOnlineStore(redis_server.url, socket_timeout=0.05, socket_connect_timeout=0.05)
        for group in online_project.feature_groups:
            sync_group(lake, redis, group, full=True)
        client, server = client_for(world, settings, online_project, breaker_failures=2, breaker_reset_s=60)
        server.online = redis
        healthy = client.post("/v1/models/churn/predict", json={"entity_id": "u1"}).json()
        assert healthy["degraded"] is False and healthy["missing_features"] == []
    # The server process is gone: every answer is the defaults', marked degraded, never an error.
    for _ in range(4):
        answer = client.post("/v1/models/churn/predict", json={"entity_id": "u1"})
        assert answer.status_code == 200 and answer.json()["degraded"] is True
    assert server.breaker.state == "open" and server.breaker.opened == 1
    metrics = client.get("/metrics").text
    assert 'keel_serving_degraded_responses_total{model="churn"} 4.0' in metrics
    assert "keel_serving_breaker_open 1.0" in metrics


def test_open_inference_protocol(world, settings, online_project):
    client, _ = client_for(world, settings, online_project)
    meta = client.get("/v2/models/churn").json()
    names = [i["name"] for i in meta["inputs"]]
    assert names == world["v1"].features
    inputs = [{"name": n, "shape": [2], "datatype": "FP64", "data": [1.0, None]} for n in names if n != "big_spender"]
    inputs.append({"name": "big_spender", "shape": [2], "datatype": "BOOL", "data": [True, False]})
    answer = client.post("/v2/models/churn/infer", json={"id": "r1", "inputs": inputs})
    assert answer.status_code == 200, answer.text
    out = answer.json()
    assert out["model_version"] == "1" and out["id"] == "r1" and len(out["outputs"][0]["data"]) == 2
    assert client.post("/v2/models/churn/infer", json={"inputs": inputs[:-1]}).status_code == 422
    assert client.get("/v2/health/ready").json() == {"ready": True}


def test_admin_endpoints_need_a_key(world, settings, online_project):
    client, _ = client_for(world, settings, online_project, api_keys=("s3cret",))
    assert client.get("/admin/models").status_code == 401
    assert client.get("/admin/models", headers={"x-api-key": "wrong"}).status_code == 401
    ok = client.get("/admin/models", headers={"authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and ok.json()["models"] == {"churn": {"champion": 1, "challenger": 2}}
    open_client, _ = client_for(world, settings, online_project)
    assert open_client.get("/admin/models").status_code == 403
    guarded, _ = client_for(world, settings, online_project, api_keys=("k",), protect_predict=True)
    assert guarded.post("/v1/models/churn/predict", json={"entity_id": "u1"}).status_code == 401
    assert (
        guarded.post("/v1/models/churn/predict", json={"entity_id": "u1"}, headers={"x-api-key": "k"}).status_code
        == 200
    )


def test_a_promotion_is_swapped_in_by_refresh(world, settings, online_project):
    client, server = client_for(world, settings, online_project)
    assert client.post("/v1/models/churn/predict", json={"entity_id": "u1"}).json()["version"] == 1
    promotion.promote(settings, "churn", 2)
    assert server.models.refresh() == ["churn: {'champion': 2}"]
    assert client.post("/v1/models/churn/predict", json={"entity_id": "u1"}).json()["version"] == 2
    assert server.models.swaps == 1


def test_fuzzed_requests_get_only_answers_the_schema_documents(world, settings, online_project):
    """Schemathesis draws valid and invalid requests for every operation of the app's own OpenAPI
    schema; every answer must be documented there (status, content type, body), and none a 5xx."""
    client, _ = client_for(world, settings, online_project, api_keys=("k",), protect_predict=False, max_entities=20)
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/models/{name}/predict",
        "POST /v2/models/{name}/infer",
        "GET /v2/models/{name}",
        "GET /metrics",
        "GET /admin/models",
    }
    strategies = [
        op.as_strategy(mode, path_parameters=path)
        for op in operations
        for path in ({"name": "churn"}, None)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    ]
    seen: dict[int, int] = {}
    failures: set[str] = set()

    @given(case=st.one_of(strategies))
    @hsettings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def fuzz(case):
        response = case.call()
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        failures.update(conformance_failures(case, response))

    fuzz()
    assert sorted(failures) == [], "\n".join(sorted(failures))
    # Answers and refusals were both exercised.
    assert seen.get(200, 0) > 0 and sum(n for code, n in seen.items() if 400 <= code < 500) > 10, seen


def test_a_promotion_under_steady_load_fails_no_request_and_mixes_no_versions(world, settings, online_project):
    """A real uvicorn server, its registry poller at 0.2 s, four clients in a loop; v2 is promoted mid-load."""
    import threading

    import httpx2
    import uvicorn

    from keel.devservers import free_port
    from serving.models import RegistryPoller

    serving = dataclasses.replace(ServingSettings(), poll_s=0.2)
    models = ModelSet(settings, online_project, ["churn"])
    models.refresh()
    server = Server(models=models, online=world["online"], project=online_project)
    app = create_app(server, serving, RegistryPoller(models, serving.poll_s))
    port = free_port()
    http = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    runner = threading.Thread(target=http.run, daemon=True)
    runner.start()
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: http.started, what="the server to start")

    # What each version answers for each user, to check every answer against its stated version.
    users = [f"u{i}" for i in range(7)]
    expected = {}
    for version in (1, 2):
        loaded, features, _ = registry.load_model(settings, "churn", version)
        served = {v.version: v for v in (models.get("churn").champion, models.get("churn").challenger)}[version]
        for u in users:
            row = server.hydrate(served, [u], {}).rows[0]
            expected[(version, u)] = float(served.score([served.with_defaults(row)[0]])[0])

    results, stop = [], threading.Event()

    def client(seed: int) -> None:
        with httpx2.Client(base_url=url, timeout=5) as http_client:
            i = seed
            while not stop.is_set():
                user = users[i % len(users)]
                i += 1
                try:
                    answer = http_client.post("/v1/models/churn/predict", json={"entity_id": user})
                    results.append((time.monotonic(), answer.status_code, user, answer.json()))
                except Exception as exc:  # noqa: BLE001 - a failed request is what the test counts
                    results.append((time.monotonic(), None, user, repr(exc)))

    clients = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for c in clients:
        c.start()
    try:
        # Counted answers, not fixed sleeps, mark the load before and after the swap.
        wait_for(lambda: len(results) >= 50, what="answers before the promotion")
        promotion.promote(settings, "churn", 2)
        promoted_at = time.monotonic()
        wait_for(
            lambda: any(r[1] == 200 and r[3]["version"] == 2 and r[0] > promoted_at for r in results),
            timeout=15,
            what="the promotion to be swapped in",
        )
        swapped = len(results)
        wait_for(lambda: len(results) >= swapped + 50, what="answers after the swap")
    finally:
        stop.set()
        for c in clients:
            c.join()
        http.should_exit = True
        runner.join(timeout=10)

    failed = [r for r in results if r[1] != 200]
    assert not failed, failed[:3]
    assert len(results) > 100
    for _, _, user, body in results:
        assert body["predictions"][0] == pytest.approx(expected[(body["version"], user)], abs=1e-9), body
    versions = {body["version"] for _, _, _, body in results}
    assert versions == {1, 2}
    assert models.swaps == 1


def test_predictions_reach_the_inference_log_table(world, settings, lake, online_project, clean_redis_url):
    """Train, promote, serve with hydration from Redis, shut down gracefully, load the day: every answer is a row."""
    from keel.inference_log.loader import audit_inference_log, stage_inference_log
    from keel.inference_log.records import TABLE
    from keel.inference_log.writer import InferenceLogWriter
    from keel.lakehouse import wap

    redis = RedisOnlineStore(clean_redis_url)
    for group in online_project.feature_groups:
        sync_group(lake, redis, group, full=True)
    client, server = client_for(world, settings, online_project, canary=0.0, shadow=True)
    server.online = redis
    server.inference_log = InferenceLogWriter.from_settings(settings, flush_interval_s=60)
    with client:  # the lifespan's shutdown closes the writer, which must drain its buffer
        answers = [client.post("/v1/models/churn/predict", json={"entity_id": u}).json() for u in ("u1", "u2", "u3")]
    today = dt.datetime.now(dt.UTC).date()
    loaded = stage_inference_log(lake, settings, [today], run_id="load-1")
    report = audit_inference_log(lake, loaded.staged)
    assert report.success, report.summary()
    wap.publish(lake, loaded.staged)
    rows = lake.read(TABLE).to_pylist()
    served = {(r["request_id"], r["shadow"]): r for r in rows}
    assert len(rows) == 6  # three answers and three shadow scores of the challenger
    for user, answer in zip(("u1", "u2", "u3"), answers, strict=True):
        assert answer["missing_features"] == [] and answer["degraded"] is False
        row = served[(answer["request_id"], False)]
        assert (row["entity_id"], row["version"], row["alias"]) == (user, 1, "champion")
        assert row["prediction"] == pytest.approx(answer["predictions"][0])
        assert list(json.loads(row["features"])) == world["v1"].features
        assert served[(answer["request_id"], True)]["version"] == 2
