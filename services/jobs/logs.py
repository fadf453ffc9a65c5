"""JSON log lines carrying the request id, with credentials masked out of every line (`mask_secrets`, also used on
user-facing errors and stored events)."""

from __future__ import annotations

import json
import logging
import re
import sys
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any

# API keys look like invdpo-<8 hex>-<secret> (services/api/security.py makes them); the secret part is masked.
KEY_PREFIX = "invdpo"

# Each pattern keeps its first group and replaces the secret after it with ***.
_SECRET_PATTERNS = [
    # scheme://user:password@host (database, broker and S3 URLs)
    re.compile(r"([a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*:)[^@/\s]+(?=@)"),
    # signed URLs and query-string credentials
    re.compile(
        r"(?i)([?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|signature|sig|token|access_token"
        r"|password|secret|api_key|apikey|key)=)[^&\s\"']+"
    ),
    # key=value / key: value in messages and reprs (aws_secret_access_key, password, token, ...)
    re.compile(
        r"(?i)((?:aws_secret_access_key|aws_session_token|secret_access_key|secret|password|passwd|token"
        r"|authorization)[\"']?\s*[=:]\s*[\"']?(?:bearer\s+)?)[^\s\"',;&}]+"
    ),
    re.compile(r"(?i)(bearer\s+)[^\s\"',;]+"),
    # AWS access key ids and our own API keys
    re.compile(r"((?:AKIA|ASIA))[0-9A-Z]{16}"),
    re.compile(rf"({KEY_PREFIX}-[0-9a-f]{{8}}-)[A-Za-z0-9_\-]+"),
]


# Every pattern above needs one of these (lower-cased); most log lines have none, and skip the regexes.
_TRIGGERS = ("@", "=", "secret", "passw", "token", "authorization", "bearer", "akia", "asia", f"{KEY_PREFIX}-")


def mask_secrets(text: str) -> str:
    """`text` with every credential-looking value replaced by ***; used on log lines and user-facing errors."""
    lowered = text.lower()
    if not any(trigger in lowered for trigger in _TRIGGERS):
        return text
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(r"\1***", text)
    return text


def has_credentials(uri: str) -> bool:
    """True if `uri` embeds a password (scheme://user:pass@host): workers bring their own credentials."""
    return bool(_SECRET_PATTERNS[0].search(uri)) or bool(_SECRET_PATTERNS[1].search(uri))


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
