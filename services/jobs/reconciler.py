"""The reconciler: the database says what should be happening, the broker may have lost it. Runs in the API (a
periodic loop) and in the worker (the `invdpo.reconcile` task).

A job is never committed without being enqueued: if a `queued` job's message was lost (Redis restarted, a send
failed after the commit), or its worker died while running it, the job is sent again. Re-sending a job that is
already being trained is harmless: the worker's `jobstore.claim_job` is an atomic conditional UPDATE, so the
duplicate message finds the job taken and returns. Each re-send first moves the job's `dispatched_at` with a
conditional UPDATE, so several API replicas reconciling at once send a given job only once per round.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from celery import Celery
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from services.jobs import jobstore
from services.jobs.models import Job, utcnow
from services.jobs.queue import enqueue_training, pending_job_ids
from services.jobs.runs import end_job_run
from services.jobs.settings import JobSettings
from services.jobs.validation import validate_job_files

log = logging.getLogger(__name__)


@dataclass
class ReconcileReport:
    requeued: list[str] = field(default_factory=list)  # queued jobs whose message was missing
    resumed: list[str] = field(default_factory=list)  # running jobs whose worker went silent
    failed: list[str] = field(default_factory=list)  # silent too many times: failed as worker_lost
    cancelled: list[str] = field(default_factory=list)  # cancel_requested and the worker is gone
    paused: list[str] = field(default_factory=list)  # pause_requested and the worker is gone
    revalidate: list[str] = field(default_factory=list)  # validating_files for too long: validate again


def _redispatch(session: Session, job: Job, now: datetime) -> bool:
    """Move dispatched_at from the value we read to now; only the replica whose UPDATE matches re-sends."""
    before = job.dispatched_at
    same_dispatch = Job.dispatched_at.is_(None) if before is None else Job.dispatched_at == before
    result = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == job.status, same_dispatch)
        .values(dispatched_at=now)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1  # type: ignore[attr-defined]


def reconcile_queued_jobs(
    session: Session,
    older_than_seconds: float,
    *,
    broker_url: str,
    celery: Celery,
    heartbeat_timeout_seconds: float = 300.0,
    max_attempts: int = 3,
    validating_after_seconds: float | None = None,
) -> ReconcileReport:
    """One pass: re-send queued jobs (dispatched more than `older_than_seconds` ago) that have no message in the
    broker, re-send running jobs whose heartbeat is stale (failing them after `max_attempts`), finish
    cancel_requested and pause_requested jobs whose worker is gone, and claim stale validating_files jobs for
    re-validation (returned in `revalidate`; the caller runs the validation) once untouched for
    `validating_after_seconds` (default `older_than_seconds`; run_once adds the validation deadline, so a check
    still running is not started twice)."""
    now = utcnow()
    cutoff = now - timedelta(seconds=older_than_seconds)
    stale_heartbeat = now - timedelta(seconds=heartbeat_timeout_seconds)
    report = ReconcileReport()
    validating_cutoff = now - timedelta(seconds=validating_after_seconds or older_than_seconds)
    not_recent = or_(Job.dispatched_at.is_(None), Job.dispatched_at < cutoff)
    candidates = session.scalars(
        select(Job).where(
            or_(
                not_recent
                & (
                    (Job.status == "queued")
                    | (Job.status.in_(("running", "cancel_requested", "pause_requested")))
                    & or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale_heartbeat)
                ),
                (Job.status == "validating_files")
                & or_(Job.dispatched_at.is_(None), Job.dispatched_at < validating_cutoff),
            )
        )
    ).all()
    session.commit()
    if not candidates:
        return report
    # With a Redis broker we can see which messages are still waiting, so a job that is merely waiting its turn
    # behind long trainings is not sent again (which would inflate the queue length autoscalers read).
    waiting = pending_job_ids(broker_url) or set()
    for job in candidates:
        if job.status == "cancel_requested":
            if jobstore.settle_cancel(session, job.id):
                report.cancelled.append(job.id)
        elif job.status == "pause_requested":  # paused at its last stored checkpoint
            if jobstore.settle_pause(session, job.id):
                report.paused.append(job.id)
        elif job.status == "validating_files":
            if _redispatch(session, job, now):
                report.revalidate.append(job.id)
        elif job.id in waiting:
            continue
        elif job.status == "running" and job.attempt >= max_attempts:
            error: jobstore.JobErrorInfo = {
                "code": "worker_lost",
                "message": f"the worker running this job stopped responding {job.attempt} times",
                "param": None,
            }
            if jobstore.finish_job(session, job.id, "failed", error):
                report.failed.append(job.id)
        elif _redispatch(session, job, now):
            enqueue_training(job.id, celery)
            (report.requeued if job.status == "queued" else report.resumed).append(job.id)
    if report.requeued or report.resumed or report.failed or report.cancelled or report.paused:
        log.warning(
            "reconciled jobs",
            extra={
                "requeued": report.requeued,
                "resumed": report.resumed,
                "failed": report.failed,
                "cancelled": report.cancelled,
                "paused": report.paused,
            },
        )
    return report


def run_once(session_factory: sessionmaker[Session], settings: JobSettings, celery: Celery) -> ReconcileReport:
    """A full pass including the re-validation of stale validating_files jobs (the API's periodic loop and the
    worker's `invdpo.reconcile` task)."""
    with session_factory() as session:
        report = reconcile_queued_jobs(
            session,
            settings.reconcile_after_seconds,
            broker_url=settings.broker_url,
            celery=celery,
            heartbeat_timeout_seconds=settings.heartbeat_timeout_seconds,
            max_attempts=settings.max_attempts,
            validating_after_seconds=settings.reconcile_after_seconds + settings.validation_timeout_seconds,
        )
    for job_id in report.revalidate:
        validate_job_files(session_factory, job_id, settings, celery=celery)
    # Their workers are gone: nobody else ends their MLflow runs.
    for job_id in report.failed:
        end_job_run(session_factory, settings.mlflow_tracking_uri, job_id, "FAILED")
    for job_id in report.cancelled:
        end_job_run(session_factory, settings.mlflow_tracking_uri, job_id, "KILLED")
    return report
