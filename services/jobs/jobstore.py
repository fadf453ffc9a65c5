"""Job state changes, as plain functions on a Session. Every function commits its own transaction.

Transitions are conditional UPDATEs (`... WHERE status IN (...)`), so the API, the reconciler and any number of
workers can race on one job and exactly one of them wins. Status machine:

    validating_files -> queued -> running -> succeeded | failed | cancelled
    validating_files | queued | paused -> cancelled   (POST /cancel, at once)
    running | pause_requested -> cancel_requested -> cancelled   (POST /cancel, then the worker stops)
    validating_files -> failed                        (files or model reference rejected)
    running -> pause_requested -> paused              (POST /pause: the worker checkpoints and lets go)
    queued -> paused                                  (POST /pause, at once)
    paused -> queued                                  (POST /resume: the next claim continues from the checkpoint)

For the worker, in order of use:
    claim_job(session, job_id, worker_id) -> bool            take the job; False means another worker has it
    heartbeat(session, job_id, worker_id) -> bool            "still alive" during long phases without steps
    add_runtime(session, job_id, seconds)                    the time run, towards the job's max_runtime_seconds
    record_progress(session, job_id, step, total_steps, metrics=None, worker_id=None) -> bool
    add_event(session, job_id, message, level="info", type="message", data=None) -> int
    add_checkpoint(session, job_id, step_number, uri, metrics=None) -> int
    checkpoints_beyond(session, job_id, keep) -> [uri]       stored checkpoints past checkpoints_to_keep
    forget_checkpoint(session, job_id, uri)                  their rows, before their files are deleted
    set_run_info(session, job_id, mlflow_run_id=..., registered_model_version=..., fine_tuned_model=...)
    set_evaluation(session, job_id, evaluation)              the evaluation after training (the gate reads it)
    is_cancel_requested(session, job_id, worker_id=None) -> bool   poll between steps; True means stop now
    owns(job, worker_id) -> bool                             is the job still this worker's to run and report?
    settle_cancel(session, job_id, worker_id=None) -> bool   cancel_requested -> cancelled once the worker stopped
    settle_pause(session, job_id, worker_id=None, *, step=None) -> bool
                                                             pause_requested -> paused once the worker stopped
    finish_job(session, job_id, status, error=None, ...) -> bool     succeeded | failed | cancelled
    requeue_job(session, job_id, worker_id, lost=None) -> bool   running -> queued (graceful shutdown, checkpointed;
                                                             or the training process died: `lost` says how)
The worker's writes (claim, events, checkpoints, run info, requeue, finish) ride out a database outage of up to
OUTAGE_BUDGET_SECONDS (`retry_outages`); heartbeat, progress and the cancel poll are periodic and are not retried.
The job's validated TrainingConfig is `TrainingConfig.model_validate(get_job(session, job_id).config)`.

Registered models (the database, not MLflow, says who owns a name and whether a version may serve):
    model_owner(session, name) -> project id | None
    claim_model_name(session, name, project_id) -> bool       first registration wins; False: another project's
    record_model_version(session, name, version, job_id, project_id, gate_passed, gate_reasons)   the worker
    version_verdict(session, name, version) -> ModelVersion | None   `.allowed`: gate passed or forced
    record_promotion(session, row, forced_by=None, reason=None)      the promote route
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, Concatenate, Literal, ParamSpec, TypedDict, TypeGuard, TypeVar

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session
from tenacity import Retrying, before_sleep_log, retry_if_exception_type, stop_after_delay, wait_exponential

from services.jobs.logs import mask_secrets
from services.jobs.models import (
    ACTIVE_STATUSES,
    Checkpoint,
    Job,
    JobEvent,
    ModelVersion,
    Project,
    RegisteredModel,
    TerminalStatus,
    utcnow,
)

FinalStatus = TerminalStatus
log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")
# How long a worker keeps retrying a write while the database is unreachable (failover, restart) before it gives up.
OUTAGE_BUDGET_SECONDS = 120.0


class JobErrorInfo(TypedDict, total=False):
    code: str  # machine-readable, e.g. dataset_not_found, worker_lost, out_of_memory
    message: str  # one user-facing line, no stack trace
    param: str | None  # the request field at fault, e.g. training_file


def new_job_id() -> str:
    return f"ftjob-{secrets.token_hex(12)}"


def default_model_name(job_id: str, suffix: str | None) -> str:
    """Registered model name when the job names none: one model line per suffix, else one per job."""
    return f"invdpo-{suffix}" if suffix else f"invdpo-{job_id}"


def is_job_id(value: str) -> bool:
    """Checked before any query: a malformed id (say with a NUL byte, which PostgreSQL rejects) is just unknown."""
    return len(value) == 30 and value.startswith("ftjob-") and all(c in "0123456789abcdef" for c in value[6:])


def get_job(session: Session, job_id: str, project_id: int | None = None) -> Job | None:
    """The job, or None if it does not exist (or belongs to another project when project_id is given)."""
    job = session.get(Job, job_id)
    if job is None or (project_id is not None and job.project_id != project_id):
        return None
    return job


def _event(job_id: str, message: str, level: str = "info", type: str = "message", data: Any = None) -> JobEvent:
    return JobEvent(job_id=job_id, message=mask_secrets(message), level=level, type=type, data=data)


# ---------------------------------------------------------------- API side


def find_by_idempotency_key(session: Session, project_id: int, key: str) -> Job | None:
    return session.scalars(select(Job).where(Job.project_id == project_id, Job.idempotency_key == key)).first()


def gpu_seconds(resources: dict[str, int] | None, max_runtime_seconds: float) -> float:
    """GPU time a job asks for: nodes x gpus_per_node x max_runtime_seconds (no resources: one GPU)."""
    resources = resources or {}
    return resources.get("nodes", 1) * resources.get("gpus_per_node", 1) * max_runtime_seconds


class Usage(TypedDict):
    active_jobs: int
    gpu_seconds: float  # what the active jobs ask for (gpu_seconds of each)
    max_active_jobs: int | None  # the project's own limits, None: the API's settings
    max_gpu_hours: float | None


def lock_project_usage(session: Session, project_id: int, default_runtime_seconds: float) -> Usage:
    """The project's active jobs, the GPU time they ask for, and its own limits. On PostgreSQL the project row is
    locked until commit, so concurrent creates of one project count one after the other and the limits hold
    (SQLite serialises writers anyway). Jobs without a max_runtime_seconds count `default_runtime_seconds`."""
    limits = session.execute(
        select(Project.max_active_jobs, Project.max_gpu_hours).where(Project.id == project_id).with_for_update()
    ).one()
    rows = session.execute(
        select(Job.resources, Job.max_runtime_seconds).where(
            Job.project_id == project_id, Job.status.in_(ACTIVE_STATUSES)
        )
    ).all()
    return {
        "active_jobs": len(rows),
        "gpu_seconds": sum(gpu_seconds(r, m if m is not None else default_runtime_seconds) for r, m in rows),
        "max_active_jobs": limits.max_active_jobs,
        "max_gpu_hours": limits.max_gpu_hours,
    }


def runtime_limit(job: Job, default_seconds: float) -> float:
    """How long the job may run, over all its attempts (its own limit, or the deployment's default)."""
    return float(job.max_runtime_seconds) if job.max_runtime_seconds is not None else default_seconds


def runtime_limit_error(limit_seconds: float, step: int | None = None) -> JobErrorInfo:
    at = f" at step {step}" if step is not None else ""
    return {
        "code": "runtime_limit",
        "message": f"the job reached its max_runtime_seconds ({limit_seconds:.0f} s = {limit_seconds / 3600:.3g} h) "
        f"and was stopped{at}; its checkpoints are kept",
        "param": "max_runtime_seconds",
    }


def create_job(session: Session, job: Job) -> Job:
    """Insert a new `validating_files` job and commit. Raises IntegrityError on a duplicate idempotency key
    (after rolling back), so the caller can return the job that won the race."""
    job.status = "validating_files"
    job.dispatched_at = utcnow()  # handed to the file validator now
    session.add(job)
    session.add(_event(job.id, f"Validating training file: {job.training_file}"))
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise
    return job


def mark_validated(session: Session, job_id: str, read: Sequence[str] = ()) -> bool:
    """validating_files -> queued, with `read` (what the check read of each file) in the event. False if the job
    moved meanwhile (e.g. cancelled): then do not enqueue."""
    done = _transition(session, job_id, ("validating_files",), status="queued", dispatched_at=utcnow())
    if done:
        what = f" ({'; '.join(read)})" if read else ""
        session.add(_event(job_id, f"Files validated{what}; job queued for a GPU worker"))
    session.commit()
    return done


def cancel_job(session: Session, job_id: str) -> Job | None:
    """Cancel as far as the API can: not running -> cancelled; running (or pausing) -> cancel_requested (the worker
    finishes it). Returns the job, or None if it had already succeeded or failed."""
    for _ in range(5):  # retry if a worker or the validator moved the job between our read and our update
        job = session.get(Job, job_id, populate_existing=True)
        if job is None:
            return None
        if job.status in ("cancelled", "cancel_requested"):
            return job
        if job.status in ("succeeded", "failed"):
            return None
        now = utcnow()
        if job.status in WORKER_STATUSES:
            done = _transition(session, job_id, (job.status,), status="cancel_requested")
            message = "Cancellation requested; waiting for the worker to stop"
        else:
            done = _transition(
                session, job_id, (job.status,), status="cancelled", finished_at=now, estimated_finish=None
            )
            message = "The job was cancelled"
        if done:
            session.add(_event(job_id, message))
            session.commit()
            return session.get(Job, job_id, populate_existing=True)
        session.rollback()
    raise RuntimeError(f"job {job_id} kept changing while being cancelled")


def pause_job(session: Session, job_id: str) -> Job | None:
    """Pause as far as the API can: queued -> paused at once (its message finds it unclaimable); running ->
    pause_requested (the worker checkpoints, then settle_pause). Pausing a pausing or paused job changes nothing.
    Returns the job, or None if it cannot be paused (validating its files, cancelling or ended)."""
    for _ in range(5):  # retry if a worker claimed or ended the job between our read and our update
        job = session.get(Job, job_id, populate_existing=True)
        if job is None or job.status not in ("queued", "running", "pause_requested", "paused"):
            return None
        if job.status in ("pause_requested", "paused"):
            return job
        if job.status == "running":
            done = _transition(session, job_id, ("running",), status="pause_requested")
            message = "Pause requested; waiting for the worker to checkpoint"
        else:
            done = _transition(session, job_id, ("queued",), status="paused", estimated_finish=None)
            message = "The job is paused; resume it with POST /v1/fine_tuning/jobs/{id}/resume"
        if done:
            session.add(_event(job_id, message.replace("{id}", job_id)))
            session.commit()
            return session.get(Job, job_id, populate_existing=True)
        session.rollback()
    raise RuntimeError(f"job {job_id} kept changing while being paused")


def resume_job(session: Session, job_id: str) -> bool:
    """paused -> queued (uncommitted, so the caller may check the project's limits in the same transaction;
    commit, then enqueue). False if the job is not paused."""
    done = _transition(session, job_id, ("paused",), status="queued", dispatched_at=utcnow())
    if done:
        session.add(_event(job_id, "Resumed; job queued for a GPU worker (it continues from its last checkpoint)"))
    return done


class InvalidCursor(ValueError):
    pass


def list_jobs(
    session: Session, project_id: int, *, after: str | None, limit: int, status: str | None
) -> tuple[Sequence[Job], bool]:
    """Newest first, keyset-paginated on (created_at, id) so pages never skip or repeat a job."""
    query = select(Job).where(Job.project_id == project_id)
    if status is not None:
        query = query.where(Job.status == status)
    if after is not None:
        cursor = get_job(session, after, project_id) if is_job_id(after) else None
        if cursor is None:
            raise InvalidCursor(after)
        query = query.where(
            or_(
                Job.created_at < cursor.created_at,
                and_(Job.created_at == cursor.created_at, Job.id < cursor.id),
            )
        )
    rows = session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)).all()
    return rows[:limit], len(rows) > limit


def list_events(session: Session, job_id: str, *, after: int | None, limit: int) -> tuple[Sequence[JobEvent], bool]:
    """Oldest first, after the event id `after`: the order a follower (SSE or polling) reads them in."""
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    if after is not None:
        query = query.where(JobEvent.id > after)
    rows = session.scalars(query.order_by(JobEvent.id).limit(limit + 1)).all()
    return rows[:limit], len(rows) > limit


def list_checkpoints(
    session: Session, job_id: str, *, after: int | None, limit: int
) -> tuple[Sequence[Checkpoint], bool]:
    query = select(Checkpoint).where(Checkpoint.job_id == job_id)
    if after is not None:
        query = query.where(Checkpoint.id > after)
    rows = session.scalars(query.order_by(Checkpoint.id).limit(limit + 1)).all()
    return rows[:limit], len(rows) > limit


def count_jobs_by_status(session: Session) -> dict[str, int]:
    rows = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
    return {status: count for status, count in rows}


# ---------------------------------------------------------------- worker side


def retry_outages(fn: Callable[Concatenate[Session, P], R]) -> Callable[Concatenate[Session, P], R]:
    """Retry `fn(session, ...)` with backoff while the database is unreachable (OperationalError: connection
    refused or dropped), for up to OUTAGE_BUDGET_SECONDS. The session is rolled back before each retry, so the
    retry runs on a fresh connection; transitions are conditional UPDATEs, so a retry never applies one twice."""

    @functools.wraps(fn)
    def retried(session: Session, *args: P.args, **kwargs: P.kwargs) -> R:
        for attempt in Retrying(
            retry=retry_if_exception_type(OperationalError),
            wait=wait_exponential(multiplier=0.5, max=8),
            stop=stop_after_delay(OUTAGE_BUDGET_SECONDS),
            before_sleep=before_sleep_log(log, logging.WARNING, exc_info=False),
            reraise=True,
        ):
            with attempt:
                try:
                    return fn(session, *args, **kwargs)
                except OperationalError:
                    with contextlib.suppress(SQLAlchemyError):
                        session.rollback()
                    raise
        raise AssertionError("unreachable: tenacity re-raises the last error")

    return retried


def _transition(session: Session, job_id: str, from_statuses: Sequence[str], *conditions: Any, **values: Any) -> bool:
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(from_statuses), *conditions)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


@retry_outages
def claim_job(session: Session, job_id: str, worker_id: str, *, heartbeat_timeout_seconds: float = 300.0) -> bool:
    """Atomically take the job: queued -> running, or take over a running job whose worker went silent
    (heartbeat older than heartbeat_timeout_seconds). Returns False if someone else has it or it is finished or
    cancelled: the task must then return without training. Increments `attempt`."""
    now = utcnow()
    stale = now - timedelta(seconds=heartbeat_timeout_seconds)
    claimable = or_(
        Job.status == "queued",
        and_(Job.status == "running", or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale)),
    )
    done = _transition(
        session,
        job_id,
        ("queued", "running"),
        claimable,
        status="running",
        claimed_by=worker_id,
        heartbeat_at=now,
        attempt=Job.attempt + 1,
        started_at=func.coalesce(Job.started_at, now),
    )
    if done:
        attempt = session.scalar(select(Job.attempt).where(Job.id == job_id))
        session.add(_event(job_id, f"Training started (attempt {attempt})"))  # the worker's host:pid is in the logs
    session.commit()
    return done


def _owned(worker_id: str | None) -> tuple[Any, ...]:
    return () if worker_id is None else (Job.claimed_by == worker_id,)


# A claimed job is its worker's while it trains or is asked to stop.
WORKER_STATUSES = ("running", "cancel_requested", "pause_requested")


def owns(job: Job | None, worker_id: str) -> TypeGuard[Job]:
    """True while `worker_id` is the job's worker: it claimed the job, which has neither ended nor been taken over
    by another worker (after a stale heartbeat). Only the owner trains, reports and ends the job."""
    return job is not None and job.claimed_by == worker_id and job.status in WORKER_STATUSES


def heartbeat(session: Session, job_id: str, worker_id: str | None = None) -> bool:
    """Mark the job alive. False if the job is no longer this worker's to run (finished, or taken over)."""
    done = _transition(session, job_id, WORKER_STATUSES, *_owned(worker_id), heartbeat_at=utcnow())
    session.commit()
    return done


def add_runtime(session: Session, job_id: str, seconds: float) -> None:
    """Add `seconds` its worker ran the job (since it last added) to the job's runtime, whatever its status now:
    the time was spent either way (also by a worker that lost the job to another, or that has just requeued it)."""
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(runtime_seconds=Job.runtime_seconds + seconds)
        .execution_options(synchronize_session=False)
    )
    session.commit()


def record_progress(
    session: Session,
    job_id: str,
    step: int,
    total_steps: int,
    metrics: dict[str, float] | None = None,
    *,
    worker_id: str | None = None,
) -> bool:
    """Store step/total_steps, refresh the heartbeat and the estimated finish; with `metrics`, also add a
    `metrics` event {step, total_steps, **metrics}. Returns False if the job is no longer this worker's."""
    now = utcnow()
    started_at = session.scalar(select(Job.started_at).where(Job.id == job_id))
    estimated: datetime | None = None
    if started_at is not None and step > 0 and total_steps >= step:
        estimated = now + (now - started_at) * ((total_steps - step) / step)
    done = _transition(
        session,
        job_id,
        WORKER_STATUSES,
        *_owned(worker_id),
        step=step,
        total_steps=total_steps,
        heartbeat_at=now,
        estimated_finish=estimated,
    )
    if done and metrics:
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        data = {"step": step, "total_steps": total_steps, **metrics}
        session.add(_event(job_id, f"Step {step}/{total_steps}: {shown}", type="metrics", data=data))
    session.commit()
    return done


@retry_outages
def add_event(
    session: Session,
    job_id: str,
    message: str,
    *,
    level: Literal["info", "warn", "error"] = "info",
    type: Literal["message", "metrics"] = "message",
    data: dict[str, Any] | None = None,
) -> int:
    """Append a user-visible event (credentials in the message are masked). Returns its id."""
    event = _event(job_id, message, level, type, data)
    session.add(event)
    session.commit()
    return event.id


@retry_outages
def add_checkpoint(
    session: Session, job_id: str, step_number: int, uri: str, metrics: dict[str, Any] | None = None
) -> int:
    """Record a resumable checkpoint saved at `uri` (e.g. s3://bucket/jobs/<id>/checkpoint-500). Returns its id."""
    checkpoint = Checkpoint(job_id=job_id, step_number=step_number, uri=mask_secrets(uri), metrics=metrics or {})
    session.add(checkpoint)
    session.add(_event(job_id, f"Checkpoint saved at step {step_number}"))
    session.commit()
    return checkpoint.id


@retry_outages
def checkpoints_beyond(session: Session, job_id: str, keep: int) -> list[str]:
    """The URIs of the job's stored checkpoints older than its `keep` newest steps (each URI once)."""
    rows = session.execute(
        select(Checkpoint.step_number, Checkpoint.uri)
        .where(Checkpoint.job_id == job_id)
        .order_by(Checkpoint.step_number.desc(), Checkpoint.id.desc())
    ).all()
    session.commit()
    kept_steps = sorted({step for step, _ in rows}, reverse=True)[:keep]
    kept_uris = {uri for step, uri in rows if step in kept_steps}
    return list(dict.fromkeys(uri for step, uri in rows if step not in kept_steps and uri not in kept_uris))


@retry_outages
def forget_checkpoint(session: Session, job_id: str, uri: str) -> None:
    """Remove the rows of a stored checkpoint (before deleting its files: a row always points at a checkpoint)."""
    session.execute(delete(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.uri == uri))
    session.commit()


@retry_outages
def set_run_info(
    session: Session,
    job_id: str,
    *,
    mlflow_run_id: str | None = None,
    registered_model_version: str | None = None,
    fine_tuned_model: str | None = None,
) -> None:
    """Record MLflow facts as soon as they are known (the run id at start, so users can follow it live)."""
    values = {
        k: v
        for k, v in {
            "mlflow_run_id": mlflow_run_id,
            "registered_model_version": registered_model_version,
            "fine_tuned_model": fine_tuned_model,
        }.items()
        if v is not None
    }
    if values:
        session.execute(update(Job).where(Job.id == job_id).values(**values))
    session.commit()


@retry_outages
def set_evaluation(session: Session, job_id: str, evaluation: dict[str, Any]) -> None:
    """Record the evaluation after training ({metrics, not_run, grid, error}, see services/worker/evaluation.py)."""
    session.execute(update(Job).where(Job.id == job_id).values(evaluation=evaluation))
    session.commit()


def is_cancel_requested(session: Session, job_id: str, worker_id: str | None = None) -> bool:
    """True when the worker should stop: cancellation was asked for, or the job is no longer running for it
    (finished, or taken over by another worker after a stale heartbeat)."""
    row = session.execute(select(Job.status, Job.claimed_by).where(Job.id == job_id)).first()
    session.commit()  # end the read transaction; this is polled between steps
    if row is None:
        return True
    status, claimed_by = row
    return status != "running" or (worker_id is not None and claimed_by != worker_id)


@retry_outages
def requeue_job(session: Session, job_id: str, worker_id: str | None = None, *, lost: str | None = None) -> bool:
    """running -> queued, so that the next claim continues from the last checkpoint. Without `lost`: a worker
    stopping gracefully (SIGTERM) after saving a checkpoint; the attempt is given back, since that is not a worker
    loss. With `lost` (how the training process died): the attempt counts towards max_attempts. False if the job is
    no longer this worker's or is no longer running (e.g. cancel_requested: then finish it as cancelled)."""
    done = _transition(
        session,
        job_id,
        ("running",),
        *_owned(worker_id),
        status="queued",
        claimed_by=None,
        heartbeat_at=None,
        estimated_finish=None,
        dispatched_at=utcnow(),
        attempt=Job.attempt if lost else Job.attempt - 1,
    )
    if done:
        message = (
            f"{lost}; job queued again to resume from its last checkpoint"
            if lost
            else "The worker is shutting down: checkpoint saved, job queued again"
        )
        session.add(_event(job_id, message, level="warn" if lost else "info"))
    session.commit()
    return done


_FINAL_EVENTS = {
    "succeeded": ("info", "The job has successfully completed"),
    "failed": ("error", "The job failed"),
    "cancelled": ("info", "The job was cancelled"),
}


@retry_outages
def finish_job(
    session: Session,
    job_id: str,
    status: FinalStatus,
    error: JobErrorInfo | None = None,
    *,
    fine_tuned_model: str | None = None,
    mlflow_run_id: str | None = None,
    registered_model_version: str | None = None,
    worker_id: str | None = None,
) -> bool:
    """End the job: succeeded, failed (with error {code, message, param}) or cancelled. A worker that saw
    is_cancel_requested() finishes with "cancelled". Returns False if the job had already ended (or, with
    worker_id, belongs to another worker)."""
    if status not in _FINAL_EVENTS:
        raise ValueError(f"status must be one of {sorted(_FINAL_EVENTS)}, got {status!r}")
    if status == "failed" and not (error and error.get("code") and error.get("message")):
        raise ValueError("a failed job needs error={'code': ..., 'message': ...}")
    now = utcnow()
    values: dict[str, Any] = {"status": status, "finished_at": now, "estimated_finish": None}
    if error:
        values.update(
            error_code=error.get("code"),
            error_message=mask_secrets(error.get("message") or ""),
            error_param=error.get("param"),
        )
    for key, value in (
        ("fine_tuned_model", fine_tuned_model),
        ("mlflow_run_id", mlflow_run_id),
        ("registered_model_version", registered_model_version),
    ):
        if value is not None:
            values[key] = value
    done = _transition(session, job_id, ACTIVE_STATUSES, *_owned(worker_id), **values)
    if done:
        level, message = _FINAL_EVENTS[status]
        if error:
            message = f"{message}: {error.get('message')}"
        session.add(_event(job_id, message, level=level))
    session.commit()
    return done


@retry_outages
def settle_cancel(session: Session, job_id: str, worker_id: str | None = None) -> bool:
    """cancel_requested -> cancelled: the job's worker stopped after the request (worker_id given: only if it is
    still that worker's), or is gone (the reconciler, no worker_id). False if the job was not waiting for its cancel:
    still running, already ended, or another worker's."""
    done = _transition(
        session,
        job_id,
        ("cancel_requested",),
        *_owned(worker_id),
        status="cancelled",
        finished_at=utcnow(),
        estimated_finish=None,
    )
    if done:
        level, message = _FINAL_EVENTS["cancelled"]
        session.add(_event(job_id, message, level=level))
    session.commit()
    return done


@retry_outages
def settle_pause(session: Session, job_id: str, worker_id: str | None = None, *, step: int | None = None) -> bool:
    """pause_requested -> paused: the job's worker stopped after checkpointing at `step` (worker_id given: only if
    it is still that worker's), or is gone (the reconciler, no worker_id, no step: the last one recorded stays). The
    claim is let go; POST /resume queues the job again. False if the job was not waiting for its pause."""
    # The worker records progress at intervals, so the checkpointed step may be newer than the stored one.
    step = step if step is not None else session.scalar(select(Job.step).where(Job.id == job_id))
    done = _transition(
        session,
        job_id,
        ("pause_requested",),
        *_owned(worker_id),
        step=step,
        status="paused",
        claimed_by=None,
        heartbeat_at=None,
        estimated_finish=None,
        attempt=Job.attempt - 1,  # a pause is not a failed attempt
    )
    if done:
        at = f" at step {step}" if step else ""
        session.add(_event(job_id, f"The job is paused{at}; resume it with POST /v1/fine_tuning/jobs/{job_id}/resume"))
    session.commit()
    return done


# ---------------------------------------------------------------- registered models


def model_owner(session: Session, name: str) -> int | None:
    """The project that owns registered model `name`, or None if no job registered it yet."""
    return session.scalar(select(RegisteredModel.project_id).where(RegisteredModel.name == name))


def claim_model_name(session: Session, name: str, project_id: int) -> bool:
    """Make `project_id` the owner of `name` unless a project already is (first registration wins; two racing
    claims insert the same primary key, so one of them fails and reads the winner). True if the project owns it."""
    owner = model_owner(session, name)
    if owner is None:
        session.add(RegisteredModel(name=name, project_id=project_id))
        try:
            session.commit()
            return True
        except IntegrityError:
            session.rollback()
            owner = model_owner(session, name)
    return owner == project_id


def record_model_version(
    session: Session,
    name: str,
    version: int,
    *,
    job_id: str,
    project_id: int,
    gate_passed: bool | None,
    gate_reasons: list[str],
) -> None:
    """The worker's record of a version it registered, with the gate's verdict. A resumed job that finds its
    version already registered records it again: the first record stands."""
    if session.get(ModelVersion, (name, version)) is None:
        session.add(
            ModelVersion(
                name=name, version=version, job_id=job_id, project_id=project_id, gate_passed=gate_passed,
                gate_reasons=gate_reasons,
            )
        )  # fmt: skip
        try:
            session.commit()
        except IntegrityError:
            session.rollback()


def version_verdict(session: Session, name: str, version: int) -> ModelVersion | None:
    """The recorded version (its `allowed` says whether it may serve), or None if no invdpo job registered it."""
    return session.get(ModelVersion, (name, version))


def project_models(session: Session, project_id: int) -> Sequence[RegisteredModel]:
    return session.scalars(
        select(RegisteredModel).where(RegisteredModel.project_id == project_id).order_by(RegisteredModel.name)
    ).all()


def model_versions(session: Session, name: str) -> Sequence[ModelVersion]:
    return session.scalars(
        select(ModelVersion).where(ModelVersion.name == name).order_by(ModelVersion.version.desc())
    ).all()


def record_promotion(
    session: Session, row: ModelVersion, *, forced_by: str | None = None, reason: str | None = None
) -> None:
    """A promotion through the API: when, and for a version the gate refused, which key forced it and why."""
    row.promoted_at = utcnow()
    if forced_by is not None:
        row.forced_by, row.forced_reason = forced_by, reason
    session.commit()
