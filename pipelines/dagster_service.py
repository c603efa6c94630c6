"""Dagster as a person runs it: ``dagster dev`` (webserver, daemon, code server) on the instance
under DAGSTER_HOME, driven through the GraphQL API the UI itself uses.

The demo launches its runs through this, so they go through the run queue (one run per
table at a time), show on the Overview timeline and their jobs' pages, and the daemon's
sensors and schedules act on them; the end-to-end tests use it to click as a user would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}
BACKFILL_DONE = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}
POLL_S = 0.5


class DagsterServiceError(RuntimeError):
    """Dagster did not start, refused a request, or a run did not finish in time; the message says which."""


@dataclass(frozen=True)
class Location:
    name: str
    repository: str

    def selector(self, **extra) -> dict:
        return {"repositoryLocationName": self.name, "repositoryName": self.repository, **extra}


class DagsterService:
    """``dagster dev`` on ``127.0.0.1:port`` for the instance in ``dagster_home`` (a context manager).

    ``env`` is the whole environment of the process (KEEL_* settings included); its log goes to
    ``dagster_home/dagster-dev.log``.
    """

    def __init__(
        self, dagster_home: Path, port: int, *, env: Mapping[str, str] | None = None, workspace: Path | None = None
    ) -> None:
        self.home = Path(dagster_home)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.env = {**(env if env is not None else os.environ), "DAGSTER_HOME": str(self.home)}
        self.workspace = workspace or ROOT / "workspace.yaml"
        self.log_path = self.home / "dagster-dev.log"
        self._process: subprocess.Popen | None = None
        self._location: Location | None = None

    # lifecycle ---------------------------------------------------------------------------

    def start(self, timeout_s: float = 180) -> DagsterService:
        self.home.mkdir(parents=True, exist_ok=True)
        python = Path(sys.executable)
        # The table pools must exist before the first burst of runs queues (see pipelines.pools).
        subprocess.run(
            [str(python), "-m", "pipelines.pools"], cwd=ROOT, env=self.env, check=True, capture_output=True, timeout=300
        )
        dagster = python.with_name("dagster")
        with open(self.log_path, "ab") as log:
            # Started from DAGSTER_HOME, as `make ui` does, so the instance's own dagster.yaml is read.
            self._process = subprocess.Popen(
                [str(dagster), "dev", "--host", "127.0.0.1", "--port", str(self.port), "-w", str(self.workspace)],
                cwd=self.home,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise DagsterServiceError(f"dagster dev exited with {self._process.returncode}; see {self.log_path}")
            try:
                self._location = self._loaded_location()
            except (urllib.error.URLError, ConnectionError, TimeoutError, DagsterServiceError):
                self._location = None
            if self._location is not None:
                return self
            time.sleep(POLL_S)
        self.stop()
        raise DagsterServiceError(
            f"dagster dev did not load the code location within {timeout_s:.0f}s; see {self.log_path}"
        )

    def stop(self, timeout_s: float = 60) -> None:
        """Stop the webserver, daemon and code server (SIGTERM to the group, then SIGKILL)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def __enter__(self) -> DagsterService:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def location(self) -> Location:
        if self._location is None:
            raise DagsterServiceError("the Dagster service is not started; call start() first")
        return self._location

    # GraphQL -----------------------------------------------------------------------------

    def graphql(self, query: str, variables: Mapping | None = None, *, timeout_s: float = 60) -> dict:
        body = json.dumps({"query": query, "variables": dict(variables or {})}).encode()
        request = urllib.request.Request(f"{self.url}/graphql", body, {"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            out = json.load(answer)
        if out.get("errors"):
            raise DagsterServiceError(f"GraphQL errors: {json.dumps(out['errors'])[:2000]}")
        return out["data"]

    def _loaded_location(self) -> Location | None:
        data = self.graphql(WORKSPACE, timeout_s=5)
        for entry in data["workspaceOrError"].get("locationEntries", []):
            loaded = entry.get("locationOrLoadError") or {}
            if loaded.get("__typename") == "PythonError":
                raise DagsterServiceError(f"code location {entry['name']!r} failed to load: {loaded['message']}")
            repositories = loaded.get("repositories") or []
            if repositories:
                return Location(entry["name"], repositories[0]["name"])
        return None

    def launch_job(self, job: str, *, tags: Mapping[str, str] | None = None, run_config: Mapping | None = None) -> str:
        """Queue a run of ``job`` as the Launchpad does; returns the run id."""
        return self._launch(self.location.selector(jobName=job), tags, run_config)

    def materialize(
        self, assets: Sequence[Sequence[str]], *, partition: str | None = None, run_config: Mapping | None = None
    ) -> str:
        """Queue a run materializing ``assets`` (and their checks) as the UI's Materialize button does."""
        keys = [{"path": list(path)} for path in assets]
        checks = [{"assetKey": key, "name": name} for key, name in self.checks_of(assets)]
        selector = self.location.selector(pipelineName="__ASSET_JOB", assetSelection=keys, assetCheckSelection=checks)
        return self._launch(selector, {"dagster/partition": partition} if partition else None, run_config)

    def _launch(self, selector: dict, tags: Mapping[str, str] | None, run_config: Mapping | None) -> str:
        params = {
            "selector": selector,
            "runConfigData": dict(run_config or {}),
            "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in (tags or {}).items()]},
        }
        result = self.graphql(LAUNCH_RUN, {"executionParams": params})["launchPipelineExecution"]
        if result["__typename"] != "LaunchRunSuccess":
            raise DagsterServiceError(
                f"launching {selector.get('jobName') or 'assets'} failed: {json.dumps(result)[:2000]}"
            )
        return result["run"]["runId"]

    def backfill(self, assets: Sequence[Sequence[str]], partitions: Iterable[str], *, title: str = "") -> str:
        """Launch an asset backfill of ``partitions`` as the UI's partition dialog does; returns its id."""
        params = {
            "assetSelection": [{"path": list(path)} for path in assets],
            "partitionNames": list(partitions),
            "title": title or None,
        }
        result = self.graphql(LAUNCH_BACKFILL, {"backfillParams": params})["launchPartitionBackfill"]
        if result["__typename"] != "LaunchBackfillSuccess":
            raise DagsterServiceError(f"launching the backfill failed: {json.dumps(result)[:2000]}")
        return result["backfillId"]

    def checks_of(self, assets: Sequence[Sequence[str]]) -> list[tuple[dict, str]]:
        wanted = {tuple(path) for path in assets}
        out = []
        for node in self.graphql(ASSET_CHECKS)["assetNodes"]:
            path = tuple(node["assetKey"]["path"])
            if path in wanted:
                out += [({"path": list(path)}, check["name"]) for check in node["assetChecksOrError"].get("checks", [])]
        return out

    def run_status(self, run_id: str) -> str:
        run = self.graphql(RUN_STATUS, {"runId": run_id})["runOrError"]
        if run["__typename"] != "Run":
            raise DagsterServiceError(f"run {run_id}: {json.dumps(run)[:500]}")
        return run["status"]

    def wait_for_runs(self, run_ids: Iterable[str], timeout_s: float = 600) -> dict[str, str]:
        """Each run's final status (SUCCESS, FAILURE, CANCELED) once all have finished."""
        waiting, done = set(run_ids), {}
        deadline = time.monotonic() + timeout_s
        while waiting:
            for run_id in sorted(waiting):
                status = self.run_status(run_id)
                if status in FINISHED:
                    done[run_id] = status
            waiting -= set(done)
            if waiting and time.monotonic() > deadline:
                raise DagsterServiceError(f"run(s) {sorted(waiting)} not finished within {timeout_s:.0f}s")
            if waiting:
                time.sleep(POLL_S)
        return done

    def wait_for_backfill(self, backfill_id: str, timeout_s: float = 600) -> tuple[str, dict[str, str]]:
        """The backfill's final status and the final status of each of its runs."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.graphql(BACKFILL, {"backfillId": backfill_id})["partitionBackfillOrError"]
            if found["__typename"] != "PartitionBackfill":
                raise DagsterServiceError(f"backfill {backfill_id}: {json.dumps(found)[:500]}")
            runs = {r["runId"]: r["status"] for r in found["runs"]}
            if found["status"] in BACKFILL_DONE and all(s in FINISHED for s in runs.values()):
                return found["status"], runs
            if time.monotonic() > deadline:
                raise DagsterServiceError(f"backfill {backfill_id} still {found['status']} after {timeout_s:.0f}s")
            time.sleep(POLL_S)

    def asset_edges(self) -> set[tuple[str, str]]:
        """Every (upstream, downstream) pair of the asset graph, as "a/b" keys."""
        edges = set()
        for node in self.graphql(ASSET_EDGES)["assetNodes"]:
            key = "/".join(node["assetKey"]["path"])
            edges |= {("/".join(dep["path"]), key) for dep in node["dependencyKeys"]}
        return edges

    def instigators_of(self, path: Sequence[str]) -> set[str]:
        """The sensors and schedules that target the asset (its "Automation" in the UI)."""
        for node in self.graphql(ASSET_INSTIGATORS)["assetNodes"]:
            if node["assetKey"]["path"] == list(path):
                return {i["name"] for i in node["targetingInstigators"]}
        raise DagsterServiceError(f"no asset {'/'.join(path)} in the code location")

    def sensor_ticks(self, name: str, after: float) -> list[dict]:
        """The sensor's ticks since ``after`` (a timestamp), oldest first: status, skipReason, runIds, error."""
        selector = self.location.selector(sensorName=name)
        found = self.graphql(SENSOR_TICKS, {"selector": selector, "after": after})["sensorOrError"]
        if found.get("__typename") != "Sensor":
            raise DagsterServiceError(f"sensor {name!r}: {json.dumps(found)[:500]}")
        return sorted(found["sensorState"]["ticks"], key=lambda t: t["timestamp"])

    def automation(self) -> dict[str, str]:
        """Every sensor's and schedule's status (RUNNING or STOPPED), by name."""
        repo = self.graphql(AUTOMATION, {"selector": self.location.selector()})["repositoryOrError"]
        states = {s["name"]: s["sensorState"]["status"] for s in repo["sensors"]}
        return states | {s["name"]: s["scheduleState"]["status"] for s in repo["schedules"]}


WORKSPACE = """
query { workspaceOrError { __typename ... on Workspace { locationEntries { name locationOrLoadError {
  __typename ... on RepositoryLocation { repositories { name } } ... on PythonError { message } } } } } }
"""

LAUNCH_RUN = """
mutation Launch($executionParams: ExecutionParams!) {
  launchPipelineExecution(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message stack }
    ... on InvalidStepError { invalidStepKey }
    ... on InvalidOutputError { invalidOutputName }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on UnauthorizedError { message }
    ... on PipelineNotFoundError { message }
    ... on InvalidSubsetError { message }
  }
}
"""

LAUNCH_BACKFILL = """
mutation Backfill($backfillParams: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $backfillParams) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message stack }
    ... on PartitionSetNotFoundError { message }
    ... on UnauthorizedError { message }
    ... on InvalidSubsetError { message }
  }
}
"""

RUN_STATUS = """
query Run($runId: ID!) { runOrError(runId: $runId) { __typename ... on Run { status } ... on RunNotFoundError { message } } }
"""

BACKFILL = """
query Backfill($backfillId: String!) {
  partitionBackfillOrError(backfillId: $backfillId) {
    __typename
    ... on PartitionBackfill { status runs(limit: 1000) { runId status } }
    ... on BackfillNotFoundError { message }
    ... on PythonError { message }
  }
}
"""

ASSET_EDGES = "query { assetNodes { assetKey { path } dependencyKeys { path } } }"

ASSET_CHECKS = """
query { assetNodes { assetKey { path } assetChecksOrError { ... on AssetChecks { checks { name } } } } }
"""

ASSET_INSTIGATORS = """
query { assetNodes { assetKey { path } targetingInstigators { ... on Sensor { name } ... on Schedule { name } } } }
"""

AUTOMATION = """
query Automation($selector: RepositorySelector!) {
  repositoryOrError(repositorySelector: $selector) {
    ... on Repository {
      sensors { name sensorState { status } }
      schedules { name scheduleState { status } }
    }
  }
}
"""

SENSOR_TICKS = """
query Ticks($selector: SensorSelector!, $after: Float) {
  sensorOrError(sensorSelector: $selector) {
    __typename
    ... on Sensor { sensorState { ticks(afterTimestamp: $after, limit: 20) {
      status timestamp skipReason runIds error { message } } } }
    ... on SensorNotFoundError { message }
    ... on PythonError { message }
  }
}
"""
