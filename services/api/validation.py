"""File validation before any GPU is spent: the base model must resolve and the datasets must exist and look right.

Runs after the create request has answered, in a child process of the API (`python -m services.api.file_checks`,
the request on stdin, the verdict on stdout) with an address-space limit (INVDPO_VALIDATION_MEMORY_BYTES) and a
deadline (INVDPO_VALIDATION_TIMEOUT_SECONDS): a hostile or broken dataset (a decompression bomb, a parquet footer
that claims gigabytes, a store that never answers) fails its job, never the API. On success the job becomes
`queued` and only then is it enqueued; on failure it becomes `failed` with a user-facing {code, message, param}.

Each check begun is counted on the job first (jobs.validation_attempts): if checks keep dying with their process
(the API itself killed mid-check), the reconciler's re-validation ends the job `failed` after INVDPO_MAX_ATTEMPTS.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from typing import Any, Protocol

from celery import Celery
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from services.api import jobstore
from services.api.file_checks import OUT_OF_MEMORY
from services.api.models import Job, utcnow
from services.api.security import mask_secrets
from services.queue import enqueue_training

log = logging.getLogger(__name__)

# Told to the user when the check itself broke: the detail is in the API's logs under the job id.
INTERNAL = "the files could not be checked because of an internal error; create the job again"


class ValidationSettings(Protocol):
    """What a check reads: the API's and the worker's Settings both have it (the worker re-validates in
    `invdpo.reconcile`)."""

    validation_sample: int
    validation_timeout_seconds: float
    validation_memory_bytes: int
    max_image_bytes: int
    allow_local_files: bool
    max_attempts: int


def run_checks(request: dict[str, Any], settings: ValidationSettings, job_id: str) -> jobstore.JobErrorInfo | None:
    """`file_checks.check_files(**request)` in a child process bounded in memory and time. Returns its verdict, or
    the job error saying why there is none (deadline, memory, crash: the detail goes to the log with the job id)."""
    payload = json.dumps({**request, "memory_bytes": settings.validation_memory_bytes})
    timeout = settings.validation_timeout_seconds
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "services.api.file_checks"],
            input=payload,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:  # the child was killed
        log.warning("file validation timed out", extra={"job_id": job_id, "timeout_seconds": timeout})
        return {
            "code": "validation_timeout",
            "message": f"checking the files took longer than the {timeout:g} s limit (a store not answering, or "
            "a dataset too slow to read); check the files and create the job again",
            "param": None,
        }
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        verdict: jobstore.JobErrorInfo | None = json.loads(lines[-1])
        return verdict
    log.error(
        "file validation process failed",
        extra={"job_id": job_id, "returncode": proc.returncode, "stderr": mask_secrets(proc.stderr[-2000:])},
    )
    if proc.returncode == OUT_OF_MEMORY or proc.returncode < 0:  # MemoryError, or killed/aborted (bad_alloc)
        from invdpo_core.storage import format_bytes

        return {
            "code": "validation_resources",
            "message": "checking the files needed more than the "
            f"{format_bytes(settings.validation_memory_bytes)} memory limit of validation, or crashed (an image or "
            "parquet row group too large to decode?)",
            "param": None,
        }
    return {"code": "validation_error", "message": INTERNAL, "param": None}


def _start_attempt(session_factory: sessionmaker[Session], job_id: str, max_attempts: int) -> tuple[Job | None, bool]:
    """Count one more check of the job, committed before it starts. Returns (the job if still validating, whether
    it may be checked again)."""
    with session_factory() as session:
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "validating_files")
            .values(validation_attempts=Job.validation_attempts + 1, dispatched_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        session.commit()
        if result.rowcount != 1:  # type: ignore[attr-defined]
            return None, False
        job = jobstore.get_job(session, job_id)
        if job is None:
            return None, False
        session.expunge(job)
        return job, job.validation_attempts <= max_attempts


def validate_job_files(
    session_factory: sessionmaker[Session], job_id: str, settings: ValidationSettings, *, celery: Celery | None = None
) -> None:
    """Validate one `validating_files` job, then queue and enqueue it, or fail it. Never raises."""
    try:
        job, may_check = _start_attempt(session_factory, job_id, settings.max_attempts)
        if job is None:
            return
        error: jobstore.JobErrorInfo | None
        if not may_check:
            log.error("file validation did not finish too many times", extra={"job_id": job_id})
            error = {
                "code": "validation_incomplete",
                "message": f"checking the files did not finish in {settings.max_attempts} attempts; check the "
                "files (sizes, formats) and create the job again",
                "param": None,
            }
        else:
            # No database connection is held while the (possibly remote) files are read.
            request = {
                "model": job.model,
                "training_file": job.training_file,
                "validation_file": job.validation_file,
                "sample": settings.validation_sample,
                "allow_local": settings.allow_local_files,
                "max_image_bytes": settings.max_image_bytes,
            }
            try:
                error = run_checks(request, settings, job_id)
            except Exception:
                log.exception("file validation crashed", extra={"job_id": job_id})
                error = {"code": "validation_error", "message": INTERNAL, "param": None}
        with session_factory() as session:
            if error is not None:
                jobstore.finish_job(session, job_id, "failed", error)
                log.info("job failed validation", extra={"job_id": job_id, "code": error.get("code")})
                return
            queued = jobstore.mark_validated(session, job_id)
        if queued:
            # After the commit: a crash between the two leaves a queued job the reconciler re-sends.
            enqueue_training(job_id, celery)
            log.info("job enqueued", extra={"job_id": job_id})
    except Exception:
        log.exception("could not finish validating or enqueueing", extra={"job_id": job_id})
