"""`keel demo --profile production` stops every server it started, however the demo ends."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keel.cli.demo import run_production

ROOT = Path(__file__).resolve().parents[3]
SERVER_VARIABLES = ("DAGSTER_PG_PORT", "KEEL_REDIS_URL", "KEEL_KAFKA_BOOTSTRAP", "KEEL_MLFLOW_URI", "KEEL_S3_ENDPOINT")


def ports(environment) -> list[int]:
    """The loopback ports of the profile's servers, from the variables that point Keel at them."""
    return [int(re.search(r"(?::|^)(\d+)(?:/\d+)?$", environment[name]).group(1)) for name in SERVER_VARIABLES]


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_a_failing_demo_stops_every_server_and_restores_the_environment(settings):
    seen = {}

    def fails(production):
        seen.update(os.environ)
        assert production.catalog_uri.startswith("postgresql") and production.warehouse.startswith("s3://")
        assert all(listening(port) for port in ports(seen))
        raise RuntimeError("the demo broke")

    with pytest.raises(RuntimeError, match="the demo broke"):
        run_production(settings, fails)
    assert not any(listening(port) for port in ports(seen))
    assert not list((settings.home / "servers").iterdir())
    assert "KEEL_CATALOG_URI" not in os.environ and os.environ["DAGSTER_HOME"] != seen["DAGSTER_HOME"]


def test_sigterm_stops_the_demo_and_every_server(keel_home):
    script = (
        "import os, sys, time\n"
        "from keel.cli.demo import run_production\n"
        "from keel.config import Settings\n"
        "def wait(settings):\n"
        f"    print('PORTS', *(os.environ[n] for n in {SERVER_VARIABLES!r}), flush=True)\n"
        "    time.sleep(600)\n"
        "sys.exit(run_production(Settings.from_env(), wait))\n"
    )
    demo = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, env=os.environ.copy(), stdout=subprocess.PIPE, text=True
    )
    try:
        line = demo.stdout.readline()
        while line and not line.startswith("PORTS "):
            line = demo.stdout.readline()
        assert line, "the demo ended before its servers were up"
        started = ports(dict(zip(SERVER_VARIABLES, line.split()[1:], strict=True)))
        assert all(listening(port) for port in started)
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(60) != 0
    finally:
        demo.kill()
        demo.wait()
    deadline = time.monotonic() + 10
    while any(listening(port) for port in started) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(listening(port) for port in started)
    assert not list((keel_home / "servers").iterdir())
