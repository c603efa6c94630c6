"""The stream worker's settings (``StreamConfig``, checked before it starts) and its error."""

from __future__ import annotations

from dataclasses import dataclass, field

from keel.dsl import EventSource
from keel.project import Project


class StreamError(RuntimeError):
    """The stream worker cannot run as configured; the message says why and the fix."""


@dataclass(frozen=True)
class StreamConfig:
    group_id: str = "keel-stream"
    batch_seconds: float = 5.0
    batch_rows: int = 10_000
    metrics_port: int = 9464
    # tansu completes a group join after about half of this (see keel.devservers); Kafka does not wait on it.
    session_timeout_ms: int = 10_000
    sources: tuple[str, ...] = ()
    log_every: float = 10.0
    poll_ms: int = 100
    max_poll_records: int = 20000
    # Event ids remembered to refuse a repeated one (beyond one poll, where validation catches it).
    dedup_events: int = 200_000
    online: bool = True
    consumer_options: dict = field(default_factory=dict)

    def check(self) -> None:
        problems = []
        if not self.group_id:
            problems.append("group_id is empty (give e.g. --group-id keel-stream)")
        if self.batch_seconds <= 0:
            problems.append(f"batch_seconds={self.batch_seconds} must be positive (e.g. 5)")
        if self.batch_rows < 1:
            problems.append(f"batch_rows={self.batch_rows} must be at least 1 (e.g. 10000)")
        if not 0 <= self.metrics_port <= 65535:
            problems.append(f"metrics_port={self.metrics_port} is not a port (0 turns metrics off)")
        if self.session_timeout_ms < 500:
            problems.append(f"session_timeout_ms={self.session_timeout_ms} is below 500")
        if problems:
            raise StreamError("stream worker settings: " + "; ".join(problems))

    def streamed_sources(self, project: Project) -> dict[str, EventSource]:
        """The project's sources to stream, by Kafka topic: those named in ``sources`` (all with a topic if none)."""
        with_topics = [s for s in project.sources if s.kafka_topic]
        if self.sources:
            unknown = sorted(set(self.sources) - {s.name for s in with_topics})
            if unknown:
                raise StreamError(
                    f"sources {unknown} have no kafka_topic in project {project.name!r} "
                    f"(sources with topics: {', '.join(s.name for s in with_topics) or 'none'})"
                )
            with_topics = [s for s in with_topics if s.name in self.sources]
        if not with_topics:
            raise StreamError(
                f"project {project.name!r} declares no event source with a kafka_topic; "
                "set kafka_topic='...' on the sources to stream"
            )
        return {s.kafka_topic: s for s in with_topics}
