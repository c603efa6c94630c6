"""The app factory uvicorn imports in each worker (``serving.asgi:create``), with JSON logs."""

from __future__ import annotations

import json
import logging
import sys


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any ``extra`` fields (request_id, ...)."""

    RESERVED = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update({k: v for k, v in record.__dict__.items() if k not in self.RESERVED})
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("keel", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False
    logging.Formatter.converter = __import__("time").gmtime


def create():
    """Build the app from the KEEL_* and KEEL_SERVE_* environment (uvicorn ``factory=True``)."""
    from keel.config import ServingSettings, Settings
    from serving import build_app

    configure_logging()
    settings = Settings.from_env()
    inference_log = None
    try:
        from keel.inference_log.writer import InferenceLogWriter
    except ImportError:
        InferenceLogWriter = None  # noqa: N806
    if InferenceLogWriter is not None:
        inference_log = InferenceLogWriter.from_settings(settings)
    return build_app(settings, ServingSettings.from_env(), inference_log=inference_log)
