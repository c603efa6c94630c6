"""Serving latency and throughput: hydrate + predict over HTTP against a bare ASGI app on a ready vector.

Setup: a Redis on a loopback port (``keel.devservers``), two online groups of ten numeric
features each (``bench/online_features.py``) holding ``--entities`` users (``OnlineStore.write``), and an XGBoost classifier
(100 trees of depth 6, ``nthread=1``) over those 20 features, trained on random rows with a
planted signal, registered in a file-backed MLflow under a temporary KEEL_HOME and promoted
to champion. Two servers, each one uvicorn worker in its own spawned process
(``OMP_NUM_THREADS=1``, no access log):

- ours: ``serving.app.create_app`` over ``Server(ModelSet, RedisOnlineStore, project)``;
  ``POST /v1/models/NAME/predict {"entity_id": ...}`` validates the body, hydrates the 20
  features in one Redis round trip, fills defaults, scores natively, records metrics;
- floor: a raw ASGI callable that parses the same JSON body and scores the same native
  booster (``nthread=1``) on a ready row through the same one-row C call ours uses
  (``serving.booster.OneRow``, ~130 us where ``inplace_predict`` takes ~300-400 us); no
  framework, no Redis.

Both answer entity 0 with the same prediction before any timing (checked: ours hydrated
all 20 values, not defaults). A client on asyncio then runs, against ours and the floor
alternately (``--rounds`` interleaved slices of each mode, never both at once), with a
random entity per request:

- closed loop, concurrency 1 and 8: each connection sends its next request when the last
  answer arrives; p50 / p95 / p99 latency and answers per second;
- open loop at ``--rate`` requests/s: requests leave on a fixed schedule whatever the
  answers do, and latency counts from the scheduled send time, so a stall is charged to
  every request it delays (no coordinated omission); p50 / p95 / p99 and the achieved rate.

The client is a minimal keep-alive HTTP/1.1 client on uvloop. Against a server that answers
at once, httpx2 (``--client httpx2``) was measured here at 0.8-1.4 ms of client CPU per
request and this client at 0.1-0.2 ms: on shared cores httpx2 would dominate the figures.

Each slice starts with ``--warmup`` seconds of the same load, not recorded. The client, both
servers and Redis share this machine's cores, so the CPU each of them spends per request
(Linux ``/proc/PID/task/*/schedstat``) is printed too: it bounds a worker's throughput and
is steadier than latency when other processes compete for the cores.

    .venv/bin/python bench/serving.py [--entities 10000] [--seconds 10] [--rate 500] [--quick]
"""

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import io
import json
import multiprocessing as mp
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from online_features import entity_ids, feature_columns, fill, online_project, user

from keel.dsl import Column, EventSource

MODEL = "bench_ctr"
PATH = f"/v1/models/{MODEL}/predict"
TRAIN_ROWS = 20_000
REQUEST_TIMEOUT_S = 5.0
MAX_OPEN_CONNECTIONS = 256
KEEP_ALIVE_S = 4.0  # below uvicorn's timeout_keep_alive (5 s)
TARGET_P99_MS = 10.0  # issue 6: p99 under 10 ms at 500 requests/s

clicks = EventSource(name="clicks", entity=user, columns=(Column("clicked", "bool"),))
PROJECT = online_project()
GROUPS = PROJECT.feature_groups
FEATURES = [f.name for g in GROUPS for f in g.features]
REFS = [f"{g.name}.{f.name}" for g in GROUPS for f in g.features]


def register_model(settings) -> None:
    """Train the classifier on rows with a planted signal, register it and make it champion."""
    import xgboost

    from keel.models.promotion import promote
    from keel.models.registration import log_and_register
    from keel.models.spec import ModelSpec
    from keel.models.training import TrainResult, model_frame, score
    from keel.store import TrainingSet

    rng = np.random.default_rng(3)
    columns = feature_columns(rng, TRAIN_ROWS, GROUPS)
    z = {k: (v - v.mean()) / v.std() for k, v in columns.items()}
    logit = 1.2 * z["a_n_24h"] - 0.8 * z["p_amount_avg_7d"] + 0.6 * z["p_items_sum_7d"] + 0.4 * z["a_amount_max_7d"]
    clicked = rng.random(TRAIN_ROWS) < 1 / (1 + np.exp(-logit))
    split = TRAIN_ROWS * 4 // 5
    # Label times a second apart: the reference sample splits train from hold-out at split_time.
    split_time = dt.datetime.now(dt.UTC).replace(microsecond=0)
    times = [split_time + dt.timedelta(seconds=i - split + 1) for i in range(TRAIN_ROWS)]
    table = pa.table({**columns, "clicked": clicked, "event_ts": pa.array(times, pa.timestamp("us", "UTC"))})
    spec = ModelSpec(name=MODEL, entity=user, features=tuple(REFS), labels=clicks, label="clicked")
    train, holdout = table.slice(0, split), table.slice(split)
    model = xgboost.XGBClassifier(
        n_estimators=100, max_depth=6, learning_rate=0.1, tree_method="hist", nthread=1, random_state=0
    )
    model.fit(model_frame(train, FEATURES), clicked[:split].astype(int))
    predictions = np.asarray(model.predict_proba(model_frame(holdout, FEATURES))[:, 1], dtype=np.float64)
    result = TrainResult(
        model=model,
        features=list(FEATURES),
        training_set=TrainingSet(table, list(FEATURES), snapshots={}),
        train_rows=split,
        holdout_rows=TRAIN_ROWS - split,
        metrics=score(spec, clicked[split:].astype(int), predictions),
        holdout=holdout.append_column("prediction", pa.array(predictions)),
        predictions=predictions,
        split_time=split_time,
        params=model.get_params(),
        algorithm="xgboost",
        refs=list(REFS),
    )
    with contextlib.redirect_stderr(io.StringIO()):  # MLflow prints each registration
        info = log_and_register(settings, spec, result)
    promote(settings, MODEL, info.version)
    print(f"registered {MODEL} v{info.version} (hold-out roc_auc {result.metrics['roc_auc']:.3f}) as champion")


# ---------------------------------------------------------------------------------------
# The two servers, each in a spawned process that rebuilds what it needs from KEEL_HOME


def unshadow() -> None:
    """Import the serving package with this script's folder off the import path (the script's
    name would hide the package); the folder goes back last, for bench/online_features.py,
    which the spawned servers import again with the path they inherit."""
    here = Path(__file__).resolve().parent
    others = [p for p in sys.path if Path(p or ".").resolve() != here]
    if len(others) < len(sys.path):
        sys.path[:] = others
        import serving  # noqa: F401

        sys.path.append(str(here))


def bench_settings(home: str):
    from keel.config import Settings

    return Settings.from_env({"KEEL_HOME": home, "KEEL_CODE_VERSION": "bench"})


def serve_ours(home: str, redis_url: str, port: int) -> None:
    unshadow()
    from keel.config import ServingSettings
    from keel.online.redis_backend import RedisOnlineStore
    from serving.app import create_app
    from serving.models import ModelSet
    from serving.server import Server

    settings, serving = bench_settings(home), ServingSettings()
    models = ModelSet(settings, PROJECT, [MODEL])
    models.refresh()
    if not models.ready:
        raise SystemExit(f"ours: {models.errors}")
    timeout = serving.online_timeout_ms / 1000
    online = RedisOnlineStore(redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
    app = create_app(Server(models=models, online=online, project=PROJECT), serving)
    # As serving.build_app does: the loaded objects are frozen out of full collections.
    gc.collect()
    gc.freeze()
    run_uvicorn(app, port)


def serve_floor(home: str, port: int, row: list[float]) -> None:
    unshadow()
    from keel.models.registry import load_model
    from serving.booster import OneRow

    model, features, _ = load_model(bench_settings(home), MODEL, "champion")
    if features != FEATURES:
        raise SystemExit(f"floor: the champion takes {features}, not the bench's {FEATURES}")
    booster = model.get_booster() if hasattr(model, "get_booster") else model
    booster.set_param({"nthread": 1})
    one_row = OneRow.for_booster(booster, len(row))
    if one_row is None:
        raise SystemExit("floor: the one-row XGBoost call does not answer as inplace_predict does")
    run_uvicorn(floor_app(one_row, list(row)), port)


def run_uvicorn(app, port: int) -> None:
    import uvicorn

    # uvicorn re-raises the SIGTERM it stopped on; exiting normally then lets the process clean up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # Every worker of a server binds the same port (SO_REUSEPORT): the kernel spreads the
    # connections over them, as uvicorn --workers does with its shared socket.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    config = uvicorn.Config(app, access_log=False, log_config=None)
    uvicorn.Server(config).run(sockets=[sock])


def floor_app(one_row, vector: list[float]) -> Callable[..., Awaitable[None]]:
    """A bare ASGI app: parse the JSON body, score the ready vector, answer a small JSON."""
    ready = b'{"status":"ready"}'

    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if scope["method"] == "POST":
            entity = json.loads(body)["entity_id"]
            prediction = float(one_row.try_score(vector)[0])
            payload = json.dumps({"entity_id": entity, "prediction": prediction}).encode()
        else:
            payload = ready
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(name: str, process, port: int, deadline_s: float = 120.0) -> None:
    deadline = time.monotonic() + deadline_s
    url = f"http://127.0.0.1:{port}/health/ready"
    while time.monotonic() < deadline:
        if not process.is_alive():
            raise SystemExit(f"{name} server exited with code {process.exitcode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{name} server on port {port} was not ready after {deadline_s:.0f}s")


# ---------------------------------------------------------------------------------------
# The load generator


class HttpConnection:
    """One keep-alive HTTP/1.1 connection, reading answers sized by Content-Length (both servers send it)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> "HttpConnection":
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def post(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        at = head.lower().find(b"\r\ncontent-length:")
        if at < 0:
            raise ConnectionError(f"answer without Content-Length: {head[:200]!r}")
        length = int(head[at + 17 : head.index(b"\r\n", at + 2)])
        return int(head[9:12]), await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


class RawClient:
    """Connections to one server, each used by one request at a time and kept for the next.

    The most recently used connection goes first; one idle for longer than uvicorn keeps it
    open (``timeout_keep_alive``, 5 s) is dropped, so a request never meets a closed socket.
    """

    name = "raw asyncio HTTP/1.1"

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[tuple[float, HttpConnection]] = []
        self.head = f"POST {PATH} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"

    def prepare(self, body: bytes) -> bytes:
        return f"{self.head}content-length: {len(body)}\r\n\r\n".encode() + body

    async def post(self, request: bytes) -> tuple[int, bytes]:
        conn = None
        while self.idle and conn is None:
            last_used, conn = self.idle.pop()
            if time.monotonic() - last_used > KEEP_ALIVE_S:
                conn.close()
                conn = None
        if conn is None:
            conn = await HttpConnection.open(self.port)
        try:
            answer = await conn.post(request)
        except BaseException:
            conn.close()
            raise
        self.idle.append((time.monotonic(), conn))
        return answer

    async def close(self) -> None:
        for _, conn in self.idle:
            conn.close()


class Httpx2Client:
    name = "httpx2.AsyncClient"

    def __init__(self, port: int) -> None:
        import httpx2

        limits = httpx2.Limits(max_connections=MAX_OPEN_CONNECTIONS, max_keepalive_connections=MAX_OPEN_CONNECTIONS)
        self.client = httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=None)
        self.headers = {"content-type": "application/json"}

    def prepare(self, body: bytes) -> bytes:
        return body

    async def post(self, request: bytes) -> tuple[int, bytes]:
        answer = await self.client.post(PATH, content=request, headers=self.headers)
        return answer.status_code, answer.content

    async def close(self) -> None:
        await self.client.aclose()


@dataclass
class Run:
    """What one mode measured against one server (possibly over several slices)."""

    latencies: list[float] = field(default_factory=list)
    send_lag: list[float] = field(default_factory=list)
    seconds: float = 0.0
    non_200: int = 0
    errors: int = 0
    failures: Counter = field(default_factory=Counter)  # why requests got no answer
    degraded: int = 0
    sent: int = 0  # warm-up included, like the CPU times
    cpu_s: dict[str, float] = field(default_factory=dict)  # by process: client, server, redis

    def record(self, latency: float, status: int, answer: bytes) -> None:
        if status == 200:
            self.latencies.append(latency)
            self.degraded += b'"degraded":true' in answer
        elif status:
            self.non_200 += 1
        else:
            self.errors += 1
            self.failures[answer.decode()] += 1

    def add(self, other: "Run") -> None:
        self.latencies += other.latencies
        self.send_lag += other.send_lag
        for name in ("seconds", "non_200", "errors", "degraded", "sent"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.failures += other.failures
        for name, seconds in other.cpu_s.items():
            self.cpu_s[name] = self.cpu_s.get(name, 0.0) + seconds

    def cpu_us(self, name: str) -> float:
        return self.cpu_s.get(name, float("nan")) / self.sent * 1e6 if self.sent else float("nan")

    def percentiles_ms(self) -> np.ndarray:
        if not self.latencies:
            return np.full(3, np.nan)
        return np.percentile(np.array(self.latencies) * 1e3, [50, 95, 99])

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0


async def call(client, request: bytes) -> tuple[int, bytes]:
    """Status 0 stands for no answer (a timeout, a broken connection), with the error's name."""
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            return await client.post(request)
    except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
        return 0, type(exc).__name__.encode()


async def closed_loop(client, requests: list[bytes], concurrency: int, warmup: float, seconds: float) -> Run:
    run = Run()
    start = time.perf_counter() + warmup
    end = start + seconds
    done_at = [start]

    async def connection(k: int) -> None:
        i = k * len(requests) // concurrency
        while (t0 := time.perf_counter()) < end:
            status, answer = await call(client, requests[i % len(requests)])
            t1 = time.perf_counter()
            i += 1
            run.sent += 1
            if t0 >= start:
                run.record(t1 - t0, status, answer)
                done_at.append(t1)

    await asyncio.gather(*(connection(k) for k in range(concurrency)))
    run.seconds = max(done_at) - start
    return run


async def open_loop(client, requests: list[bytes], rate: float, warmup: float, seconds: float) -> Run:
    run = Run()
    warm, total = int(rate * warmup), int(rate * (warmup + seconds))
    start = time.perf_counter() + 0.01
    measured_from = start + warm / rate
    slots = asyncio.Semaphore(MAX_OPEN_CONNECTIONS)
    done_at = [measured_from]

    async def one(i: int, scheduled: float) -> None:
        async with slots:
            sent = time.perf_counter()
            status, answer = await call(client, requests[i % len(requests)])
        done = time.perf_counter()
        run.sent += 1
        if i >= warm:
            run.record(done - scheduled, status, answer)
            run.send_lag.append(sent - scheduled)
            done_at.append(done)

    # A thread keeps the schedule: asyncio's timers wake up to a millisecond late, and
    # that lateness would count as latency (it is measured from the scheduled time).
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task] = []
    scheduled_all = loop.create_future()

    def pace() -> None:
        for i in range(total):
            scheduled = start + i / rate
            if (delay := scheduled - time.perf_counter()) > 0:
                time.sleep(delay)
            loop.call_soon_threadsafe(lambda i=i, t=scheduled: tasks.append(loop.create_task(one(i, t))))
        loop.call_soon_threadsafe(scheduled_all.set_result, None)

    threading.Thread(target=pace, name="bench-pacer", daemon=True).start()
    await scheduled_all
    await asyncio.gather(*tasks)
    run.seconds = max(done_at) - measured_from
    return run


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def cpu_seconds(pid: int) -> float:
    """CPU time of all of a process's threads so far (Linux schedstat, in ns); NaN where unavailable."""
    total = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return float("nan")
    for task in tasks:
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return total / 1e9


def measure(
    client_cls, port: int, bodies: list[bytes], mode: tuple[str, float], warmup: float, seconds: float, pids: dict
) -> Run:
    async def go() -> Run:
        client = client_cls(port)
        requests = [client.prepare(b) for b in bodies]
        try:
            kind, value = mode
            if kind == "closed":
                return await closed_loop(client, requests, int(value), warmup, seconds)
            return await open_loop(client, requests, value, warmup, seconds)
        finally:
            await client.close()

    gc.disable()  # a collection in the client would show up as server latency
    before = {name: sum(map(cpu_seconds, group)) for name, group in pids.items()}
    client_before = time.process_time()
    try:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            run = runner.run(go())
    finally:
        gc.enable()
    run.cpu_s = {name: sum(map(cpu_seconds, group)) - before[name] for name, group in pids.items()}
    run.cpu_s["client"] = time.process_time() - client_before
    return run


async def ask(client_cls, port: int, body: bytes) -> tuple[int, bytes]:
    client = client_cls(port)
    try:
        return await client.post(client.prepare(body))
    finally:
        await client.close()


def check_answers(client_cls, ports: dict[str, int], entity: str, expected: float) -> None:
    """Ours hydrates the entity completely and scores it as the floor scores its ready row (the same values)."""
    body = json.dumps({"entity_id": entity}).encode()
    for name, port in ports.items():
        with asyncio.Runner(loop_factory=new_loop) as runner:
            status, raw = runner.run(ask(client_cls, port, body))
        if status != 200:
            raise SystemExit(f"{name}: answered {status}: {raw[:300]!r}")
        answer = json.loads(raw)
        got = answer["predictions"][0] if "predictions" in answer else answer["prediction"]
        if answer.get("degraded") or answer.get("missing_features"):
            raise SystemExit(f"{name}: entity {entity} was not hydrated from Redis: {answer}")
        if abs(got - expected) > 1e-6:
            raise SystemExit(f"{name}: predicted {got} for {entity}, the booster gives {expected}")


# ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entities", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per mode and server")
    parser.add_argument("--rate", type=float, default=500.0, help="open-loop request rate (requests/s)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unrecorded seconds before each slice")
    parser.add_argument("--rounds", type=int, default=2, help="alternating slices of each mode per server")
    parser.add_argument("--client", choices=("raw", "httpx2"), default="raw")
    parser.add_argument(
        "--workers", type=int, default=1, help="uvicorn worker processes per server (ours and floor alike)"
    )
    parser.add_argument("--quick", action="store_true", help="a ~30 s run: 2,000 entities, 2 s per mode, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.entities, args.seconds, args.warmup, args.rounds = min(args.entities, 2_000), 2.0, 0.5, 1

    unshadow()
    # Children inherit these: MLflow quiet, one OpenMP thread per process (STYLE.md).
    os.environ["MLFLOW_LOGGING_LEVEL"] = "ERROR"
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    from keel.devservers import RedisServer
    from keel.models.registry import load_model
    from keel.online.redis_backend import RedisOnlineStore

    client_cls = RawClient if args.client == "raw" else Httpx2Client
    load_before = os.getloadavg()
    began = time.perf_counter()
    redis_server = RedisServer().start()
    processes = []
    with tempfile.TemporaryDirectory(prefix="keel-bench-serving-") as home:
        try:
            settings = bench_settings(home)
            store = RedisOnlineStore(redis_server.url)
            ids = entity_ids(args.entities)
            columns = feature_columns(np.random.default_rng(7), args.entities, GROUPS)
            fill(store, GROUPS, ids, columns)
            store.close()
            print(f"wrote {args.entities:,} entities x {len(GROUPS)} groups ({len(FEATURES)} features) to Redis")
            register_model(settings)
            row = [float(columns[f][0]) for f in FEATURES]
            model, _, _ = load_model(settings, MODEL, "champion")
            expected = float(model.get_booster().inplace_predict(np.asarray([row]), validate_features=False)[0])

            spawn = mp.get_context("spawn")
            ports = {"ours": free_port(), "floor": free_port()}
            processes = [
                spawn.Process(target=serve_ours, args=(home, redis_server.url, ports["ours"]), daemon=True)
                for _ in range(args.workers)
            ] + [
                spawn.Process(target=serve_floor, args=(home, ports["floor"], row), daemon=True)
                for _ in range(args.workers)
            ]
            for process in processes:
                process.start()
            for i, process in enumerate(processes):
                name = "ours" if i < args.workers else "floor"
                wait_ready(name, process, ports[name])
            check_answers(client_cls, ports, ids[0], expected)
            print(
                f"servers ready; both answer {ids[0]} with {expected:.6f}; setup took {time.perf_counter() - began:.0f}s"
            )

            rng = np.random.default_rng(13)
            bodies = [json.dumps({"entity_id": ids[int(i)]}).encode() for i in rng.integers(0, len(ids), 8192)]
            modes = [("closed", 1.0), ("closed", 8.0), ("open", args.rate)]
            results = {m: {"ours": Run(), "floor": Run()} for m in modes}
            # The setup's objects (MLflow, pandas, XGBoost) stay out of the client's collections.
            gc.collect()
            gc.freeze()
            slice_s = args.seconds / args.rounds
            pids = {
                "ours": {"server": [p.pid for p in processes[: args.workers]], "redis": [redis_server.process.pid]},
                "floor": {"server": [p.pid for p in processes[args.workers :]]},
            }
            for mode in modes:
                for _ in range(args.rounds):
                    for name in ("ours", "floor"):
                        run = measure(client_cls, ports[name], bodies, mode, args.warmup, slice_s, pids[name])
                        results[mode][name].add(run)
            report(args, client_cls, results, load_before)
        finally:
            gc.unfreeze()  # objects left frozen at exit make DuckDB's bindings report leaks
            for process in processes:
                process.terminate()
            for process in processes:
                process.join(10)
                if process.is_alive():
                    process.kill()
            redis_server.stop()
    print(f"total {time.perf_counter() - began:.0f}s")


def report(args, client_cls, results: dict, load_before: tuple[float, ...]) -> None:
    def label(mode) -> str:
        kind, value = mode
        return f"closed, {value:.0f} conn" if kind == "closed" else f"open, {value:.0f}/s"

    def figures(run: Run) -> str:
        return "/".join(f"{v:.2f}" for v in run.percentiles_ms()) + f"  {run.rate:>6.0f}"

    print()
    print(
        f"hydrate + predict ({len(FEATURES)} features, XGBoost 100x depth 6) over HTTP, {args.workers} uvicorn worker(s) each; "
        f"{args.seconds:g}s per mode and server in {args.rounds} alternating slice(s)"
    )
    header = f"{'mode':<16}{'ours p50/p95/p99 ms, req/s':>30}{'floor p50/p95/p99 ms, req/s':>31}"
    print(f"{header}{'p50 ratio':>11}{'p99 ratio':>11}")
    for mode, runs in results.items():
        ours, floor = runs["ours"], runs["floor"]
        (o50, _, o99), (f50, _, f99) = ours.percentiles_ms(), floor.percentiles_ms()
        print(f"{label(mode):<16}{figures(ours):>30}{figures(floor):>31}{o50 / f50:>10.2f}x{o99 / f99:>10.2f}x")
    print()
    every = [run for runs in results.values() for run in runs.values()]
    non_200, errors = sum(r.non_200 for r in every), sum(r.errors for r in every)
    degraded = sum(runs["ours"].degraded for runs in results.values())
    failures = sum((r.failures for r in every), Counter())
    why = f" ({', '.join(f'{k}: {n}' for k, n in failures.most_common())})" if failures else ""
    print(f"non-200 answers: {non_200} (must be 0); no answer: {errors}{why}; ", end="")
    print(f"degraded (defaults instead of Redis): {degraded}")
    open_mode = ("open", args.rate)
    for name in ("ours", "floor"):
        lag = np.percentile(np.array(results[open_mode][name].send_lag or [0.0]) * 1e3, [50, 99])
        print(f"open loop, {name}: client send lag behind schedule p50/p99 {lag[0]:.2f}/{lag[1]:.2f} ms (included)")
    print()
    print(f"CPU per request, us (warm-up included; client, servers and Redis share {os.cpu_count()} cores)")
    print(f"{'mode':<16}{'ours: server':>14}{'Redis':>8}{'client':>8}{'floor: server':>15}{'client':>8}")
    for mode, runs in results.items():
        ours, floor = runs["ours"], runs["floor"]
        print(
            f"{label(mode):<16}{ours.cpu_us('server'):>14.0f}{ours.cpu_us('redis'):>8.0f}{ours.cpu_us('client'):>8.0f}"
            f"{floor.cpu_us('server'):>15.0f}{floor.cpu_us('client'):>8.0f}"
        )
    print(
        f"client: {client_cls.name} on one asyncio loop in this process; load average before the run: "
        f"{', '.join(f'{v:.2f}' for v in load_before)} (other processes' CPU shows up in the latencies)"
    )
    ours = results[open_mode]["ours"]
    p99 = ours.percentiles_ms()[2]
    met = p99 < TARGET_P99_MS and ours.rate >= 0.98 * args.rate and not (ours.non_200 or ours.errors or ours.degraded)
    print(
        f"target (issue 6): p99 < {TARGET_P99_MS:g} ms at {args.rate:g} req/s: ours p99 {p99:.2f} ms at "
        f"{ours.rate:.0f} req/s, {p99 / results[open_mode]['floor'].percentiles_ms()[2]:.2f}x the floor: "
        f"{'met' if met else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
