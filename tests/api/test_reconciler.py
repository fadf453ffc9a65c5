"""The reconciler: a job committed as queued always reaches the broker, even if its message was lost."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import update

from services.jobs import jobstore, reconciler
from services.jobs.models import Job, utcnow

JOBS = "/v1/fine_tuning/jobs"


def _reconcile(app: FastAPI, older_than: float = 0.0, **kwargs: Any) -> reconciler.ReconcileReport:
    with app.state.session_factory() as session:
        return reconciler.reconcile_queued_jobs(
            session, older_than, broker_url=app.state.settings.broker_url, celery=app.state.celery, **kwargs
        )


def _age(app: FastAPI, job_id: str, seconds: float, **columns: Any) -> None:
    """Pretend the job was dispatched (and its heartbeat seen) `seconds` ago."""
    then = utcnow() - timedelta(seconds=seconds)
    with app.state.session_factory() as session:
        session.execute(update(Job).where(Job.id == job_id).values(dispatched_at=then, heartbeat_at=then, **columns))
        session.commit()


def _create(client: TestClient, auth: dict[str, str], body: dict[str, Any]) -> str:
    return str(client.post(JOBS, json=body, headers=auth).json()["id"])


def test_a_lost_message_is_sent_again_once(
    app: FastAPI,
    client: TestClient,
    auth: dict[str, str],
    job_body: Callable[..., dict[str, Any]],
    broker: redis.Redis,
    gpu_messages: Callable[[], list[str]],
) -> None:
    job_id = _create(client, auth, job_body())
    assert gpu_messages() == [job_id]
    assert _reconcile(app).requeued == []  # its message is waiting: nothing to do
    broker.flushdb()  # Redis restarted without persistence: the message is gone
    assert _reconcile(app, older_than=3600).requeued == []  # too recent to call lost
    assert _reconcile(app).requeued == [job_id]
    assert gpu_messages() == [job_id]
    assert _reconcile(app).requeued == []  # waiting again: not duplicated
    assert gpu_messages() == [job_id]


def test_concurrent_reconcilers_send_a_job_once(
    app: FastAPI,
    client: TestClient,
    auth: dict[str, str],
    job_body: Callable[..., dict[str, Any]],
    broker: redis.Redis,
    gpu_messages: Callable[[], list[str]],
) -> None:
    job_ids = [_create(client, auth, job_body()) for _ in range(3)]
    broker.flushdb()
    with ThreadPoolExecutor(4) as pool:
        reports = list(pool.map(lambda _: _reconcile(app), range(4)))
    assert sorted(j for r in reports for j in r.requeued) == sorted(job_ids)
    assert sorted(gpu_messages()) == sorted(job_ids)


def test_a_job_whose_enqueue_failed_is_sent_by_the_reconciler(
    make_client: Callable[..., TestClient],
    make_key: Callable,
    app: FastAPI,
    job_body: Callable[..., dict[str, Any]],
    gpu_messages: Callable[[], list[str]],
) -> None:
    down = make_client(broker_url="redis://127.0.0.1:9/0")  # the broker is unreachable when the job is made
    job_id = _create(down, make_key("alpha"), job_body())
    assert down.get(f"{JOBS}/{job_id}", headers=make_key("alpha")).json()["status"] == "queued"
    assert gpu_messages() == []
    assert _reconcile(app).requeued == [job_id]  # the broker is back
    assert gpu_messages() == [job_id]


def test_silent_workers_are_replaced_then_the_job_fails(
    app: FastAPI,
    client: TestClient,
    auth: dict[str, str],
    job_body: Callable[..., dict[str, Any]],
    broker: redis.Redis,
    gpu_messages: Callable[[], list[str]],
) -> None:
    job_id = _create(client, auth, job_body())
    broker.flushdb()
    factory = app.state.session_factory
    with factory() as session:
        assert jobstore.claim_job(session, job_id, "gpu-0")
    assert _reconcile(app, heartbeat_timeout_seconds=60).resumed == []  # alive: heartbeat just now
    _age(app, job_id, 120)
    assert _reconcile(app, heartbeat_timeout_seconds=60).resumed == [job_id]
    assert gpu_messages() == [job_id]
    with factory() as session:
        assert jobstore.claim_job(session, job_id, "gpu-1", heartbeat_timeout_seconds=60)  # takes it over
        assert jobstore.is_cancel_requested(session, job_id, "gpu-0")  # the old worker, if alive, stops
        assert not jobstore.record_progress(session, job_id, 5, 10, worker_id="gpu-0")
        assert jobstore.get_job(session, job_id).attempt == 2  # type: ignore[union-attr]
    broker.flushdb()
    _age(app, job_id, 120, attempt=3)
    report = _reconcile(app, heartbeat_timeout_seconds=60, max_attempts=3)
    assert report.failed == [job_id] and gpu_messages() == []
    error = client.get(f"{JOBS}/{job_id}", headers=auth).json()["error"]
    assert error["code"] == "worker_lost"


def test_cancel_requested_with_a_dead_worker_becomes_cancelled(
    app: FastAPI, client: TestClient, auth: dict[str, str], job_body: Callable[..., dict[str, Any]]
) -> None:
    job_id = _create(client, auth, job_body())
    with app.state.session_factory() as session:
        jobstore.claim_job(session, job_id, "gpu-0")
    client.post(f"{JOBS}/{job_id}/cancel", headers=auth)
    _age(app, job_id, 600)
    assert _reconcile(app, heartbeat_timeout_seconds=60).cancelled == [job_id]
    assert client.get(f"{JOBS}/{job_id}", headers=auth).json()["status"] == "cancelled"


def test_stale_validation_is_run_again(
    app: FastAPI,
    client: TestClient,
    auth: dict[str, str],
    job_body: Callable[..., dict[str, Any]],
    broker: redis.Redis,
    gpu_messages: Callable[[], list[str]],
) -> None:
    job_id = _create(client, auth, job_body())
    # As if the API process died between the commit and the validation.
    with app.state.session_factory() as session:
        session.execute(update(Job).where(Job.id == job_id).values(status="validating_files"))
        session.commit()
    broker.flushdb()
    _age(app, job_id, 600)
    report = reconciler.run_once(
        app.state.session_factory,
        app.state.settings.model_copy(update={"reconcile_after_seconds": 60}),
        app.state.celery,
    )
    assert report.revalidate == [job_id]
    assert client.get(f"{JOBS}/{job_id}", headers=auth).json()["status"] == "queued"
    assert gpu_messages() == [job_id]


def test_the_app_reconciles_periodically(
    make_client: Callable[..., TestClient],
    make_key: Callable,
    job_body: Callable[..., dict[str, Any]],
    broker: redis.Redis,
    gpu_messages: Callable[[], list[str]],
) -> None:
    client = make_client(reconcile_interval_seconds=0.1, reconcile_after_seconds=0.5)
    job_id = _create(client, make_key("alpha"), job_body())
    broker.flushdb()
    deadline = time.monotonic() + 10
    while job_id not in gpu_messages() and time.monotonic() < deadline:
        time.sleep(0.05)
    # In the loop, not in a test's direct call: at least once (a duplicate would be harmless, the claim is atomic).
    assert job_id in gpu_messages()
    while _requeued_metric(client) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _requeued_metric(client) >= 1


def _requeued_metric(client: TestClient) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('invdpo_reconciler_redispatched_total{reason="requeued"}'):
            return float(line.split()[-1])
    return 0.0
