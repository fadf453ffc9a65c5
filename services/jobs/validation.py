"""File validation before any GPU is spent: the base model must resolve and the datasets must exist and look right.

Runs in the API process after the create request has answered, and in a reconciler pass for a job left
`validating_files` (the API image has no torch; the checks in invdpo_core.storage and invdpo_core.data read only
metadata and a few records). On success the job becomes `queued` and only then is it enqueued; on failure it
becomes `failed` with a user-facing {code, message, param}.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from services.jobs import jobstore
from services.jobs.logs import mask_secrets
from services.jobs.queue import enqueue_training

log = logging.getLogger(__name__)


def check_files(
    model: str, training_file: str, validation_file: str | None, sample: int
) -> jobstore.JobErrorInfo | None:
    """The first problem found as a job error, or None if the model and the datasets look right."""
    # Imported here: the API starts even if a check's optional dependencies are missing, and fails the job instead.
    from invdpo_core.data import DatasetError, inspect_dataset
    from invdpo_core.storage import ModelReferenceError, check_model_reference

    checks: list[tuple[str, Callable[[], object]]] = [("model", lambda: check_model_reference(model))]
    checks.append(("training_file", lambda: inspect_dataset(training_file, sample=sample)))
    if validation_file is not None:
        checks.append(("validation_file", lambda: inspect_dataset(validation_file, sample=sample)))
    for param, check in checks:
        try:
            check()
        except (DatasetError, ModelReferenceError) as exc:
            message = getattr(exc, "message", None) or str(exc)
            return {"code": str(exc.code), "message": mask_secrets(str(message)), "param": param}
    return None


def validate_job_files(
    session_factory: sessionmaker[Session], job_id: str, *, celery: Celery, sample: int = 8
) -> None:
    """Validate one `validating_files` job, then queue and enqueue it, or fail it. Never raises."""
    try:
        with session_factory() as session:
            job = jobstore.get_job(session, job_id)
            if job is None or job.status != "validating_files":
                return
            model, training_file, validation_file = job.model, job.training_file, job.validation_file
        # No database connection is held while the (possibly remote) files are read.
        try:
            error = check_files(model, training_file, validation_file, sample)
        except Exception:
            log.exception("file validation crashed", extra={"job_id": job_id})
            error = {
                "code": "validation_error",
                "message": "the files could not be checked because of an internal error; create the job again",
                "param": None,
            }
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
