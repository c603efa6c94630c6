"""The demo's long-running processes: the stream worker fed live events, and the model server
kept answering while the daemon monitors and retrains.

``LiveStream`` (when KEEL_KAFKA_BOOTSTRAP is set) starts ``keel stream`` as its own process and
produces the shop's events to the broker at a steady rate for a while, beside the batch
ingest; ``finish()`` waits until the worker has committed every event, stops it and counts the
events in the raw tables. ``DemoServer`` runs ``keel serve --workers 2``, asks it for a few
predictions, and can keep asking from a thread (``keep_asking``) until it is stopped; its
summary says how many answers came back, from which versions, and how many failed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pyarrow.compute as pc

from keel.config import Settings
from keel.lakehouse.tables import Lakehouse

STREAM_GROUP = "keel-demo-stream"
STOP_TIMEOUT_S = 30.0
CATCH_UP_TIMEOUT_S = 180.0


def _keel() -> str:
    return str(Path(sys.executable).with_name("keel"))


def _stop(process: subprocess.Popen) -> bool:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; whether it stopped by itself."""
    if process.poll() is not None:
        return True
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT_S)
        return True
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)
        return False


class LiveStream:
    """``keel stream`` in its own process, fed ``rate`` live events a second for ``seconds``."""

    def __init__(self, settings: Settings, project, *, rate: float = 100.0, seconds: float = 30.0) -> None:
        self.settings = settings
        self.project = project
        self.rate = rate
        self.seconds = seconds
        self.log_path = settings.home / "stream.log"
        self.worker: subprocess.Popen | None = None
        self.producer = None
        self.makers = []
        self.report = None
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> LiveStream:
        from keel.stream.producer import EventProducer

        self.producer = EventProducer(self.settings.kafka_bootstrap, self.project.sources, seed=7)
        self.makers = self.producer.makers
        with open(self.log_path, "w") as log:
            self.worker = subprocess.Popen(
                [
                    _keel(),
                    "stream",
                    "--group-id",
                    STREAM_GROUP,
                    "--batch-seconds",
                    "2",
                    "--metrics-port",
                    "0",
                    "--session-timeout-ms",
                    "3000",
                ],
                env={**os.environ, **self.settings.as_env()},
                stdout=log,
                stderr=log,
            )
        self._thread = threading.Thread(target=self._produce, name="demo-producer", daemon=True)
        self._thread.start()
        return self

    def _produce(self) -> None:
        try:
            self.report = self.producer.run(self.rate, self.seconds, stop=self._stop)
        except Exception as exc:  # reported by finish()
            self.error = exc

    def describe(self) -> str:
        topics = ", ".join(m.source.kafka_topic for m in self.makers)
        return (
            f"        live: {self.rate:g} events/s to {topics} for {self.seconds:g}s, consumed by `keel stream` "
            f"(pid {self.worker.pid}, group {STREAM_GROUP}, log {self.log_path})"
        )

    def finish(self, lake: Lakehouse) -> tuple[list[str], bool]:
        """Wait for the producer and for the worker to commit every event; stop it; count what landed."""
        from keel.stream.kafka_io import group_lag

        self._thread.join()
        if self.error is not None or self.report is None:
            self.stop()
            return [f"        live events: the producer failed: {self.error}"], False
        topics = [m.source.kafka_topic for m in self.makers]
        deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
        lag = None
        while time.monotonic() < deadline and self.worker.poll() is None:
            lags = group_lag(self.settings.kafka_bootstrap, STREAM_GROUP, topics)
            lag = sum(p["lag"] for p in lags.values())
            if lags and lag == 0:
                break
            time.sleep(0.5)
        stopped = self.stop()
        lines = [f"        live: {self.report.summary()}"]
        if lag != 0:
            lines.append(f"        the stream worker did not catch up (lag {lag}); see {self.log_path}")
            return lines, False
        landed = {}
        for maker in self.makers:
            ids = lake.read(maker.source.table_name, columns=[maker.source.event_id]).column(0)
            landed[maker.source.table_name] = pc.sum(pc.starts_with(ids, maker.prefix)).as_py() or 0
        produced = sum(self.report.events.values())
        lines.append(
            f"        the stream worker committed every event and stopped {'cleanly' if stopped else 'by SIGKILL'}; "
            "in Iceberg: " + ", ".join(f"{t} {n:,}" for t, n in sorted(landed.items()))
        )
        return lines, stopped and sum(landed.values()) == produced

    def stop(self) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)
        if self.producer is not None:
            producer, self.producer = self.producer, None
            producer.close()
        return _stop(self.worker) if self.worker is not None else True

    def __enter__(self) -> LiveStream:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class DemoServer:
    """``keel serve --workers 2`` on a free port, for one model; stopped gracefully on leaving."""

    def __init__(self, settings: Settings, spec) -> None:
        from keel.devservers import free_port

        self.settings = settings
        self.spec = spec
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = settings.home / "serve.log"
        self.process: subprocess.Popen | None = None
        self.answers: Counter = Counter()
        self.failures: Counter = Counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 120.0) -> dict | None:
        """Start the server; its readiness answer, or None if it did not become ready."""
        port = self.url.rsplit(":", 1)[1]
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [_keel(), "serve", "--port", port, "--workers", "2"],
                env={**os.environ, **self.settings.as_env()},
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with urllib.request.urlopen(f"{self.url}/health/ready", timeout=2) as answer:
                    return json.load(answer)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        return None

    def predict(self, user: str) -> dict:
        body = json.dumps({"entity_id": user}).encode()
        request = urllib.request.Request(
            f"{self.url}/v1/models/{self.spec.name}/predict", body, {"content-type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=5) as answer:
            return json.load(answer)

    def admin_without_a_key(self) -> tuple[int, str]:
        """What ``GET /admin/models`` answers a caller with no API key: status and error."""
        try:
            with urllib.request.urlopen(f"{self.url}/admin/models", timeout=5) as answer:
                return answer.status, ""
        except urllib.error.HTTPError as refused:
            return refused.code, json.load(refused).get("error", "")

    def answered(self) -> float:
        """Requests answered with status ok, by the server's own /metrics (summed over its workers)."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as answer:
            metrics = answer.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("keel_serving_requests_total{") and 'status="ok"' in line
        )

    def keep_asking(self, users: list[str], every: float = 0.5) -> None:
        """Ask for one of ``users`` every ``every`` seconds from a thread, until ``stop()``."""

        def ask() -> None:
            i = 0
            while not self._stop.wait(every):
                try:
                    out = self.predict(users[i % len(users)])
                    self.answers[f"v{out['version']} {out['alias']}"] += 1
                except Exception as exc:  # counted and shown; the loop goes on
                    self.failures[type(exc).__name__] += 1
                i += 1

        self._thread = threading.Thread(target=ask, name="demo-traffic", daemon=True)
        self._thread.start()

    def traffic_summary(self) -> tuple[str, bool]:
        """What the traffic thread got back: answers per version and alias, and failures."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)
        got = ", ".join(f"{n} from {who}" for who, n in sorted(self.answers.items())) or "no answers"
        failed = ", ".join(f"{n} {kind}" for kind, n in sorted(self.failures.items()))
        text = f"        served during the loop: {got}; " + (f"FAILED: {failed}" if failed else "no failures")
        return text, bool(self.answers) and not self.failures

    def stop(self) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)
        return _stop(self.process) if self.process is not None else True

    def __enter__(self) -> DemoServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
