"""The demo's runs, launched through Dagster as a person would and read back from the instance.

Every run goes through ``dagster dev`` (pipelines.dagster_service): queued, launched by the
daemon one run per table at a time, shown on the Overview timeline and on its job's page.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import dagster as dg

from keel.ingest.landing_folder import version_prefix
from pipelines.dagster_service import DagsterService

# Dagster's run tags for a single run over a partition range (BackfillPolicy.single_run()).
RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"
RUN_TIMEOUT_S = 900
RUN_KEY = "dagster/run_key"


@dataclass
class RunOutcome:
    """A finished run: its status, its materializations by asset (metadata values) and its checks."""

    run_id: str
    status: str
    materializations: dict[str, list[dict]] = field(default_factory=dict)
    checks: list[dg.AssetCheckEvaluation] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return self.status == "SUCCESS"

    def metadata(self, asset: str) -> dict:
        """The metadata of the asset's last materialization in the run ({} when it has none)."""
        found = self.materializations.get(asset, [])
        return found[-1] if found else {}


class DemoRuns:
    def __init__(self, dagster: DagsterService, instance: dg.DagsterInstance) -> None:
        self.dagster = dagster
        self.instance = instance

    def job(
        self,
        name: str,
        *,
        span: tuple[dt.date, dt.date] | None = None,
        partition: dt.date | None = None,
        config: Mapping | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> RunOutcome:
        """Launch ``name`` (over a partition range as one run, or one partition), wait, print how it went."""
        run_tags = dict(tags or {})
        if span:
            run_tags |= {RANGE_START: span[0].isoformat(), RANGE_END: span[1].isoformat()}
        if partition:
            run_tags["dagster/partition"] = partition.isoformat()
        t = time.perf_counter()
        run_id = self.dagster.launch_job(name, tags=run_tags, run_config=config)
        return self.wait(run_id, t)

    def wait(self, run_id: str, started: float | None = None) -> RunOutcome:
        t = started if started is not None else time.perf_counter()
        status = self.dagster.wait_for_runs([run_id], timeout_s=RUN_TIMEOUT_S)[run_id]
        word = "published" if status == "SUCCESS" else status
        print(f"{word} in {time.perf_counter() - t:.1f}s (run {run_id[:8]})", flush=True)
        return self.outcome(run_id)

    def outcome(self, run_id: str) -> RunOutcome:
        run = self.instance.get_run_by_id(run_id)
        out = RunOutcome(run_id, run.status.value if run else "UNKNOWN")
        for entry in self.instance.all_logs(run_id):
            event = entry.dagster_event
            if event is None:
                continue
            if event.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION:
                m = event.step_materialization_data.materialization
                values = {k: v.value for k, v in m.metadata.items()}
                out.materializations.setdefault(m.asset_key.to_user_string(), []).append(values)
            elif event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION:
                out.checks.append(event.event_specific_data)
        return out

    def runs_tagged(self, key: str, value: str) -> list[dg.DagsterRun]:
        return list(self.instance.get_runs(filters=dg.RunsFilter(tags={key: value})))

    def wait_for_files(self, files: Iterable[str], timeout_s: float = RUN_TIMEOUT_S) -> dict[str, RunOutcome]:
        """Each landing file's successful ingest run, launched by the landing_files sensor.

        A file whose run failed is retried by the sensor; it counts as landed once a run succeeds.
        """
        waiting, landed = set(map(str, files)), {}
        prefixes = {path: version_prefix(path) for path in waiting}
        deadline = time.monotonic() + timeout_s
        while waiting:
            for path in sorted(waiting):
                # Runs of the file as it is now: an earlier demo's runs of the same path do not count.
                done = [
                    r
                    for r in self.runs_tagged("keel/file", path)
                    if r.status == dg.DagsterRunStatus.SUCCESS and r.tags.get(RUN_KEY, "").startswith(prefixes[path])
                ]
                if done:
                    landed[path] = self.outcome(done[0].run_id)
            waiting -= set(landed)
            if waiting and time.monotonic() > deadline:
                states = {
                    p: [r.status.value for r in self.runs_tagged("keel/file", p)] or ["no run yet"] for p in waiting
                }
                raise TimeoutError(f"files not landed after {timeout_s:.0f}s: {states}")
            if waiting:
                time.sleep(1)
        return landed

    def tick_after(self, sensor: str, *, launched: float, finished: float, timeout_s: float) -> dict | None:
        """What the sensor made of a run that started at ``launched`` and ended at ``finished``
        (timestamps): its first tick since the start that requested runs, else its first finished
        tick after the end (its skip reason says why it requested none). None after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ticks = [t for t in self.dagster.sensor_ticks(sensor, launched) if t["status"] != "STARTED"]
            fired = [t for t in ticks if t["runIds"]]
            later = [t for t in ticks if t["timestamp"] >= finished]
            if fired or later:
                return (fired or later)[0]
            time.sleep(1)
        return None
