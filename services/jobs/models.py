"""Database tables (SQLAlchemy 2). The database, not the broker, is the source of truth for a job's state.

The API and the worker import these models and `services.jobs.db` for their sessions; state changes go through
`jobstore`.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from invdpo_core.config import (  # noqa: F401  (re-exported: the job layer's names for the statuses)
    ACTIVE_STATUSES,
    STATUSES,
    TERMINAL_STATUSES,
    ActiveStatus,
    JobStatus,
    TerminalStatus,
)

JSONType = JSON().with_variant(JSONB(), "postgresql")

# What an API key may do. models:force promotes a version the gate refused, so keys get it only when asked.
SCOPES = ("jobs:read", "jobs:write", "models:read", "models:promote", "models:force")
DEFAULT_SCOPES = ("jobs:read", "jobs:write", "models:read", "models:promote")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive strings, so tz is re-attached on read)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        value = value.astimezone(timezone.utc)
        # SQLite compares the stored strings; keep them all in one naive UTC format so order is time order.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    pass


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # s3:// prefixes the project's models, datasets and images must lie under; None: any the service can read.
    allowed_prefixes: Mapped[list[str] | None] = mapped_column(JSONType)
    # This project's own limits (invdpo-admin set-limits); None: the API's INVDPO_MAX_ACTIVE_JOBS_PER_PROJECT and
    # INVDPO_MAX_GPU_HOURS_PER_PROJECT.
    max_active_jobs: Mapped[int | None] = mapped_column(Integer)
    max_gpu_hours: Mapped[float | None] = mapped_column(Float)


class ApiKey(Base):
    """A bearer key. Only its sha256 is stored; `prefix` is the public part users see to tell keys apart."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str | None] = mapped_column(String(128))
    scopes: Mapped[list[str]] = mapped_column(JSONType, default=lambda: list(DEFAULT_SCOPES))  # of SCOPES
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("project_id", "idempotency_key", name="uq_jobs_project_idempotency_key"),
        # Cursor pagination walks (project, created_at, id); the reconciler and /metrics scan by status.
        Index("ix_jobs_project_created", "project_id", "created_at", "id"),
        Index("ix_jobs_status", "status"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(32))
    # What the user asked for.
    model: Mapped[str] = mapped_column(Text)
    training_file: Mapped[str] = mapped_column(Text)
    validation_file: Mapped[str | None] = mapped_column(Text)
    method_type: Mapped[str] = mapped_column(String(32))
    config: Mapped[dict[str, Any]] = mapped_column(JSONType)  # the full validated TrainingConfig
    seed: Mapped[int] = mapped_column(BigInteger)
    suffix: Mapped[str | None] = mapped_column(String(64))
    registered_model_name: Mapped[str | None] = mapped_column(String(256))
    metadata_: Mapped[dict[str, str] | None] = mapped_column("metadata", JSONType)
    resources: Mapped[dict[str, int] | None] = mapped_column(JSONType)  # {nodes, gpus_per_node}; None: one node
    # Seconds the job may run, over all its attempts, before it is stopped as runtime_limit; None (jobs made before
    # the limit): the worker's INVDPO_MAX_RUNTIME_SECONDS.
    max_runtime_seconds: Mapped[int | None] = mapped_column(BigInteger)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    # Lifecycle and progress.
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # last handed to validator or broker
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    estimated_finish: Mapped[datetime | None] = mapped_column(UTCDateTime)
    step: Mapped[int | None] = mapped_column(BigInteger)
    total_steps: Mapped[int | None] = mapped_column(BigInteger)
    # Results.
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    registered_model_version: Mapped[str | None] = mapped_column(String(32))
    fine_tuned_model: Mapped[str | None] = mapped_column(Text)
    evaluation: Mapped[dict[str, Any] | None] = mapped_column(JSONType)  # jobstore.set_evaluation; the gate reads it
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    error_param: Mapped[str | None] = mapped_column(String(128))
    # Checks of the files begun (services/jobs/validation.py): bounded, a check that kills its process is not retried
    # for ever.
    validation_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Worker ownership.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    # Seconds run so far, all attempts: added by the job's worker with each heartbeat (a dead worker's last
    # interval is lost, so it undercounts by at most one heartbeat interval per lost worker).
    runtime_seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    claimed_by: Mapped[str | None] = mapped_column(String(255))
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    level: Mapped[str] = mapped_column(String(16))  # info | warn | error
    type: Mapped[str] = mapped_column(String(16))  # message | metrics
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSONType)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (Index("ix_checkpoints_job_id_step", "job_id", "step_number"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step_number: Mapped[int] = mapped_column(BigInteger)
    uri: Mapped[str] = mapped_column(Text)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class RegisteredModel(Base):
    """Which project owns a registered model name: the first to register it (jobstore.claim_model_name). MLflow's
    tags can be rewritten by anyone who reaches MLflow; this row cannot."""

    __tablename__ = "registered_models"

    name: Mapped[str] = mapped_column(String(256), primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # The champion version last reported as not allowed (moved outside invdpo), so each move is reported once.
    champion_alert_version: Mapped[int | None] = mapped_column(Integer)


class ModelVersion(Base):
    """A version a job registered, with the promotion gate's verdict written by the worker at registration and
    every promotion through the API. The promote route and the model server read it here, never from MLflow."""

    __tablename__ = "model_versions"

    name: Mapped[str] = mapped_column(ForeignKey("registered_models.name", ondelete="CASCADE"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    # None: no verdict recorded (versions registered before the verdicts were); the promote route decides then.
    gate_passed: Mapped[bool | None] = mapped_column(Boolean)
    gate_reasons: Mapped[list[str] | None] = mapped_column(JSONType)
    forced_by: Mapped[str | None] = mapped_column(String(256))  # "key <prefix> (<name>)" of a forced promotion
    forced_reason: Mapped[str | None] = mapped_column(Text)
    promoted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    @property
    def allowed(self) -> bool:
        """May this version serve: the gate passed it, or a key with models:force promoted it anyway."""
        return bool(self.gate_passed) or self.forced_by is not None
