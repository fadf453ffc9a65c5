"""Settings of the API service, read from the environment (prefix INVDPO_), behind a cached `get_settings()`."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from invdpo_core.gate import GateRule, parse_gate_rule


class Settings(BaseSettings):
    """The API's settings. Environment variables (all prefixed INVDPO_):

    INVDPO_DATABASE_URL, INVDPO_BROKER_URL, INVDPO_MLFLOW_TRACKING_URI, INVDPO_MAX_ACTIVE_JOBS_PER_PROJECT,
    INVDPO_RETRY_AFTER_SECONDS, INVDPO_MAX_BODY_BYTES, INVDPO_LOG_LEVEL, INVDPO_RATE_LIMIT_REQUESTS,
    INVDPO_RATE_LIMIT_WINDOW_SECONDS, INVDPO_RATE_LIMIT_REDIS_URL, INVDPO_RECONCILE_INTERVAL_SECONDS,
    INVDPO_RECONCILE_AFTER_SECONDS, INVDPO_HEARTBEAT_TIMEOUT_SECONDS, INVDPO_MAX_ATTEMPTS,
    INVDPO_MIGRATE_ON_STARTUP, INVDPO_ALLOW_LOCAL_FILES, INVDPO_VALIDATION_SAMPLE, INVDPO_VALIDATION_TIMEOUT_SECONDS,
    INVDPO_VALIDATION_MEMORY_BYTES, INVDPO_MAX_IMAGE_BYTES, INVDPO_EVENTS_POLL_SECONDS,
    INVDPO_EVENTS_STREAM_MAX_SECONDS, INVDPO_PROMOTION_GATE.
    """

    model_config = SettingsConfigDict(env_prefix="INVDPO_", extra="ignore")

    database_url: str = Field(
        "sqlite:///./invdpo.db",
        description="SQLAlchemy URL of the job database: SQLite embedded by default, postgresql+psycopg:// deployed.",
    )
    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker the training tasks are sent to.")
    mlflow_tracking_uri: str = Field(
        "sqlite:///./mlflow.db", description="MLflow tracking server; the API only passes it on, workers log to it."
    )
    max_active_jobs_per_project: int = Field(
        4, ge=1, description="Jobs a project may have validating, queued or running at once; more gets a 429."
    )
    retry_after_seconds: int = Field(60, ge=1, description="Retry-After sent with the 429 of the active-job cap.")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="Largest accepted request body; larger gets a 413.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Level of the JSON logs.")
    rate_limit_requests: int = Field(
        600, ge=0, description="Requests an API key may make per window, across all API replicas; 0 disables."
    )
    rate_limit_window_seconds: int = Field(60, ge=1, description="The rate limit's (fixed) window.")
    rate_limit_redis_url: str | None = Field(
        None, description="Redis holding the rate limit counters; default: the broker's, if it is Redis."
    )
    reconcile_interval_seconds: float = Field(
        60.0, ge=0, description="How often the API re-dispatches jobs whose broker message was lost; 0 disables."
    )
    reconcile_after_seconds: float = Field(
        120.0, gt=0, description="A queued or validating job untouched this long is a candidate for re-dispatch."
    )
    heartbeat_timeout_seconds: float = Field(
        300.0, gt=0, description="A running job whose worker has not reported for this long is presumed lost."
    )
    max_attempts: int = Field(3, ge=1, description="Worker deaths tolerated per job before it fails as worker_lost.")
    migrate_on_startup: bool = Field(True, description="Run `alembic upgrade head` when the API starts.")
    allow_local_files: bool = Field(
        True,
        description="Accept local paths as model and files (the embedded single-machine setup). Deployments set "
        "false: jobs must then name s3:// URIs or hub ids, and cannot probe the API host's file system.",
    )
    validation_sample: int = Field(8, ge=1, description="Dataset records read to check a training file.")
    validation_timeout_seconds: float = Field(
        120.0, gt=0, description="A job whose files are not checked within this long fails as validation_timeout."
    )
    validation_memory_bytes: int = Field(
        1 << 30,
        ge=256 << 20,
        description="Address-space limit of the process that checks a job's files; a dataset needing more fails "
        "its job (validation_resources) instead of the API.",
    )
    max_image_bytes: int = Field(
        32 << 20, ge=1, description="Largest image (object or parquet cell) read, by validation and by the worker."
    )
    events_poll_seconds: float = Field(1.0, gt=0, description="How often the events stream looks for new events.")
    events_stream_max_seconds: float = Field(
        600.0, gt=0, description="An events stream closes after this long; clients reconnect with Last-Event-ID."
    )
    promotion_gate: str = Field(
        '{"min_implicit_acc_lower": 0.5}',
        description="The rule POST /v1/models/{name}/promote checks on the job's evaluation, as JSON with the fields "
        "of invdpo_core/gate.py GateRule (min_implicit_acc_lower, win_rate_scorer, min_win_rate); none turns the "
        "gate off. A request with force: true promotes anyway, recorded as a tag on the model version.",
    )

    @field_validator("promotion_gate")
    @classmethod
    def _check_gate(cls, value: str) -> str:
        _gate_rule(value)
        return value

    def gate_rule(self) -> GateRule | None:
        """The promotion gate's rule, or None when it is off."""
        return _gate_rule(self.promotion_gate)


def _gate_rule(value: str) -> GateRule | None:
    if value.strip().lower() == "none":
        return None
    data = json.loads(value)  # a JSONDecodeError is a ValueError: pydantic reports it against the field
    if not isinstance(data, dict):
        raise ValueError("must be a JSON object or none")
    return parse_gate_rule(data)


@lru_cache
def get_settings() -> Settings:
    return Settings()
