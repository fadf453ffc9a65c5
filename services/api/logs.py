"""JSON log lines carrying the request id, with credentials masked out of every line."""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any

from services.api.security import mask_secrets

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

# LogRecord attributes that are not user-supplied `extra=` fields.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id:
            line["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        # Masking the serialised line covers the message, extras and tracebacks alike.
        return mask_secrets(json.dumps(line, default=str))


def configure_logging(level: str) -> None:
    """Send every logger (ours, uvicorn's, celery's) through one JSON handler on stderr. Idempotent; other root
    handlers (e.g. pytest's capture) are left alone."""
    root = logging.getLogger()
    if not any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # The access log middleware writes one line per request with the request id; uvicorn's would duplicate it.
    logging.getLogger("uvicorn.access").disabled = True


# Libraries that give their loggers handlers of their own when imported (MLflow does, for itself and a few others),
# so that their lines would bypass the masking JSON handler.
LIBRARY_LOGGERS = ("mlflow", "sqlalchemy.engine", "alembic", "huey")


def adopt_library_loggers() -> None:
    """Route the LIBRARY_LOGGERS back through the root's JSON handler, which masks credentials. Call it after
    importing such a library (their handlers appear on import)."""
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
