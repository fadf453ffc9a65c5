"""Settings the API and the worker share (environment prefix INVDPO_): each service's `Settings` extends this."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class JobSettings(BaseSettings):
    """Environment variables (all prefixed INVDPO_): INVDPO_DATABASE_URL, INVDPO_BROKER_URL,
    INVDPO_MLFLOW_TRACKING_URI, INVDPO_LOG_LEVEL, INVDPO_HEARTBEAT_TIMEOUT_SECONDS, INVDPO_RECONCILE_AFTER_SECONDS,
    INVDPO_MAX_ATTEMPTS, INVDPO_VALIDATION_SAMPLE."""

    model_config = SettingsConfigDict(env_prefix="INVDPO_", extra="ignore")

    database_url: str = Field(
        "sqlite:///./invdpo.db",
        description="SQLAlchemy URL of the job database: SQLite embedded by default, postgresql+psycopg:// deployed.",
    )
    broker_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Celery broker: the API sends training tasks, workers consume them."
    )
    mlflow_tracking_uri: str = Field(
        "sqlite:///./mlflow.db", description="MLflow tracking server and registry (workers log to it)."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Level of the JSON logs.")
    heartbeat_timeout_seconds: float = Field(
        300.0,
        gt=0,
        description="A running job whose worker has not reported for this long is presumed lost: the reconciler "
        "re-sends it and another worker may claim it. Several times the worker's heartbeat_interval_seconds.",
    )
    reconcile_after_seconds: float = Field(
        120.0, gt=0, description="A queued or validating job untouched this long is a candidate for re-dispatch."
    )
    max_attempts: int = Field(3, ge=1, description="Worker deaths tolerated per job before it fails as worker_lost.")
    validation_sample: int = Field(8, ge=1, description="Dataset records read to check a training file.")
