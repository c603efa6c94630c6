"""A Dask worker preload: the worker kills itself (SIGKILL, no goodbye) when it starts its first
Keel task, as a machine lost mid-task would. Loaded with ``dask worker --preload <this file>``."""

import os
import signal

from distributed import WorkerPlugin


class KillOnFirstTask(WorkerPlugin):
    def transition(self, key, start, finish, **kwargs):
        if finish == "executing" and str(key).startswith("keel-"):
            os.kill(os.getpid(), signal.SIGKILL)


async def dask_setup(worker):
    await worker.plugin_add(KillOnFirstTask(), name="kill-on-first-task")
