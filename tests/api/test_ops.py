"""Operations: health and readiness probes, Prometheus metrics, request ids, JSON logs, OpenAPI docs."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient

from services.api.settings import Settings, get_settings
from services.jobs.logs import JsonFormatter

JOBS = "/v1/fine_tuning/jobs"


def test_healthz_and_readyz(client: TestClient, make_client: Callable[..., TestClient]) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "database": None, "broker": None}
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "database": "ok", "broker": "ok"}

    down = make_client(broker_url="redis://127.0.0.1:9/0")  # nothing listens on port 9
    r = down.get("/readyz")
    assert r.status_code == 503
    assert r.json() == {"status": "unavailable", "database": "ok", "broker": "unavailable"}
    assert down.get("/healthz").status_code == 200  # liveness does not depend on the broker


def test_metrics_expose_latency_by_route_and_jobs_by_status(
    client: TestClient, auth: dict[str, str], job_body: Callable[..., dict[str, Any]], tmp_path: Any
) -> None:
    job_id = client.post(JOBS, json=job_body(), headers=auth).json()["id"]
    client.post(JOBS, json=job_body(training_file=str(tmp_path / "gone.jsonl")), headers=auth)
    client.get(f"{JOBS}/{job_id}", headers=auth)
    client.get(f"{JOBS}/ftjob-{'0' * 24}", headers=auth)
    text = client.get("/metrics").text
    assert 'invdpo_jobs{status="queued"} 1.0' in text
    assert 'invdpo_jobs{status="failed"} 1.0' in text
    assert 'invdpo_jobs{status="running"} 0.0' in text
    bucket = 'invdpo_http_request_duration_seconds_bucket{le="0.05",method="GET",route="/v1/fine_tuning/jobs/{job_id}"'
    assert bucket + ',status="200"}' in text
    assert 'route="/v1/fine_tuning/jobs/{job_id}",status="404"' in text
    assert "ftjob-" not in text  # raw paths never become label values


def test_request_id_is_echoed_or_made_and_logged(client: TestClient) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logging.getLogger().addHandler(handler)
    try:
        given = client.get("/healthz", headers={"X-Request-ID": "req-123.abc"})
        made = client.get("/healthz", headers={"X-Request-ID": "not ok"})
    finally:
        logging.getLogger().removeHandler(handler)
    assert given.headers["X-Request-ID"] == "req-123.abc"
    assert len(made.headers["X-Request-ID"]) == 32 and made.headers["X-Request-ID"] != "not ok"
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    access = [line for line in lines if line["logger"] == "invdpo.access"]
    assert [line["request_id"] for line in access] == ["req-123.abc", made.headers["X-Request-ID"]]
    assert access[0]["path"] == "/healthz" and access[0]["status"] == 200 and "duration_ms" in access[0]


def test_openapi_and_docs(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]) >= {
        "/v1/fine_tuning/jobs",
        "/v1/fine_tuning/jobs/{job_id}",
        "/v1/fine_tuning/jobs/{job_id}/cancel",
        "/v1/fine_tuning/jobs/{job_id}/pause",
        "/v1/fine_tuning/jobs/{job_id}/resume",
        "/v1/fine_tuning/jobs/{job_id}/events",
        "/v1/fine_tuning/jobs/{job_id}/events/stream",
        "/v1/fine_tuning/jobs/{job_id}/checkpoints",
        "/healthz",
        "/readyz",
    }
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_settings_read_the_environment(monkeypatch: Any) -> None:
    monkeypatch.setenv("INVDPO_DATABASE_URL", "postgresql+psycopg://db/invdpo")
    monkeypatch.setenv("INVDPO_MAX_ACTIVE_JOBS_PER_PROJECT", "9")
    monkeypatch.setenv("INVDPO_RECONCILE_INTERVAL_SECONDS", "15")
    get_settings.cache_clear()
    try:
        settings = get_settings()
        assert settings.database_url == "postgresql+psycopg://db/invdpo"
        assert settings.max_active_jobs_per_project == 9 and settings.reconcile_interval_seconds == 15
        assert get_settings() is settings  # cached
    finally:
        get_settings.cache_clear()
    for name in ("INVDPO_DATABASE_URL", "INVDPO_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    defaults = Settings()
    assert defaults.database_url == "sqlite:///./invdpo.db" and defaults.broker_url == "redis://127.0.0.1:6379/0"
    # Every setting is named in the class docstring (the deploy charts are checked against it).
    for name in Settings.model_fields:
        assert f"INVDPO_{name.upper()}" in (Settings.__doc__ or ""), name
