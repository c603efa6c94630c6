"""``keel serve``: the serving process (serving/) on uvicorn."""

from __future__ import annotations

import os
import sys
import tempfile


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="serve the champions (and challengers) of the registered models over HTTP")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="worker processes (each loads every model)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    import uvicorn

    from keel.config import ConfigError, ServingSettings

    if args.workers < 1:
        print(f"keel serve: --workers {args.workers} must be at least 1", file=sys.stderr)
        return 2
    try:
        ServingSettings.from_env()
    except ConfigError as exc:
        print(f"keel serve: {exc}", file=sys.stderr)
        return 2
    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Each worker writes its metrics here, and /metrics adds them up.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="keel-metrics-")
    # One thread per worker for NumPy/XGBoost: a request is one small predict, and threads of
    # several workers competing for 2 cores cost more than they give (see STYLE.md).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    uvicorn.run(
        "serving.asgi:create",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=10,
    )
    return 0
