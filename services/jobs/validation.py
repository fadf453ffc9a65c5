"""File validation before any GPU is spent: the base model must resolve and the datasets must exist and look right.

Runs in the API after the create request has answered, and in a reconciler pass for a job left `validating_files`
(the API's loop or the worker's `invdpo.reconcile`), each time in a child process (services/jobs/file_checks.py,
forked from a fork server) with an address-space limit (INVDPO_VALIDATION_MEMORY_BYTES) and a
deadline (INVDPO_VALIDATION_TIMEOUT_SECONDS): a hostile or broken dataset (a decompression bomb, a parquet footer
that claims gigabytes, a store that never answers) fails its job, never the API or the worker. On success the job
becomes `queued` and only then is it enqueued; on failure it becomes `failed` with a user-facing {code, message,
param}.

Each check begun is counted on the job first (jobs.validation_attempts): if checks keep dying with their process
(the API itself killed mid-check), the reconciler's re-validation ends the job `failed` after INVDPO_MAX_ATTEMPTS.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from typing import Any

from celery import Celery
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from invdpo_core.config import TrainingConfig
from services.jobs import file_checks, jobstore
from services.jobs.models import Job, utcnow
from services.jobs.queue import enqueue_training
from services.jobs.settings import JobSettings

log = logging.getLogger(__name__)

# Told to the user when the check itself broke: the detail is in the API's logs under the job id.
INTERNAL = "the files could not be checked because of an internal error; create the job again"


# Each check is a fork of a server process that imported the readers (pyarrow, PIL, boto3) once: milliseconds to
# start instead of seconds for a fresh interpreter, and nothing of them in the API's own memory.
_FORKSERVER = multiprocessing.get_context("forkserver")
_FORKSERVER.set_forkserver_preload(["services.jobs.file_checks", "invdpo_core.data"])


def run_checks(
    request: dict[str, Any], settings: JobSettings, job_id: str
) -> tuple[jobstore.JobErrorInfo | None, list[str]]:
    """`file_checks.check_files(**request)` in a child process bounded in memory and time. Returns its verdict and
    what it read, or the job error saying why there is none (deadline, memory, crash: the detail goes to the log
    with the job id)."""
    timeout = settings.validation_timeout_seconds
    reader, writer = _FORKSERVER.Pipe(duplex=False)
    args = (writer, request, settings.validation_memory_bytes, dict(os.environ), os.getcwd())
    proc = _FORKSERVER.Process(target=file_checks.run_in_child, args=args, daemon=True)
    proc.start()
    writer.close()
    try:
        if not reader.poll(timeout):
            proc.kill()
            log.warning("file validation timed out", extra={"job_id": job_id, "timeout_seconds": timeout})
            return {
                "code": "validation_timeout",
                "message": f"checking the files took longer than the {timeout:g} s limit (a store not answering, or "
                "a dataset too slow to read); check the files and create the job again",
                "param": None,
            }, []
        try:
            kind, answer = reader.recv()
        except EOFError:  # it died without an answer
            pass
        else:
            if kind == "verdict":
                verdict: tuple[jobstore.JobErrorInfo | None, list[str]] = answer
                return verdict
            log.error("file validation crashed", extra={"job_id": job_id, "traceback": answer})
            return {"code": "validation_error", "message": INTERNAL, "param": None}, []
    finally:
        reader.close()
        proc.join(10)
    log.error("file validation process failed", extra={"job_id": job_id, "exitcode": proc.exitcode})
    if proc.exitcode == file_checks.OUT_OF_MEMORY or (proc.exitcode or 0) < 0:  # MemoryError, killed, bad_alloc
        from invdpo_core.storage import format_bytes

        return {
            "code": "validation_resources",
            "message": "checking the files needed more than the "
            f"{format_bytes(settings.validation_memory_bytes)} memory limit of validation, or crashed (an image or "
            "parquet row group too large to decode?)",
            "param": None,
        }, []
    return {"code": "validation_error", "message": INTERNAL, "param": None}, []


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
    session_factory: sessionmaker[Session], job_id: str, settings: JobSettings, *, celery: Celery
) -> None:
    """Validate one `validating_files` job, then queue and enqueue it, or fail it. Never raises."""
    try:
        job, may_check = _start_attempt(session_factory, job_id, settings.max_attempts)
        if job is None:
            return
        error: jobstore.JobErrorInfo | None
        read: list[str] = []
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
                "method": job.config["method"],
                "inversion_steps": TrainingConfig.model_construct(**job.config).inversion_grid_steps,
                "max_bad_share": job.config.get("max_bad_share", 0.01),
            }
            try:
                error, read = run_checks(request, settings, job_id)
            except Exception:
                log.exception("file validation crashed", extra={"job_id": job_id})
                error = {"code": "validation_error", "message": INTERNAL, "param": None}
        with session_factory() as session:
            if error is not None:
                jobstore.finish_job(session, job_id, "failed", error)
                log.info("job failed validation", extra={"job_id": job_id, "code": error.get("code")})
                return
            queued = jobstore.mark_validated(session, job_id, read)
        if queued:
            # After the commit: a crash between the two leaves a queued job the reconciler re-sends.
            enqueue_training(job_id, celery)
            log.info("job enqueued", extra={"job_id": job_id})
    except Exception:
        log.exception("could not finish validating or enqueueing", extra={"job_id": job_id})
