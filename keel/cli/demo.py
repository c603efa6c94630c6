"""``keel demo``: the project's demo end to end through Dagster, on the embedded profile or,
with ``--profile production``, on real servers started for it (``keel.devservers.profile``)."""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import sys
from pathlib import Path

from keel.config import Settings

# The Dagster instance of the production profile: storage in PostgreSQL, the daemon's run queue.
PRODUCTION_INSTANCE = Path(__file__).resolve().parents[2] / "deploy" / "dagster" / "dagster.yaml"


def add_commands(sub) -> None:
    p = sub.add_parser("demo", help="run the project's demo end to end through Dagster")
    p.add_argument(
        "--profile",
        choices=("embedded", "production"),
        default="embedded",
        help="embedded: SQLite and files under KEEL_HOME (default); production: start PostgreSQL, S3-compatible "
        "storage, Redis, a Kafka broker and an MLflow server on loopback ports under KEEL_HOME and run through them",
    )
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    settings = Settings.from_env()
    try:
        demo = importlib.import_module(f"{settings.project}.demo")
    except ModuleNotFoundError:
        print(f"keel: project module {settings.project!r} has no demo ({settings.project}/demo.py)", file=sys.stderr)
        return 2
    if args.profile == "embedded":
        return demo.run(settings)
    return run_production(settings, demo.run)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_production(settings: Settings, run) -> int:
    """Start the production profile's servers under KEEL_HOME/servers, point this process (and the
    processes it starts) at them, run ``run(settings)``, and stop every server however it ends."""
    from keel.devservers import DevServerError
    from keel.devservers.profile import ProductionServers

    home = settings.home
    dagster_home = home / "dagster-production"
    print(f"starting the production profile's servers under {home / 'servers'} ...", flush=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a stopped demo stops its servers too
    saved = dict(os.environ)
    try:
        with ProductionServers(home / "servers") as servers:
            os.environ.update(servers.environment())
            # The instance keeps nothing between demos: its PostgreSQL is new each time.
            shutil.rmtree(dagster_home, ignore_errors=True)
            dagster_home.mkdir(parents=True)
            shutil.copy(PRODUCTION_INSTANCE, dagster_home / "dagster.yaml")
            os.environ["DAGSTER_HOME"] = str(dagster_home)
            for line in servers.describe():
                print(f"        {line}", flush=True)
            print(
                f"        Dagster      instance {dagster_home} (deploy/dagster/dagster.yaml: storage in PostgreSQL, "
                "QueuedRunCoordinator, the daemon launches runs)",
                flush=True,
            )
            code = run(Settings.from_env())
            print("stopping the production profile's servers (what they held goes with them)", flush=True)
            return code
    except DevServerError as exc:
        print(f"keel demo --profile production: {exc}", file=sys.stderr)
        return 1
    finally:
        os.environ.clear()
        os.environ.update(saved)
        signal.signal(signal.SIGTERM, previous)
