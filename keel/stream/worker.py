"""The stream worker: Kafka topics of the declared sources -> online store (fresh) and raw Iceberg tables.

One worker process consumes every source topic in a consumer group (events are keyed by
entity, so an entity's events arrive in order on one partition). Per poll it validates the
events as a batch ingest would; a bad event goes to the quarantine table with its reason,
``kafka://<topic>/<partition>`` as file and its offset as row. Good events update the
group's windowed features incrementally (``keel.stream.state.StreamFeatures``, the offline
point-in-time definition) and the online store at once, and wait in a micro-batch that is
appended to the source's raw table every ``batch_seconds`` or ``batch_rows``.

Exactly once: each append records the next offsets to read in the same Iceberg commit
(``keel.stream.kafka_io``). At start, and when partitions are assigned, the worker reads from
those offsets (Kafka's committed offset only where Iceberg has none; the earliest
otherwise) after rebuilding its feature state from the raw tables, so a SIGKILL loses
nothing: what was not appended is read again. Kafka offsets are committed after the append,
for monitoring (consumer lag) and as the fallback. SIGTERM/SIGINT stop polling, append what
waits, commit, leave the group.

Settings and errors: ``keel.stream.worker_config``; re-sent events: ``keel.stream.resent``;
micro-batches and their append: ``keel.stream.micro_batch``; Prometheus metrics
(``metrics_port``): ``keel.stream.metrics``.
"""

from __future__ import annotations

import datetime as dt
import logging
import signal
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
from kafka import ConsumerRebalanceListener
from pyiceberg.expressions import GreaterThan

from keel.config import ConfigError, Settings
from keel.dsl import EventSource
from keel.lakehouse.tables import Lakehouse
from keel.project import Project
from keel.stream.consumer import commit_offsets, open_consumer, report_lag, total_lag
from keel.stream.kafka_io import OFFSET, PARTITION, EventValidator, recorded_offsets
from keel.stream.metrics import StreamMetrics
from keel.stream.micro_batch import Pending, append_pending
from keel.stream.resent import RecentIds
from keel.stream.worker_config import StreamConfig

log = logging.getLogger(__name__)


class StreamWorker:
    """Consumes the project's source topics; see the module docstring for what it guarantees."""

    def __init__(self, settings: Settings, project: Project, config: StreamConfig | None = None) -> None:
        self.config = config = config or StreamConfig()
        config.check()
        if not settings.kafka_bootstrap:
            raise ConfigError(
                "the stream worker needs Kafka: KEEL_KAFKA_BOOTSTRAP is not set "
                "(export KEEL_KAFKA_BOOTSTRAP=host:9092, comma-separated for several brokers)"
            )
        self.settings = settings
        self.project = project
        self.sources: dict[str, EventSource] = config.streamed_sources(project)
        self.run_id = f"stream-{config.group_id}-{uuid.uuid4().hex[:8]}"
        self.lake = Lakehouse.from_settings(settings)
        for source in self.sources.values():
            self.lake.ensure_table(source.table_name, source.arrow_schema(), day_column=source.timestamp)
        self.validators = {topic: EventValidator(source) for topic, source in self.sources.items()}
        self.pending = {topic: Pending() for topic in self.sources}
        self.offsets = {topic: {} for topic in self.sources}  # next offset recorded in Iceberg, per partition
        self.recent = RecentIds(config.dedup_events)
        self.metrics = StreamMetrics()
        self.features, self.store, self.groups = None, None, {}
        groups = [g for g in project.feature_groups if g.online]
        if config.online and groups:
            from keel.online.store import OnlineStore
            from keel.stream.state import StreamFeatures

            self.groups = {g.name: g for g in groups}
            self.features = StreamFeatures(groups)
            self.store = OnlineStore.from_settings(settings)
        self.consumer = None
        self.assigned: set = set()
        self._to_place: set = set()
        self._rewarm = False
        self._stop = threading.Event()
        self._last_flush = time.monotonic()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keel-append")
        self._checkers = ThreadPoolExecutor(max_workers=len(self.sources), thread_name_prefix="keel-check")
        self._inflight: Future | None = None
        self._metrics_server = None
        self.counts = {
            "consumed": 0,
            "valid": 0,
            "dead_lettered": 0,
            "unchanged": 0,
            "replaced": 0,
            "written": 0,
            "flushes": 0,
        }

    # lifecycle

    def stop(self) -> None:
        """Ask the worker to finish: it appends what waits, commits and returns from ``run``."""
        self._stop.set()

    def run(self, *, install_signals: bool = False, ready: threading.Event | None = None) -> None:
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        if self.config.metrics_port:
            self._metrics_server = self.metrics.serve(self.config.metrics_port)
        self._warm()
        self.consumer = open_consumer(self.settings.kafka_bootstrap, self.config, self.run_id, self.sources)
        topics = sorted(self.sources)
        self.consumer.subscribe(topics, listener=_Listener(self))
        log.info(
            "stream worker %s: group %r, topics %s, batches every %gs or %d rows%s",
            self.run_id,
            self.config.group_id,
            ", ".join(topics),
            self.config.batch_seconds,
            self.config.batch_rows,
            f", metrics on :{self.config.metrics_port}" if self.config.metrics_port else "",
        )
        next_log = time.monotonic() + self.config.log_every
        last_counts = dict(self.counts)
        try:
            while not self._stop.is_set():
                polled = self.consumer.poll(timeout_ms=self.config.poll_ms, max_records=self.config.max_poll_records)
                if self._to_place:
                    self._place()
                if polled:
                    self.process(polled)
                self._finish_flush()
                report_lag(self.consumer, self.assigned, self.metrics.lag)
                waiting = sum(p.rows for p in self.pending.values())
                if (
                    waiting >= self.config.batch_rows
                    or time.monotonic() - self._last_flush >= self.config.batch_seconds
                ):
                    self._start_flush()
                if ready is not None and self.assigned and not self._to_place:
                    ready.set()
                if time.monotonic() >= next_log:
                    self._log_progress(last_counts)
                    last_counts = dict(self.counts)
                    next_log += self.config.log_every
            self.flush()
        finally:
            self._close()
        log.info(
            "stream worker %s stopped: %d consumed, %d valid, %d dead-lettered, %d rows appended",
            self.run_id,
            self.counts["consumed"],
            self.counts["valid"],
            self.counts["dead_lettered"],
            self.counts["written"],
        )

    def _close(self) -> None:
        # An append still running finishes (its offsets then count); one that failed is not retried here.
        self._writer.shutdown(wait=True)
        self._checkers.shutdown(wait=True)
        if self.consumer is not None:
            commit_offsets(self.consumer, self.offsets, self.sources)
            # The listener's revoke on close finds nothing left to append.
            self.consumer.close(autocommit=False)
            self.consumer = None
        if self.store is not None:
            self.store.close()
        for validator in self.validators.values():
            validator.close()
        if self._metrics_server is not None:
            server, thread = self._metrics_server
            server.shutdown()
            thread.join(5)
            self._metrics_server = None

    # state

    def _warm(self) -> None:
        """Rebuild the feature state from the raw tables, and remember their recent event ids."""
        if self.features is not None:
            from keel.stream.state import StreamFeatures

            self.features = StreamFeatures(list(self.groups.values()))
        now = dt.datetime.now(dt.UTC)
        t0 = time.perf_counter()
        rows = 0
        needed = set(self.features.sources) if self.features is not None else set()
        for source in self.project.sources:
            in_stream = source.kafka_topic in self.sources
            if source.name not in needed and not (in_stream and source.event_id):
                continue
            if not self.lake.exists(source.table_name):
                continue
            lookback = self.features.lookback(source.name) if source.name in needed else dt.timedelta(hours=1)
            row_filter = GreaterThan(source.timestamp, (now - lookback).isoformat()) if lookback is not None else None
            history = self.lake.read(source.table_name, row_filter=row_filter)
            rows += history.num_rows
            if source.name in needed:
                self.features.warm(source.name, history)
            if in_stream and source.event_id and history.num_rows:
                recent = history.sort_by(source.timestamp).slice(max(0, history.num_rows - self.config.dedup_events))
                self.recent.add(source, recent, source.table_name)
        log.info("warmed from %d raw rows in %.2fs", rows, time.perf_counter() - t0)

    def _place(self) -> None:
        """Start newly assigned partitions at the offsets Iceberg records (after appending what waits)."""
        from kafka import TopicPartition

        self._finish_flush(block=True)  # the offsets recorded in Iceberg include the running append
        tps = sorted(self._to_place)
        self._to_place = set()
        if self._rewarm:
            # What this worker still buffers goes to Iceberg first, so the rebuilt state has it too.
            self._rewarm = False
            self.flush()
            self._warm()
        for topic in {tp.topic for tp in tps}:
            self.offsets[topic] = recorded_offsets(self.lake.table(self.sources[topic].table_name), topic)
        placed = []
        for tp in tps:
            offset = self.offsets[tp.topic].get(tp.partition)
            if offset is not None:
                self.consumer.seek(TopicPartition(tp.topic, tp.partition), offset)
                placed.append(f"{tp.topic}/{tp.partition}@{offset}")
        self.consumer.resume(*tps)
        log.info("assigned %d partition(s); from Iceberg offsets: %s", len(tps), ", ".join(placed) or "none (Kafka's)")

    # the work

    def process(self, polled: dict) -> None:
        """Validate a poll's records, dead-letter the bad ones, update online features, buffer the rest."""
        now = dt.datetime.now(dt.UTC)
        by_topic: dict[str, dict[int, tuple[list[int], list[str]]]] = {}
        for tp, records in polled.items():
            if tp.topic not in self.sources or not records:
                continue
            offsets = [r.offset for r in records]
            lines = [r.value.decode("utf-8", "replace") if r.value is not None else "" for r in records]
            by_topic.setdefault(tp.topic, {})[tp.partition] = (offsets, lines)
        fresh: dict[str, pa.Table] = {}
        # Each topic's validator has its own DuckDB connection, and DuckDB runs without the GIL: check topics at once.
        checked = dict(
            zip(
                by_topic,
                self._checkers.map(lambda t: self.validators[t].validate(by_topic[t], now, self.run_id), by_topic),
                strict=True,
            )
        )
        for topic, records in by_topic.items():
            source = self.sources[topic]
            good, bad, digests = checked[topic]
            pending = self.pending[topic]
            resent = self.recent.settle(source, good, digests, self.run_id)
            good = resent.fresh
            if resent.refused is not None:
                bad = pa.concat_tables([bad, resent.refused]).sort_by(
                    [("file", "ascending"), ("row_number", "ascending")]
                )
            if resent.unchanged:
                self.counts["unchanged"] += resent.unchanged
                self.metrics.events.labels(source.name, "unchanged").inc(resent.unchanged)
            pending.corrections.update(resent.corrections)
            if resent.corrections:
                self.counts["replaced"] += len(resent.corrections)
                self.metrics.events.labels(source.name, "replaced").inc(len(resent.corrections))
            for partition, (offsets, _) in records.items():
                pending.first_offsets.setdefault(partition, offsets[0])
                pending.next_offsets[partition] = offsets[-1] + 1
            consumed = sum(len(o) for o, _ in records.values())
            self.counts["consumed"] += consumed
            self.counts["valid"] += good.num_rows
            self.counts["dead_lettered"] += bad.num_rows
            self.metrics.events.labels(source.name, "consumed").inc(consumed)
            self.metrics.events.labels(source.name, "valid").inc(good.num_rows)
            self.metrics.events.labels(source.name, "dead_lettered").inc(bad.num_rows)
            if bad.num_rows:
                pending.bad.append(bad)
                for row in bad.slice(0, 3).to_pylist():
                    log.warning(
                        "dead-lettered %s row %d: [%s] %s",
                        row["file"],
                        row["row_number"],
                        row["reason_code"],
                        row["reason"],
                    )
            if good.num_rows:
                pending.good.append(good)
                pending.rows += good.num_rows
                # A correction reaches the online store once its old copy has left the raw table
                # (``_apply_corrections``): the feature state cannot take an event back.
                if resent.corrections:
                    good = good.filter(pc.invert(pc.is_in(good[source.event_id], pa.array(list(resent.corrections)))))
                fresh[source.name] = good
        if self.features is not None and fresh:
            self._update_online(fresh)

    def _update_online(self, fresh: dict[str, pa.Table]) -> None:
        for name, good in fresh.items():
            if name in self.features.sources:
                self.features.add(name, good.drop_columns([PARTITION, OFFSET]))
        for group_name, rows in self.features.updates().items():
            if rows.num_rows:
                self.store.write(self.groups[group_name], rows)
        done = time.time()
        for name, good in fresh.items():
            source = next(s for s in self.sources.values() if s.name == name)
            if name not in self.features.sources:
                continue
            event_us = pc.cast(good[source.timestamp], pa.int64()).to_numpy()
            child = self.metrics.latency.labels(name)
            for seconds in (done - event_us / 1e6).tolist():
                child.observe(seconds)

    def flush(self) -> None:
        """Append every topic's micro-batch now (dead letters first), then commit the offsets to Kafka."""
        self._finish_flush(block=True)
        self._start_flush()
        self._finish_flush(block=True)

    def _start_flush(self) -> None:
        """Hand the waiting micro-batches to the writer thread, unless an append is still running.

        The main loop keeps polling and updating the online store while Iceberg commits; Kafka
        offsets are committed by the main loop once the append is done (``_finish_flush``).
        """
        if self._inflight is not None:
            return
        self._last_flush = time.monotonic()
        batches = {topic: pending for topic, pending in self.pending.items() if not pending.empty()}
        if not batches:
            return
        for topic in batches:
            self.pending[topic] = Pending()
        self._inflight = self._writer.submit(self._append, batches)

    def _finish_flush(self, *, block: bool = False) -> None:
        """Once the running append is done: commit its offsets to Kafka and evict old feature state."""
        if self._inflight is None or (not block and not self._inflight.done()):
            return
        done, self._inflight = self._inflight, None
        flushed, corrected = done.result()  # an append that failed stops the worker here; a restart replays it
        if flushed and self.consumer is not None:
            commit_offsets(self.consumer, self.offsets, flushed)
        if self.features is not None and flushed:
            self.features.evict(dt.datetime.now(dt.UTC))
        if self.features is not None and corrected:
            self._apply_corrections(corrected)

    def _apply_corrections(self, corrected: dict[str, pa.Table]) -> None:
        """Corrections are in the raw tables and their old copies gone; the feature state cannot take
        an event back, so it is rebuilt from the tables (as at start) and the corrected entities'
        values are written to the online store."""
        self.flush()  # what waits goes to Iceberg first, so the rebuilt state has it too
        self._warm()
        for name, keys in corrected.items():
            if name in self.features.sources:
                self.features.touch(name, keys.drop_columns(["_replaced_ts"]), keys["_replaced_ts"])
        for group_name, rows in self.features.updates().items():
            if rows.num_rows:
                self.store.write(self.groups[group_name], rows)
        log.info("corrections applied: %s", ", ".join(f"{n} {k.num_rows}" for n, k in corrected.items()))

    def _append(self, batches: dict[str, Pending]) -> tuple[list[str], dict[str, pa.Table]]:
        """Writer thread: append each topic's batch with its offsets in the same Iceberg commit; a
        corrected event's old copy leaves the table in that commit. Returns the topics flushed and,
        per source, the keys of the entities corrections changed."""
        flushed, corrected = [], {}
        for topic, pending in batches.items():
            source = self.sources[topic]
            t0 = time.perf_counter()
            result, fixed = append_pending(self.lake, source, pending, self.run_id)
            if fixed is not None:
                corrected[source.name] = fixed
            elapsed = time.perf_counter() - t0
            self.metrics.write.labels(source.name).observe(elapsed)
            self.metrics.rows.labels(source.name).inc(result.rows)
            self.offsets[topic] = result.offsets
            self.counts["written"] += result.rows
            self.counts["flushes"] += 1
            if result.skipped:
                log.warning(
                    "%s: %d event(s) already in the table (written before a restart or by another worker) not appended again",
                    source.table_name,
                    result.skipped,
                )
            log.debug(
                "%s: appended %d rows in %.3fs (snapshot %s)",
                source.table_name,
                result.rows,
                elapsed,
                result.snapshot_id,
            )
            flushed.append(topic)
        return flushed, corrected

    def _log_progress(self, before: dict) -> None:
        every = self.config.log_every
        rate = (self.counts["consumed"] - before["consumed"]) / every
        lag = total_lag(self.consumer, self.assigned)
        log.info(
            "%d consumed (%.0f/s), %d valid, %d dead-lettered, %d appended in %d batches; lag %d",
            self.counts["consumed"],
            rate,
            self.counts["valid"],
            self.counts["dead_lettered"],
            self.counts["written"],
            self.counts["flushes"],
            lag,
        )


class _Listener(ConsumerRebalanceListener):
    """Rebalance callbacks; they run on the consumer's network loop, so they do no Kafka calls."""

    def __init__(self, worker: StreamWorker) -> None:
        self.worker = worker

    def on_partitions_revoked(self, revoked) -> None:
        worker = self.worker
        if revoked and any(not p.empty() for p in worker.pending.values()):
            # The next owner starts at the offsets Iceberg records: append what waits first.
            consumer, worker.consumer = worker.consumer, None
            try:
                worker.flush()
            finally:
                worker.consumer = consumer
        worker.assigned -= set(revoked)

    def on_partitions_assigned(self, assigned) -> None:
        worker = self.worker
        new = set(assigned) - worker.assigned
        if not new:
            return
        if worker.assigned or worker.counts["consumed"]:
            # Entities of partitions another worker owned until now: their state is in the raw tables.
            worker._rewarm = worker.features is not None
        worker.assigned |= set(assigned)
        # Positions are set in the main loop (Iceberg reads block); until then nothing is fetched.
        worker.consumer.pause(*new)
        worker._to_place |= new

    def on_partitions_lost(self, lost) -> None:
        self.worker.assigned -= set(lost)
