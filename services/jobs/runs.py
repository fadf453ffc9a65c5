"""The MLflow run of a job that ended without its training process: the process died (OOM kill, segfault), was
killed (cancel or runtime limit not honoured in time), or its worker went silent too many times. The training
process ends its own run when it ends the job (FINISHED, FAILED, KILLED); a dead one cannot, and its run would stay
RUNNING for ever. Whoever ends such a job ends its run here: FAILED, or KILLED for a cancel. A dead attempt whose job
goes on needs nothing: the next attempt continues the same run (services/worker/tracking.py start_job_run)."""

from __future__ import annotations

import logging
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from services.jobs.models import Job

log = logging.getLogger(__name__)


def end_job_run(
    session_factory: sessionmaker[Session], tracking_uri: str, job_id: str, status: Literal["FAILED", "KILLED"]
) -> None:
    """End the job's MLflow run with `status` if it is still running. Best effort: MLflow being down must not stop
    the job's ending (the log says which run was left)."""
    with session_factory() as session:
        run_id = session.scalar(select(Job.mlflow_run_id).where(Job.id == job_id))
    if run_id is None:
        return
    try:
        from mlflow import MlflowClient  # imported on use: seconds to import, and only dead attempts need it

        client = MlflowClient(tracking_uri=tracking_uri)
        if client.get_run(run_id).info.status in ("RUNNING", "SCHEDULED"):
            client.set_terminated(run_id, status)
    except Exception as exc:
        log.warning("MLflow run not ended", extra={"job_id": job_id, "run_id": run_id, "error": type(exc).__name__})
