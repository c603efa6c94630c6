"""A Dask distributed cluster on loopback: a scheduler and worker processes, for tests and the profile.

``DaskScheduler().start()`` listens on a free port (``address`` is ``tcp://127.0.0.1:PORT``, the
value for ``KEEL_COMPUTE``); ``DaskWorker(address).start()`` joins it as one process without a
nanny (so killing it kills the worker, as a lost machine would) and is ready once the scheduler
has registered it. Workers import Keel and the project from ``pythonpath`` (default: the current
folder) and read the lakehouse their environment names (``env``: the ``KEEL_*`` variables, as
``Settings.as_env()`` gives them), as deployed workers do.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from keel.devservers import Server


class DaskScheduler(Server):
    name = "dask-scheduler"

    def _command(self, port: int) -> list[str]:
        return [
            sys.executable, "-m", "distributed.cli.dask_scheduler",
            "--host", "127.0.0.1", "--port", str(port), "--no-dashboard", "--no-show",
        ]  # fmt: skip

    def _ready(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
            return True

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"


class DaskWorker(Server):
    """One worker process (one thread: the engine threads NumPy itself) of the scheduler at ``scheduler``.

    ``preload``: a module or file each worker loads at start (Dask's ``--preload``)."""

    name = "dask-worker"
    stop_timeout = 10.0

    def __init__(
        self,
        scheduler: str,
        *,
        env: dict[str, str] | None = None,
        memory_limit: str = "0",
        preload: str | None = None,
        pythonpath: Path | None = None,
    ) -> None:
        super().__init__()
        self.env = env or {}
        self.scheduler = scheduler
        self.memory_limit = memory_limit
        self.preload = preload
        self.pythonpath = Path(pythonpath or Path.cwd()).resolve()
        self._registered = 0

    def _command(self, port: int) -> list[str]:
        command = [
            sys.executable, "-m", "distributed.cli.dask_worker", self.scheduler,
            "--host", "127.0.0.1", "--worker-port", str(port), "--no-nanny", "--nthreads", "1",
            "--memory-limit", self.memory_limit, "--no-dashboard", "--name", f"worker-{port}",
        ]  # fmt: skip
        return command + (["--preload", self.preload] if self.preload else [])

    def _popen_options(self) -> dict:
        path = os.pathsep.join(p for p in (str(self.pythonpath), os.environ.get("PYTHONPATH")) if p)
        return {"env": {**os.environ, **self.env, "PYTHONPATH": path}}

    def _launch(self, timeout: float) -> bool:
        self._registered = self.log().count("Registered to:")  # a restart keeps the log
        return super()._launch(timeout)

    def _ready(self) -> bool:
        return self.log().count("Registered to:") > self._registered

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"
