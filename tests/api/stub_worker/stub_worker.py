"""A stand-in for the GPU worker with the real Celery machinery: same app config, same task name, and the jobstore
calls the real worker makes. Training is a loop of sleeps. Started by test_celery_worker.py as a subprocess."""

from __future__ import annotations

import os
import socket
import time

from services.jobs import jobstore
from services.jobs.db import make_engine, make_session_factory
from services.jobs.queue import TRAIN_TASK, make_celery

app = make_celery(os.environ["INVDPO_BROKER_URL"])
sessions = make_session_factory(make_engine(os.environ["INVDPO_DATABASE_URL"]))
WORKER_ID = f"{socket.gethostname()}-{os.getpid()}"


@app.task(name=TRAIN_TASK)
def train_job(job_id: str) -> None:
    with sessions() as session:
        if not jobstore.claim_job(session, job_id, WORKER_ID):
            jobstore.add_event(session, job_id, "duplicate message ignored")
            return
        job = jobstore.get_job(session, job_id)
        assert job is not None
        total = int(job.config["max_steps"])
        jobstore.set_run_info(session, job_id, mlflow_run_id=f"run-{job_id[-6:]}")
        for step in range(1, total + 1):
            if jobstore.is_cancel_requested(session, job_id, WORKER_ID):
                jobstore.settle_cancel(session, job_id, WORKER_ID)
                return
            time.sleep(0.02)
            jobstore.record_progress(session, job_id, step, total, {"loss": 1.0 / step}, worker_id=WORKER_ID)
        jobstore.add_checkpoint(session, job_id, total, f"s3://bucket/jobs/{job_id}/checkpoint-{total}")
        jobstore.finish_job(
            session, job_id, "succeeded", fine_tuned_model=f"models:/stub/{total}", worker_id=WORKER_ID
        )
