"""``python -m keel.devservers``: Redis and tansu until Ctrl-C, with the variables that point Keel at them."""

import time

from keel.devservers import KafkaBroker, RedisServer


def main() -> None:
    """Run Redis and tansu until Ctrl-C, printing the variables that point Keel at them."""
    import signal

    with RedisServer() as redis, KafkaBroker() as kafka:
        print(f"export KEEL_REDIS_URL={redis.url} KEEL_KAFKA_BOOTSTRAP={kafka.bootstrap}", flush=True)
        print("# Redis and tansu (in-memory) are running; Ctrl-C stops both", flush=True)
        stop = False

        def finish(*_):
            nonlocal stop
            stop = True

        signal.signal(signal.SIGTERM, finish)
        try:
            while not stop and redis.process.poll() is None and kafka.process.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
