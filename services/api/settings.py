"""Settings of the API service, read from the environment (prefix INVDPO_), behind a cached `get_settings()`."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, field_validator

from invdpo_core.gate import GateRule, parse_gate_setting
from services.jobs.settings import JobSettings


class Settings(JobSettings):
    """The API's settings. Environment variables (all prefixed INVDPO_): shared with the worker (JobSettings):
    INVDPO_DATABASE_URL, INVDPO_BROKER_URL, INVDPO_MLFLOW_TRACKING_URI, INVDPO_LOG_LEVEL,
    INVDPO_HEARTBEAT_TIMEOUT_SECONDS, INVDPO_RECONCILE_AFTER_SECONDS, INVDPO_MAX_ATTEMPTS, INVDPO_VALIDATION_SAMPLE;
    the API's own:
    INVDPO_MAX_ACTIVE_JOBS_PER_PROJECT, INVDPO_RETRY_AFTER_SECONDS, INVDPO_MAX_BODY_BYTES,
    INVDPO_RECONCILE_INTERVAL_SECONDS, INVDPO_MIGRATE_ON_STARTUP, INVDPO_ALLOW_LOCAL_FILES,
    INVDPO_EVENTS_POLL_SECONDS, INVDPO_EVENTS_STREAM_MAX_SECONDS, INVDPO_PROMOTION_GATE.
    """

    max_active_jobs_per_project: int = Field(
        4, ge=1, description="Jobs a project may have validating, queued or running at once; more gets a 429."
    )
    retry_after_seconds: int = Field(60, ge=1, description="Retry-After sent with the 429 of the active-job cap.")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="Largest accepted request body; larger gets a 413.")
    reconcile_interval_seconds: float = Field(
        60.0, ge=0, description="How often the API re-dispatches jobs whose broker message was lost; 0 disables."
    )
    migrate_on_startup: bool = Field(True, description="Run `alembic upgrade head` when the API starts.")
    allow_local_files: bool = Field(
        True,
        description="Accept local paths as model and files (the embedded single-machine setup). Deployments set "
        "false: jobs must then name s3:// URIs or hub ids, and cannot probe the API host's file system.",
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
        parse_gate_setting(value)
        return value

    def gate_rule(self) -> GateRule | None:
        """The promotion gate's rule, or None when it is off."""
        return parse_gate_setting(self.promotion_gate)


@lru_cache
def get_settings() -> Settings:
    return Settings()
