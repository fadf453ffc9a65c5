"""Settings of the API service, read from the environment (prefix INVDPO_), behind a cached `get_settings()`."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field

from services.jobs.settings import JobSettings


class Settings(JobSettings):
    """The API's settings. Environment variables (all prefixed INVDPO_): shared with the worker (JobSettings):
    INVDPO_DATABASE_URL, INVDPO_BROKER_URL, INVDPO_MLFLOW_TRACKING_URI, INVDPO_LOG_LEVEL,
    INVDPO_HEARTBEAT_TIMEOUT_SECONDS, INVDPO_RECONCILE_AFTER_SECONDS, INVDPO_MAX_ATTEMPTS, INVDPO_VALIDATION_SAMPLE,
    INVDPO_MAX_RUNTIME_SECONDS, INVDPO_PROMOTION_GATE, INVDPO_VALIDATION_TIMEOUT_SECONDS,
    INVDPO_VALIDATION_MEMORY_BYTES, INVDPO_ALLOW_LOCAL_FILES, INVDPO_MAX_IMAGE_BYTES; the API's own:
    INVDPO_MAX_ACTIVE_JOBS_PER_PROJECT, INVDPO_MAX_GPU_HOURS_PER_PROJECT, INVDPO_RETRY_AFTER_SECONDS,
    INVDPO_MAX_BODY_BYTES, INVDPO_RATE_LIMIT_REQUESTS, INVDPO_RATE_LIMIT_WINDOW_SECONDS, INVDPO_RATE_LIMIT_REDIS_URL,
    INVDPO_RECONCILE_INTERVAL_SECONDS, INVDPO_MIGRATE_ON_STARTUP, INVDPO_EVENTS_POLL_SECONDS,
    INVDPO_EVENTS_STREAM_MAX_SECONDS, INVDPO_MAX_NODES_PER_JOB.
    """

    max_active_jobs_per_project: int = Field(
        4,
        ge=1,
        description="Jobs a project may have validating, queued or running at once; more gets a 429. A project's "
        "own limit (invdpo-admin set-limits) replaces it.",
    )
    max_gpu_hours_per_project: float = Field(
        1344.0,
        ge=0,
        description="GPU-hours a project's active jobs may ask for together (each nodes x gpus_per_node x "
        "max_runtime_seconds; 1344 = 8 GPUs for 7 days): a job that would pass it gets a 429, one that asks for more "
        "alone a 422. 0 disables. A project's own limit (invdpo-admin set-limits) replaces it.",
    )
    max_nodes_per_job: int = Field(
        1,
        ge=1,
        description="Largest resources.nodes a job of any project may ask for. 1 keeps every job on one worker; more "
        "needs the workers' TrainJob path (Kubeflow Trainer, docs/deploy.md).",
    )
    retry_after_seconds: int = Field(60, ge=1, description="Retry-After sent with the 429 of the active-job cap.")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="Largest accepted request body; larger gets a 413.")
    rate_limit_requests: int = Field(
        600, ge=0, description="Requests an API key may make per window, across all API replicas; 0 disables."
    )
    rate_limit_window_seconds: int = Field(60, ge=1, description="The rate limit's (fixed) window.")
    rate_limit_redis_url: str | None = Field(
        None, description="Redis holding the rate limit counters; default: the broker's, if it is Redis."
    )
    reconcile_interval_seconds: float = Field(
        5.0,
        ge=0,
        description="How often the API re-dispatches jobs whose broker message was lost or whose worker went "
        "silent; 0 disables.",
    )
    migrate_on_startup: bool = Field(True, description="Run `alembic upgrade head` when the API starts.")
    events_poll_seconds: float = Field(1.0, gt=0, description="How often the events stream looks for new events.")
    events_stream_max_seconds: float = Field(
        600.0, gt=0, description="An events stream closes after this long; clients reconnect with Last-Event-ID."
    )


@lru_cache
def get_settings() -> Settings:
    return Settings()
