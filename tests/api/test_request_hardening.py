"""No request takes the API down or reads as a 500: deep nesting, bad encodings, bad stream cursors, loose types;
a per-key rate limit shared by replicas through Redis; and job errors that give reasons, never internals."""

from __future__ import annotations

import io
import json
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from fixtures_s3 import s3_test_client
from PIL import Image

JOBS = "/v1/fine_tuning/jobs"


def nested(depth: int) -> str:
    """JSON text nesting `depth` deep, objects and arrays alternating (built as text: json.dumps recurses too)."""
    return '{"a": [' * (depth // 2) + "1" + "]}" * (depth // 2)


@pytest.mark.parametrize("depth", [400, 900, 5000])
def test_deeply_nested_json_is_a_400_not_a_500(
    client: TestClient, auth: dict[str, str], job_body: Callable[..., dict[str, Any]], depth: int
) -> None:
    hyperparameters = {"type": "inversion_dpo", "hyperparameters": {"adapter": "NESTED"}}
    bodies = [
        json.dumps(job_body(metadata="NESTED")).replace('"NESTED"', nested(depth)),
        json.dumps(job_body(method=hyperparameters)).replace('"NESTED"', nested(depth)),
        nested(depth),
    ]
    headers = {**auth, "Content-Type": "application/json"}
    for body in bodies:
        r = client.post(JOBS, content=body, headers=headers)
        assert r.status_code == 400, r.text
        assert r.json() == {"detail": "request body nests deeper than 32 levels"}
    assert client.post("/v1/models/m/promote", content=nested(depth), headers=headers).status_code == 400
    # Brackets inside strings are text, not nesting.
    body = job_body(metadata={"k": "{" * 100, "v": '["[' * 40})
    assert client.post(JOBS, json=body, headers=auth).status_code == 201


@pytest.mark.parametrize(
    "raw", [b'{"model": "\xff\xfe"}', '{"model": "é"}'.encode("latin-1"), '{"model": "x"}'.encode("utf-16")]
)
def test_a_body_that_is_not_utf8_is_a_400(client: TestClient, auth: dict[str, str], raw: bytes) -> None:
    r = client.post(JOBS, content=raw, headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json() == {"detail": "request body is not valid UTF-8"}


def test_a_bad_last_event_id_is_a_400_before_the_stream_starts(
    client: TestClient, auth: dict[str, str], job_body: Callable[..., dict[str, Any]]
) -> None:
    job_id = client.post(JOBS, json=job_body(), headers=auth).json()["id"]
    for bad in ("ftevent-x", "garbage", "ftevent-" + "9" * 30, "-1"):
        r = client.get(f"{JOBS}/{job_id}/events/stream", headers={**auth, "Last-Event-ID": bad})
        assert r.status_code == 400 and r.json() == {"detail": "invalid cursor"}, (bad, r.text)
        assert not r.headers["content-type"].startswith("text/event-stream")
        r = client.get(f"{JOBS}/{job_id}/events/stream", params={"after": bad}, headers=auth)
        assert r.status_code == 400


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("gradient_checkpointing", "yes"),
        ("gradient_checkpointing", 1),
        ("max_steps", True),
        ("max_steps", "10"),
        ("max_steps", 10.0),
        ("beta", True),
        ("beta", "2000"),
        ("validation_prompts", "a cat"),
    ],
)
def test_hyperparameters_are_strictly_typed(
    client: TestClient, auth: dict[str, str], job_body: Callable[..., dict[str, Any]], field: str, value: Any
) -> None:
    body = job_body(method={"type": "inversion_dpo", "hyperparameters": {"max_steps": 10, field: value}})
    r = client.post(JOBS, json=body, headers=auth)
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "method", "hyperparameters", field]
    # Still accepted: an int where a float is meant.
    ok = job_body(method={"type": "inversion_dpo", "hyperparameters": {"max_steps": 10, "beta": 2000}})
    assert client.post(JOBS, json=ok, headers=auth).status_code == 201


def test_the_rate_limit_is_per_key_and_shared_by_replicas_through_redis(
    make_client: Callable[..., TestClient],
    make_key: Callable[[str], dict[str, str]],
    broker: redis.Redis,
) -> None:
    # Two API instances (replicas) on the same database and the same Redis.
    first = make_client(rate_limit_requests=5, rate_limit_window_seconds=60)
    second = make_client(rate_limit_requests=5, rate_limit_window_seconds=60)
    alpha, beta = make_key("alpha"), make_key("beta")
    statuses = [c.get(JOBS, headers=alpha).status_code for c in (first, second, first, second, first)]
    assert statuses == [200] * 5
    for replica in (first, second):
        r = replica.get(JOBS, headers=alpha)
        assert r.status_code == 429 and r.json() == {"detail": "too many requests for this API key"}
        assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert second.get(JOBS, headers=beta).status_code == 200  # another key has its own budget
    assert first.get("/healthz").status_code == 200  # unauthenticated probes are not limited
    assert any(k.startswith(b"invdpo:ratelimit:") for k in broker.keys("invdpo:ratelimit:*"))


def test_the_rate_limit_window_ends(
    make_client: Callable[..., TestClient], make_key: Callable[[str], dict[str, str]]
) -> None:
    client = make_client(rate_limit_requests=1, rate_limit_window_seconds=2)
    alpha = make_key("alpha")
    # The first 429 itself: a further request could already fall in the next window (and pass, with no Retry-After).
    while (r := client.get(JOBS, headers=alpha)).status_code == 200:
        pass
    wait = int(r.headers["Retry-After"])
    assert r.status_code == 429 and 1 <= wait <= 2
    time.sleep(wait + 0.1)
    assert client.get(JOBS, headers=alpha).status_code == 200


def test_an_unreachable_rate_limit_store_lets_requests_through(
    make_client: Callable[..., TestClient], make_key: Callable[[str], dict[str, str]]
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    client = make_client(rate_limit_requests=1, rate_limit_redis_url=f"redis://127.0.0.1:{closed}/0")
    alpha = make_key("alpha")
    assert [client.get(JOBS, headers=alpha).status_code for _ in range(3)] == [200, 200, 200]


# --- reasons, not internals ---------------------------------------------------------------------------------------


def _failed_error(client: TestClient, auth: dict[str, str], body: dict[str, Any]) -> tuple[dict[str, Any], str]:
    r = client.post(JOBS, json=body, headers=auth)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    for _ in range(600):
        job = client.get(f"{JOBS}/{job_id}", headers=auth).json()
        if job["status"] != "validating_files":
            break
        time.sleep(0.1)
    events = client.get(f"{JOBS}/{job_id}/events", headers=auth).json()["data"]
    assert job["status"] == "failed", job
    return job["error"], json.dumps([job, events])


def test_job_errors_name_the_reason_and_no_internal_host_port_or_path(
    client: TestClient,
    auth: dict[str, str],
    s3_env: str,
    s3_server: str,
    tiny_model: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from invdpo_core.storage import upload_dir

    upload_dir(tiny_model, f"s3://{s3_env}/models/tiny")
    model = f"s3://{s3_env}/models/tiny"
    s3 = s3_test_client(s3_server)
    s3.put_object(Bucket=s3_env, Key="d/m.jsonl", Body=b'{"prompt": "p", "chosen": "a.png", "rejected": "b.png"}\n')
    s3.put_object(Bucket=s3_env, Key="d/a.png", Body=b"not an image at all")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    s3.put_object(Bucket=s3_env, Key="d/b.png", Body=buf.getvalue())
    body = {"model": model, "method": {"type": "inversion_dpo", "hyperparameters": {"max_steps": 1}}}
    server_port = s3_server.rsplit(":", 1)[1]

    error, text = _failed_error(client, auth, {**body, "training_file": f"s3://{s3_env}/d/missing.jsonl"})
    assert error == {
        "code": "dataset_not_found",
        "message": f"s3://{s3_env}/d/missing.jsonl: no such file, directory or s3 prefix",
        "param": "training_file",
    }
    error, text = _failed_error(client, auth, {**body, "training_file": f"s3://{s3_env}/d/m.jsonl"})
    assert error["code"] == "too_many_bad_images"
    assert (
        f"s3://{s3_env}/d/m.jsonl line 1 chosen: unreadable image (not a recognised image format)" in error["message"]
    )
    assert "Traceback" not in text and "/tmp" not in text and server_port not in text

    # The store goes down: a reason, without its address.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{closed}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    error, text = _failed_error(client, auth, {**body, "training_file": f"s3://{s3_env}/d/m.jsonl"})
    assert error["code"] == "model_unreachable" and error["param"] == "model"
    assert (
        error["message"]
        == f"base model s3://{s3_env}/models/tiny/model_index.json: cannot reach S3 (EndpointConnectionError)"
    )
    for internal in ("127.0.0.1", str(closed), "Traceback", "http://"):
        assert internal not in text, internal
