"""Keys, project isolation, limits, and no credential in any response or log line."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select

from services.jobs import jobstore
from services.jobs.logs import JsonFormatter, mask_secrets
from services.jobs.models import ApiKey

JOBS = "/v1/fine_tuning/jobs"
UNAUTHORIZED = {"detail": "missing or invalid API key"}


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """Every log line the app writes while the test runs, formatted exactly as in production."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    yield stream
    root.removeHandler(handler)


def _v1_routes(app: FastAPI) -> list[tuple[str, str]]:
    paths = app.openapi()["paths"]
    return [(method.upper(), path) for path, ops in paths.items() if path.startswith("/v1/") for method in ops]


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer"}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer invdpo-x"}],
)
def test_every_v1_endpoint_needs_a_valid_key(client: TestClient, app: FastAPI, headers: dict[str, str]) -> None:
    routes = _v1_routes(app)
    assert len(routes) >= 7
    for method, path in routes:
        path = path.replace("{job_id}", "ftjob-" + "a" * 24).replace("{name}", "tiny")
        r = client.request(method, path, headers=headers)
        assert r.status_code == 401, (method, path)
        assert r.json() == UNAUTHORIZED
        assert r.headers["WWW-Authenticate"] == "Bearer"


def test_a_project_sees_only_its_own_jobs(
    client: TestClient, app: FastAPI, make_key: Callable, job_body: Callable[..., dict[str, Any]]
) -> None:
    alpha, beta = make_key("alpha"), make_key("beta")
    job_id = client.post(JOBS, json=job_body(), headers=alpha).json()["id"]
    for method, path in _v1_routes(app):
        if "{job_id}" in path:
            r = client.request(method, path.replace("{job_id}", job_id), headers=beta)
            assert r.status_code == 404 and r.json() == {"detail": "job not found"}, (method, path)
    assert client.get(JOBS, headers=beta).json()["data"] == []
    assert client.get(JOBS, params={"after": job_id}, headers=beta).status_code == 400  # not a cursor for beta
    assert client.get(f"{JOBS}/{job_id}", headers=alpha).status_code == 200
    assert client.get(f"{JOBS}/not-a-job-id", headers=alpha).status_code == 404


def test_keys_are_stored_hashed_only(app: FastAPI, make_key: Callable) -> None:
    key = make_key("alpha")["Authorization"].removeprefix("Bearer ")
    with app.state.session_factory() as session:
        row = session.scalars(select(ApiKey)).one()
    assert row.key_hash == hashlib.sha256(key.encode()).hexdigest()
    assert key.startswith(row.prefix + "-")
    stored = [str(getattr(row, c.key)) for c in ApiKey.__table__.columns]
    assert not any(key in value for value in stored)


def test_admin_cli_makes_a_key_printed_once_that_works_and_can_be_revoked(
    client: TestClient, settings: Any, job_body: Callable[..., dict[str, Any]]
) -> None:
    env = {**os.environ, "INVDPO_DATABASE_URL": settings.database_url}
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "services.admin", *args], env=env, capture_output=True, text=True, timeout=60
    )
    made = run("create-key", "--project", "gamma", "--name", "ci")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    prefix = "-".join(key.split("-")[:2])  # invdpo-<8 hex>
    assert made.stdout.count(key) == 1
    auth = {"Authorization": f"Bearer {key}"}
    assert client.post(JOBS, json=job_body(), headers=auth).status_code == 201

    listed = run("list-keys")
    assert prefix in listed.stdout and "gamma" in listed.stdout and key not in listed.stdout
    assert run("revoke-key", prefix).returncode == 0
    assert client.get(JOBS, headers=auth).status_code == 401
    assert run("revoke-key", prefix).returncode == 1


def test_active_job_cap_is_a_429_with_retry_after(
    make_client: Callable[..., TestClient],
    make_key: Callable,
    job_body: Callable[..., dict[str, Any]],
    tmp_path: Any,
) -> None:
    client = make_client(max_active_jobs_per_project=2, retry_after_seconds=30)
    auth, other = make_key("alpha"), make_key("beta")
    # Failed jobs are not active: they do not count.
    client.post(JOBS, json=job_body(training_file=str(tmp_path / "missing.jsonl")), headers=auth)
    first = client.post(JOBS, json=job_body(), headers={**auth, "Idempotency-Key": "k1"}).json()["id"]
    client.post(JOBS, json=job_body(), headers=auth)
    r = client.post(JOBS, json=job_body(), headers=auth)
    assert r.status_code == 429
    assert r.json() == {"detail": "too many active jobs in this project (limit 2)"}
    assert r.headers["Retry-After"] == "30"
    # A retry of an existing job is not a new job; another project has its own cap.
    assert client.post(JOBS, json=job_body(), headers={**auth, "Idempotency-Key": "k1"}).json()["id"] == first
    assert client.post(JOBS, json=job_body(), headers=other).status_code == 201
    client.post(f"{JOBS}/{first}/cancel", headers=auth)
    assert client.post(JOBS, json=job_body(), headers=auth).status_code == 201


def test_body_size_and_metadata_limits(
    make_client: Callable[..., TestClient], make_key: Callable, job_body: Callable[..., dict[str, Any]]
) -> None:
    client = make_client(max_body_bytes=4096, max_active_jobs_per_project=10)
    auth = make_key("alpha")
    big = job_body(metadata={"note": "x" * 500}, suffix="s")
    big["method"]["hyperparameters"]["validation_prompts"] = ["a prompt"] * 500
    r = client.post(JOBS, json=big, headers=auth)
    assert r.status_code == 413 and r.json() == {"detail": "request body too large"}

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams in
        yield json.dumps(big).encode()

    r = client.post(JOBS, content=chunks(), headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json() == {"detail": "request body too large"}

    limit_ok = {f"k{i:02d}" + "x" * 61: "v" * 512 for i in range(16)}
    assert all(len(k) == 64 for k in limit_ok)
    client = make_client(max_active_jobs_per_project=10)
    assert client.post(JOBS, json=job_body(metadata=limit_ok), headers=auth).status_code == 201
    for metadata in (
        {f"k{i}": "v" for i in range(17)},
        {"k" * 65: "v"},
        {"k": "v" * 513},
        {"": "v"},
        {"k": 1},
    ):
        r = client.post(JOBS, json=job_body(metadata=metadata), headers=auth)
        assert r.status_code == 422, metadata
        assert r.json()["detail"][0]["loc"][:2] == ["body", "metadata"]


def test_no_credential_in_responses_or_logs(
    make_client: Callable[..., TestClient],
    settings: Any,
    make_key: Callable,
    job_body: Callable[..., dict[str, Any]],
    json_logs: io.StringIO,
) -> None:
    secrets_ = ["db-password-1", "broker-password-2", "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI-secret"]
    overrides: dict[str, Any] = {"broker_url": "redis://:broker-password-2@127.0.0.1:9/0"}  # nothing listens on 9
    if settings.database_url.startswith("postgresql"):
        # Trust authentication ignores the password, so the app runs with one in its URL.
        overrides["database_url"] = settings.database_url.replace("postgres@", "postgres:db-password-1@")
    client = make_client(**overrides)
    auth = make_key("alpha")
    key = auth["Authorization"].removeprefix("Bearer ")
    responses = []

    job = client.post(JOBS, json=job_body(), headers=auth)  # validates, then cannot reach the broker
    responses.append(job)
    job_id = job.json()["id"]
    factory = client.app.state.session_factory  # type: ignore[attr-defined]
    with factory() as session:
        assert jobstore.get_job(session, job_id).status == "queued"  # type: ignore[union-attr]  # the reconciler's
        jobstore.claim_job(session, job_id, "gpu-0")
        jobstore.add_event(session, job_id, "uploading with aws_secret_access_key=wJalrXUtnFEMI-secret")
        jobstore.add_checkpoint(session, job_id, 1, "s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI-secret@bucket/ckpt-1")
        jobstore.finish_job(
            session,
            job_id,
            "failed",
            {"code": "storage_error", "message": "cannot write postgresql://u:db-password-1@db/x", "param": None},
        )
    logging.getLogger("invdpo.test").error("boom", extra={"url": "redis://:broker-password-2@redis:6379/0"})
    bad = job_body(training_file="s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI-secret@bucket/pairs.jsonl")
    responses.append(client.post(JOBS, json=bad, headers=auth))
    for path in (
        f"{JOBS}/{job_id}",
        f"{JOBS}/{job_id}/events",
        f"{JOBS}/{job_id}/checkpoints",
        JOBS,
        "/readyz",
        "/metrics",
        "/openapi.json",
    ):
        responses.append(client.get(path, headers=auth))
    assert client.get("/readyz").json()["broker"] == "unavailable"
    assert client.get(f"{JOBS}/{job_id}", headers=auth).json()["error"]["message"] == (
        "cannot write postgresql://u:***@db/x"
    )

    logs = json_logs.getvalue()
    assert "could not finish validating or enqueueing" in logs  # the broker failure was logged...
    for secret in [*secrets_, key]:
        assert secret not in logs  # ...without its password
        for r in responses:
            assert secret not in r.text, (r.url, secret)
    for line in logs.splitlines():
        json.loads(line)


def test_mask_secrets() -> None:
    cases = {
        "postgresql+psycopg://invdpo:p%40ss@db:5432/invdpo": "postgresql+psycopg://invdpo:***@db:5432/invdpo",
        "redis://:pw@redis:6379/0": "redis://:***@redis:6379/0",
        "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA1/x&X-Amz-Signature=abc": (
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***"
        ),
        "AWS_SECRET_ACCESS_KEY=abc/def": "AWS_SECRET_ACCESS_KEY=***",
        "Authorization: Bearer invdpo-0a1b2c3d-secretsecret": "Authorization: Bearer ***",
        "key invdpo-0a1b2c3d-secretsecret used": "key invdpo-0a1b2c3d-*** used",
        "s3://bucket/pairs/manifest.jsonl": "s3://bucket/pairs/manifest.jsonl",
    }
    for raw, masked in cases.items():
        assert mask_secrets(raw) == masked


def test_mlflow_loggers_go_through_the_masking_json_handler(caplog):
    import logging

    import mlflow  # noqa: F401  (installs handlers of its own on the "mlflow" logger)

    from services.jobs.logs import adopt_library_loggers

    adopt_library_loggers()
    logger = logging.getLogger("mlflow")
    assert logger.handlers == [] and logger.propagate
    with caplog.at_level(logging.INFO):
        logger.warning("tracking at postgresql://user:s3cret@db/mlflow")
    assert any(r.name == "mlflow" for r in caplog.records)  # it reaches the root handlers, where masking happens
