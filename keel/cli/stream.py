"""``keel stream`` (the Kafka stream worker) and ``keel generate --to-kafka`` (demo events in real time)."""

from __future__ import annotations

import logging
import signal
import sys
import threading

from keel.config import ConfigError, Settings


def add_commands(sub) -> None:
    p = sub.add_parser(
        "stream",
        help="consume the sources' Kafka topics: validate, update the online store, append to the raw tables",
    )
    p.add_argument("--group-id", default="keel-stream", help="Kafka consumer group (default keel-stream)")
    p.add_argument(
        "--batch-seconds", type=float, default=5.0, help="append to the raw tables at least this often (default 5)"
    )
    p.add_argument("--batch-rows", type=int, default=10_000, help="... or when this many events wait (default 10000)")
    p.add_argument(
        "--metrics-port", type=int, default=9464, help="Prometheus metrics on this port (default 9464, 0 = off)"
    )
    p.add_argument(
        "--session-timeout-ms",
        type=int,
        default=10_000,
        help="consumer group session timeout (default 10000; 1000 makes group joins on tansu take ~1 s)",
    )
    p.add_argument("--source", action="append", help="only this source (repeatable); default every source with a topic")
    p.add_argument("--log-every", type=float, default=10.0, help="seconds between progress lines (default 10)")
    p.set_defaults(func=cmd_stream)


def kafka_bootstrap(settings: Settings, what: str) -> str:
    if not settings.kafka_bootstrap:
        raise ConfigError(
            f"{what} needs Kafka: KEEL_KAFKA_BOOTSTRAP is not set (export KEEL_KAFKA_BOOTSTRAP=host:9092, "
            "comma-separated for several brokers)"
        )
    return settings.kafka_bootstrap


def cmd_stream(args) -> int:
    from keel.project import load_project
    from keel.stream.worker import StreamWorker
    from keel.stream.worker_config import StreamConfig, StreamError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)  # its INFO lines narrate every connection
    settings = Settings.from_env()
    kafka_bootstrap(settings, "keel stream")
    config = StreamConfig(
        group_id=args.group_id,
        batch_seconds=args.batch_seconds,
        batch_rows=args.batch_rows,
        metrics_port=args.metrics_port,
        session_timeout_ms=args.session_timeout_ms,
        sources=tuple(args.source or ()),
        log_every=args.log_every,
    )
    try:
        worker = StreamWorker(settings, load_project(settings.project), config)
        worker.run(install_signals=True)
    except StreamError as exc:
        print(f"keel stream: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_generate_kafka(args) -> int:
    from keel.project import load_project
    from keel.stream.producer import EventProducer, ProducerError

    settings = Settings.from_env()
    bootstrap = kafka_bootstrap(settings, "keel generate --to-kafka")
    project = load_project(settings.project)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        producer = EventProducer(bootstrap, project.sources, users=args.users, seed=args.seed, bad_every=args.bad_every)
        with producer:
            topics = ", ".join(s.kafka_topic for s in producer.sources)
            until = f"for {args.seconds:g}s" if args.seconds else "until Ctrl-C"
            print(f"producing {args.rate:g} events/s to {topics} at {bootstrap} {until}", flush=True)
            report = producer.run(
                args.rate, args.seconds, stop=stop, progress=lambda r: print(f"  {r.summary()}", flush=True)
            )
    except ProducerError as exc:
        print(f"keel generate: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0
