"""Pause and resume through the API (real PostgreSQL and SQLite, real Redis), with the worker's side played by the
job store as a worker calls it: a queued job pauses at once, a running one once its worker has checkpointed; a
resume queues it again within the project's limits; another project's key sees nothing."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from services.jobs import jobstore, reconciler
from services.jobs.models import Job, utcnow

JOBS = "/v1/fine_tuning/jobs"


def _queued(client: TestClient, auth: dict[str, str], body: dict[str, Any]) -> str:
    job = client.post(JOBS, json=body, headers=auth).json()
    assert client.get(f"{JOBS}/{job['id']}", headers=auth).json()["status"] == "queued"
    return str(job["id"])


def test_a_queued_job_pauses_at_once_and_resumes_to_the_queue(
    client: TestClient, auth: dict[str, str], job_body: Callable[..., dict[str, Any]], gpu_messages: Callable
) -> None:
    job_id = _queued(client, auth, job_body())
    r = client.post(f"{JOBS}/{job_id}/pause", headers=auth)
    assert r.status_code == 200 and r.json()["status"] == "paused"
    assert client.post(f"{JOBS}/{job_id}/pause", headers=auth).json()["status"] == "paused"  # a no-op
    with client.app.state.session_factory() as session:  # type: ignore[attr-defined]
        assert not jobstore.claim_job(session, job_id, "gpu-0")  # its message finds it unclaimable
    assert client.get(JOBS, params={"status": "paused"}, headers=auth).json()["data"][0]["id"] == job_id
    # The event stream ends at a pause (nothing happens until a resume) with the status.
    stream = client.get(f"{JOBS}/{job_id}/events/stream", headers=auth).text
    assert stream.endswith('event: done\ndata: {"status": "paused"}\n\n')

    r = client.post(f"{JOBS}/{job_id}/resume", headers=auth)
    assert r.status_code == 200 and r.json()["status"] == "queued"
    assert gpu_messages() == [job_id, job_id]  # sent again (the first copy is harmless: one claim wins)
    r = client.post(f"{JOBS}/{job_id}/resume", headers=auth)
    assert r.status_code == 409 and r.json() == {"detail": "only a paused job can be resumed; this one is queued"}


def test_a_running_job_pauses_once_its_worker_has_checkpointed_and_resumes_from_there(
    client: TestClient, auth: dict[str, str], job_body: Callable[..., dict[str, Any]]
) -> None:
    job_id = _queued(client, auth, job_body())
    sessions = client.app.state.session_factory  # type: ignore[attr-defined]
    with sessions() as session:
        assert jobstore.claim_job(session, job_id, "gpu-0")
        jobstore.record_progress(session, job_id, 4, 10, worker_id="gpu-0")
    r = client.post(f"{JOBS}/{job_id}/pause", headers=auth)
    assert r.json()["status"] == "pause_requested"
    with sessions() as session:
        assert jobstore.is_cancel_requested(session, job_id, "gpu-0")  # the worker's trainer stops at this
        jobstore.add_checkpoint(session, job_id, 4, f"s3://b/{job_id}/checkpoint-4")
        assert not jobstore.settle_pause(session, job_id, "another-worker")
        assert jobstore.settle_pause(session, job_id, "gpu-0")
    job = client.get(f"{JOBS}/{job_id}", headers=auth).json()
    assert (job["status"], job["step"]) == ("paused", 4)
    events = [e["message"] for e in client.get(f"{JOBS}/{job_id}/events", headers=auth).json()["data"]]
    assert events[-3:] == [
        "Pause requested; waiting for the worker to checkpoint",
        "Checkpoint saved at step 4",
        f"The job is paused at step 4; resume it with POST /v1/fine_tuning/jobs/{job_id}/resume",
    ]
    assert client.post(f"{JOBS}/{job_id}/resume", headers=auth).json()["status"] == "queued"
    with sessions() as session:
        assert jobstore.claim_job(session, job_id, "gpu-1")
        job_row = jobstore.get_job(session, job_id)
        assert job_row is not None and job_row.attempt == 1  # a pause is not a spent attempt
    # A pausing job can still be cancelled; an ended one cannot be paused.
    with sessions() as session:
        jobstore.pause_job(session, job_id)
    assert client.post(f"{JOBS}/{job_id}/cancel", headers=auth).json()["status"] == "cancel_requested"
    r = client.post(f"{JOBS}/{job_id}/pause", headers=auth)
    assert r.status_code == 409 and r.json() == {
        "detail": "a cancel_requested job cannot be paused (only queued or running ones)"
    }


def test_another_projects_key_cannot_pause_or_resume(
    client: TestClient, make_key: Callable, job_body: Callable[..., dict[str, Any]]
) -> None:
    alpha, beta = make_key("alpha"), make_key("beta")
    job_id = _queued(client, alpha, job_body())
    for action in ("pause", "resume"):
        assert client.post(f"{JOBS}/{job_id}/{action}", headers=beta).status_code == 404
    assert client.get(f"{JOBS}/{job_id}", headers=alpha).json()["status"] == "queued"


def test_a_resume_is_within_the_projects_limits(
    make_client: Callable[..., TestClient], auth: dict[str, str], job_body: Callable[..., dict[str, Any]]
) -> None:
    client = make_client(max_active_jobs_per_project=1, retry_after_seconds=30)
    first = _queued(client, auth, job_body())
    client.post(f"{JOBS}/{first}/pause", headers=auth)
    second = _queued(client, auth, job_body())  # a paused job holds no worker: it does not count
    r = client.post(f"{JOBS}/{first}/resume", headers=auth)
    assert r.status_code == 429 and r.headers["Retry-After"] == "30"
    assert r.json() == {"detail": "too many active jobs in this project (limit 1)"}
    assert client.get(f"{JOBS}/{first}", headers=auth).json()["status"] == "paused"
    client.post(f"{JOBS}/{second}/cancel", headers=auth)
    assert client.post(f"{JOBS}/{first}/resume", headers=auth).json()["status"] == "queued"


def test_a_job_whose_worker_died_while_pausing_is_paused_by_the_reconciler(
    client: TestClient, auth: dict[str, str], job_body: Callable[..., dict[str, Any]], settings: Any
) -> None:
    job_id = _queued(client, auth, job_body())
    sessions = client.app.state.session_factory  # type: ignore[attr-defined]
    with sessions() as session:
        assert jobstore.claim_job(session, job_id, "gpu-0")
        jobstore.pause_job(session, job_id)
        session.execute(
            update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(hours=1), dispatched_at=None)
        )
        session.commit()
    report = reconciler.run_once(sessions, settings, client.app.state.celery)  # type: ignore[attr-defined]
    assert report.paused == [job_id]
    assert client.get(f"{JOBS}/{job_id}", headers=auth).json()["status"] == "paused"


@pytest.mark.parametrize("action", ["pause", "resume"])
def test_pause_and_resume_need_jobs_write(
    client: TestClient, make_key: Callable, job_body: Callable[..., dict[str, Any]], action: str
) -> None:
    from services.admin import create_api_key

    job_id = _queued(client, make_key("alpha"), job_body())
    with client.app.state.session_factory() as session:  # type: ignore[attr-defined]
        key, _ = create_api_key(session, "alpha", scopes=["jobs:read"])
    r = client.post(f"{JOBS}/{job_id}/{action}", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 403
