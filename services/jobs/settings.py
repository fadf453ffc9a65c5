"""Settings the API and the worker share (environment prefix INVDPO_): each service's `Settings` extends this."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from invdpo_core.gate import GateRule, parse_gate_setting


class JobSettings(BaseSettings):
    """Environment variables (all prefixed INVDPO_): INVDPO_DATABASE_URL, INVDPO_BROKER_URL,
    INVDPO_MLFLOW_TRACKING_URI, INVDPO_LOG_LEVEL, INVDPO_HEARTBEAT_TIMEOUT_SECONDS, INVDPO_RECONCILE_AFTER_SECONDS,
    INVDPO_MAX_ATTEMPTS, INVDPO_VALIDATION_SAMPLE, INVDPO_MAX_RUNTIME_SECONDS, INVDPO_PROMOTION_GATE,
    INVDPO_VALIDATION_TIMEOUT_SECONDS, INVDPO_VALIDATION_MEMORY_BYTES, INVDPO_ALLOW_LOCAL_FILES,
    INVDPO_MAX_IMAGE_BYTES."""

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
        40.0,
        gt=0,
        description="A running job whose worker has not reported for this long is presumed lost: the reconciler "
        "re-sends it and another worker may claim it. Several times the worker's heartbeat_interval_seconds; with "
        "the API's reconcile_interval_seconds it bounds how soon a killed worker's job resumes (40 + 5 s, then the "
        "new training process starts: within 90 s, measured in tests/worker/test_worker_e2e.py).",
    )
    reconcile_after_seconds: float = Field(
        30.0,
        gt=0,
        description="A queued or validating job untouched this long, or a job the reconciler re-sent this long "
        "ago, is a candidate for re-dispatch.",
    )
    max_attempts: int = Field(
        3,
        ge=1,
        description="Attempts per job: a job whose worker or training process died (OOM kill, segfault) resumes "
        "from its last checkpoint until it has run this many times, then fails as worker_lost / "
        "training_process_died.",
    )
    validation_sample: int = Field(
        64,
        ge=1,
        description="Records read from the start of a job's training and validation files to check them (the "
        "job's event says how many were read); unreadable images among them are judged by the job's max_bad_share.",
    )
    max_runtime_seconds: int = Field(
        7 * 24 * 3600,
        ge=1,
        description="max_runtime_seconds of a job that sets none (7 days): after running this long, over all its "
        "attempts, a job checkpoints and ends failed as runtime_limit.",
    )
    promotion_gate: str = Field(
        '{"min_implicit_acc_lower": 0.5}',
        description="The promotion gate: the rule the worker checks on a job's evaluation when it registers the "
        "model version, recorded in the database as the version's verdict, which POST /v1/models/{name}/promote "
        "and the model server read. JSON with the fields of invdpo_core/gate.py GateRule (min_implicit_acc_lower, "
        "win_rate_scorer, min_win_rate); none turns the gate off. A key with scope models:force may promote a "
        "refused version anyway (recorded with the key and the reason).",
    )

    # Validation runs in the API and, for a job left validating_files, in the worker's `invdpo.reconcile`: both
    # read these (keep them equal in the two deployments).
    validation_timeout_seconds: float = Field(
        120.0, gt=0, description="A job whose files are not checked within this long fails as validation_timeout."
    )
    validation_memory_bytes: int = Field(
        1 << 30,
        ge=256 << 20,
        description="Address-space limit of the process that checks a job's files; a dataset needing more fails "
        "its job (validation_resources) instead of the API.",
    )
    allow_local_files: bool = Field(
        True,
        description="Accept local paths as model and files (the embedded single-machine setup). Deployments set "
        "false: jobs must then name s3:// URIs or hub ids, and cannot probe the API host's file system.",
    )
    max_image_bytes: int = Field(
        32 << 20,
        ge=1,
        description="Largest image (object or parquet cell) read, by validation and by the trainer (invdpo_core.data "
        "reads INVDPO_MAX_IMAGE_BYTES).",
    )

    @field_validator("promotion_gate")
    @classmethod
    def _check_gate(cls, value: str) -> str:
        parse_gate_setting(value)
        return value

    def gate_rule(self) -> GateRule | None:
        """The promotion gate's rule, or None when it is off."""
        return parse_gate_setting(self.promotion_gate)
