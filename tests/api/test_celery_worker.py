"""The API and a real Celery worker process through a real Redis: the worker contract end to end (no eager mode)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from services.jobs.queue import enqueue_training

JOBS = "/v1/fine_tuning/jobs"
STUB = Path(__file__).with_name("stub_worker")


@pytest.fixture
def worker(settings: Any, client: TestClient) -> Iterator[subprocess.Popen[bytes]]:
    env = {
        **os.environ,
        "INVDPO_DATABASE_URL": settings.database_url,
        "INVDPO_BROKER_URL": settings.broker_url,
        "PYTHONPATH": os.pathsep.join([str(STUB), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "celery", "-A", "stub_worker", "worker", "-P", "solo", "-Q", "gpu", "-l", "WARNING"]
    proc = subprocess.Popen([*cmd, "--without-gossip", "--without-mingle", "--without-heartbeat"], env=env)
    yield proc
    proc.terminate()
    proc.wait(15)


def _wait_for(
    client: TestClient, auth: dict[str, str], job_id: str, statuses: set[str], timeout: float = 30, min_step: int = 0
) -> dict:
    """The job once it is in one of `statuses` and has reported at least `min_step` steps."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"{JOBS}/{job_id}", headers=auth).json()
        if job["status"] in statuses and (job["step"] or 0) >= min_step:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {job['status']}")


def test_worker_trains_a_job_and_ignores_a_duplicate_message(
    worker: subprocess.Popen[bytes],
    app: FastAPI,
    client: TestClient,
    auth: dict[str, str],
    job_body: Callable[..., dict[str, Any]],
) -> None:
    body = job_body()
    body["method"]["hyperparameters"]["max_steps"] = 5
    job_id = client.post(JOBS, json=body, headers=auth).json()["id"]
    enqueue_training(job_id, app.state.celery)  # a duplicate, as after a reconciler re-send
    job = _wait_for(client, auth, job_id, {"succeeded", "failed"})
    assert (job["status"], job["step"], job["total_steps"]) == ("succeeded", 5, 5)
    assert job["fine_tuned_model"] == "models:/stub/5" and job["mlflow_run_id"] == f"run-{job_id[-6:]}"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        events = client.get(f"{JOBS}/{job_id}/events", params={"limit": 100}, headers=auth).json()["data"]
        if any(e["message"] == "duplicate message ignored" for e in events):
            break
        time.sleep(0.1)
    messages = [e["message"] for e in events]
    assert "duplicate message ignored" in messages
    assert sum(m.startswith("Training started") for m in messages) == 1  # trained once
    assert len([e for e in events if e["type"] == "metrics"]) == 5
    assert client.get(f"{JOBS}/{job_id}/checkpoints", headers=auth).json()["data"][0]["step_number"] == 5


def test_cancelling_a_running_job_stops_the_worker(
    worker: subprocess.Popen[bytes], client: TestClient, auth: dict[str, str], job_body: Callable[..., dict[str, Any]]
) -> None:
    body = job_body()
    body["method"]["hyperparameters"]["max_steps"] = 2000  # 40 s of steps unless cancelled
    job_id = client.post(JOBS, json=body, headers=auth).json()["id"]
    # Cancelled only once a step was reported: on a loaded machine `running` comes well before step 1.
    _wait_for(client, auth, job_id, {"running"}, min_step=1)
    assert client.post(f"{JOBS}/{job_id}/cancel", headers=auth).json()["status"] == "cancel_requested"
    job = _wait_for(client, auth, job_id, {"cancelled", "succeeded", "failed"}, timeout=10)
    assert job["status"] == "cancelled" and 0 < job["step"] < 2000
