"""Data confinement and bounded validation on the real stack: moto S3 server, PostgreSQL/SQLite, Redis, and the API
under uvicorn in a process of its own for the acceptance run (its RSS measured while hostile manifests are checked).
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient
from fixtures_s3 import s3_test_client
from PIL import Image

from services.admin import create_api_key, set_allowed_prefixes
from services.admin import main as admin_main
from services.api.settings import Settings
from services.jobs import reconciler
from services.jobs.db import make_engine, make_session_factory
from services.jobs.models import Job
from services.jobs.validation import validate_job_files

JOBS = "/v1/fine_tuning/jobs"
ROOT = Path(__file__).resolve().parents[2]


def png(colour: tuple[int, int, int], size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def record(chosen: str, rejected: str = "b.png") -> bytes:
    return (json.dumps({"prompt": "p", "chosen": chosen, "rejected": rejected}) + "\n").encode()


@pytest.fixture
def s3_model(s3_env: str, s3_server: str, tiny_model: str) -> str:
    """The tiny pipeline under s3://<bucket>/models/tiny."""
    from invdpo_core.storage import upload_dir

    upload_dir(tiny_model, f"s3://{s3_env}/models/tiny")
    return f"s3://{s3_env}/models/tiny"


def put(endpoint: str, bucket: str, objects: dict[str, bytes]) -> None:
    client = s3_test_client(endpoint)
    for key, body in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)


def hostile_manifests(endpoint: str, bucket: str) -> dict[str, str]:
    """name -> s3 URI of a manifest whose `chosen` leaves its prefix; the images beside it are fine."""
    paths = {"dev_zero": "/dev/zero", "etc_passwd": "/etc/passwd", "dotdot": "../other/a.png"}
    objects = {"other/a.png": png((9, 9, 9))}
    for name, chosen in paths.items():
        objects[f"{name}/m.jsonl"] = record(chosen)
        objects[f"{name}/b.png"] = png((0, 0, 255))
    put(endpoint, bucket, objects)
    return {name: f"s3://{bucket}/{name}/m.jsonl" for name in paths}


def wait_terminal(get: Callable[[str], dict[str, Any]], job_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = get(job_id)
        if job["status"] not in ("validating_files",):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still validating after {timeout} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the acceptance run: the API in a process of its own ----------------------------------------------------------


@pytest.fixture
def api_process(
    clean_db: str, redis_url: str, s3_env: str, s3_model: str, tmp_path: Path
) -> Iterator[tuple[str, psutil.Process]]:
    """uvicorn services.api.main:app on a free port, as deployed (local files off), the env pointing at moto."""
    port = free_port()
    env = {
        **os.environ,
        "INVDPO_DATABASE_URL": clean_db,
        "INVDPO_BROKER_URL": redis_url,
        "INVDPO_ALLOW_LOCAL_FILES": "false",
        "INVDPO_RECONCILE_INTERVAL_SECONDS": "0",
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "services.api.main:app", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=tmp_path,  # not the repository: a relative path must not find anything
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, "the API did not start"
            time.sleep(0.1)
        yield url, psutil.Process(proc.pid)
    finally:
        proc.terminate()
        proc.wait(20)


def test_hostile_manifests_fail_their_jobs_while_the_api_stays_up_and_small(
    api_process: tuple[str, psutil.Process], clean_db: str, s3_env: str, s3_server: str, s3_model: str
) -> None:
    url, api = api_process
    engine = make_engine(clean_db)
    with make_session_factory(engine)() as session:
        key, _ = create_api_key(session, "mallory")
    engine.dispose()
    headers = {"Authorization": f"Bearer {key}"}
    manifests = hostile_manifests(s3_server, s3_env)
    body = {"model": s3_model, "method": {"type": "inversion_dpo", "hyperparameters": {"max_steps": 1}}}
    with httpx.Client(base_url=url, headers=headers, timeout=10) as http:
        ids = {}
        for name, uri in manifests.items():
            r = http.post(JOBS, json={**body, "training_file": uri})
            assert r.status_code == 201, r.text
            ids[name] = r.json()["id"]
        # Relative local paths never pass as hub ids (they would probe the API host's directories).
        r = http.post(JOBS, json={**body, "model": "../data", "training_file": manifests["dotdot"]})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "model"]

        peak_rss, health = 0, []
        deadline = time.monotonic() + 120
        jobs: dict[str, dict[str, Any]] = {}
        while len(jobs) < len(ids) and time.monotonic() < deadline:
            peak_rss = max(peak_rss, api.memory_info().rss)
            health.append(http.get("/healthz").status_code)
            for name, job_id in ids.items():
                job = http.get(f"{JOBS}/{job_id}").json()
                if job["status"] != "validating_files":
                    jobs[name] = job
            time.sleep(0.2)
        peak_rss = max(peak_rss, api.memory_info().rss)
    print(f"API peak RSS {peak_rss / 2**20:.0f} MiB over {len(health)} health checks, all {set(health)}")
    assert api.is_running() and set(health) == {200}
    assert peak_rss < 1 << 30
    assert set(jobs) == set(ids), "some jobs are still validating"
    for name, chosen in (("dev_zero", "/dev/zero"), ("etc_passwd", "/etc/passwd"), ("dotdot", "../other/a.png")):
        job = jobs[name]
        assert job["status"] == "failed", job
        assert job["error"]["code"] == "bad_image_path" and job["error"]["param"] == "training_file"
        assert f"{manifests[name]} line 1: field 'chosen' '{chosen}'" in job["error"]["message"]
        assert "root:" not in job["error"]["message"]  # nothing of the host file


# --- per-project prefixes -----------------------------------------------------------------------------------------


def test_a_project_limited_to_prefixes_cannot_name_anything_outside_them(
    client: TestClient,
    make_key: Callable[[str], dict[str, str]],
    s3_env: str,
    s3_server: str,
    s3_model: str,
    capsys: pytest.CaptureFixture[str],
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    alpha = make_key("alpha")
    put(s3_server, s3_env, {"alpha/m.jsonl": record("a.png"), "alpha/a.png": png((255, 0, 0))})
    put(s3_server, s3_env, {"alpha/b.png": png((0, 0, 255)), "beta/m.jsonl": record("a.png")})
    # Set with the admin CLI, as an operator would.
    monkeypatch.setenv("INVDPO_DATABASE_URL", settings.database_url)
    from services.api.settings import get_settings

    get_settings.cache_clear()
    try:
        prefixes = [f"s3://{s3_env}/alpha/", f"s3://{s3_env}/models"]
        assert admin_main(["set-prefixes", "--project", "alpha", *prefixes]) == 0
        assert admin_main(["set-prefixes", "--project", "alpha", "/etc"]) == 1
    finally:
        get_settings.cache_clear()
    out, err = capsys.readouterr()
    assert f"project alpha: s3://{s3_env}/alpha, s3://{s3_env}/models" in out
    assert err.startswith("error: ") and "not an s3:// URI" in err

    body = {"method": {"type": "inversion_dpo", "hyperparameters": {"max_steps": 1}}}
    inside = {**body, "model": s3_model, "training_file": f"s3://{s3_env}/alpha/m.jsonl"}
    assert client.post(JOBS, json=inside, headers=alpha).status_code == 201
    outside = [
        ("training_file", f"s3://{s3_env}/beta/m.jsonl"),
        ("training_file", f"s3://{s3_env}/alpha2/m.jsonl"),  # a sibling sharing the name's start
        ("training_file", f"s3://{s3_env}/alpha/../beta/m.jsonl"),
        ("validation_file", f"s3://{s3_env}/beta/m.jsonl"),
        ("model", f"s3://{s3_env}/jobs/ftjob-other/model"),  # another project's fine-tuned model
    ]
    for field, uri in outside:
        r = client.post(JOBS, json={**inside, field: uri}, headers=alpha)
        assert r.status_code == 422, (field, uri, r.text)
        (error,) = r.json()["detail"]
        assert error["loc"] == ["body", field] and "must lie under one of this project's prefixes" in error["msg"]
    # Other projects are not limited by alpha's setting.
    beta = make_key("beta")
    elsewhere = {**inside, "training_file": f"s3://{s3_env}/beta/m.jsonl"}
    assert client.post(JOBS, json=elsewhere, headers=beta).status_code == 201


def test_prefixes_are_normalised_and_compared_by_whole_segments(app: Any) -> None:
    from invdpo_core.storage import within_prefixes

    with app.state.session_factory() as session:
        stored = set_allowed_prefixes(session, "p", ["s3://bkt/team/", "s3://bkt/team", "s3://ccc"])
        assert stored == ["s3://bkt/team", "s3://ccc"]
        with pytest.raises(ValueError):
            set_allowed_prefixes(session, "p", ["s3://bkt/../x"])
    assert within_prefixes("s3://bkt/team/x.jsonl", stored) and within_prefixes("s3://ccc/any/thing", stored)
    assert not within_prefixes("s3://bkt/team2/x", stored) and not within_prefixes("/bkt/team/x", stored)
    assert not within_prefixes("s3://bkt/team/../other/x", stored)


# --- bounded validation -------------------------------------------------------------------------------------------


def test_validation_that_cannot_finish_fails_the_job_with_a_reason(
    make_client: Callable[..., TestClient],
    make_key: Callable[[str], dict[str, str]],
    s3_env: str,
    s3_model: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A store that accepts connections and never answers: only the deadline ends the check.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    client = make_client(validation_timeout_seconds=8)
    auth = make_key("alpha")
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{silent.getsockname()[1]}")
        body = {"model": s3_model, "training_file": f"s3://{s3_env}/d/m.jsonl"}
        r = client.post(JOBS, json={**body, "method": {"type": "inversion_dpo"}}, headers=auth)
        job = wait_terminal(lambda i: client.get(f"{JOBS}/{i}", headers=auth).json(), r.json()["id"], timeout=60)
    finally:
        silent.close()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "validation_timeout"
    assert "took longer than the 8 s limit" in job["error"]["message"]
    assert "127.0.0.1" not in json.dumps(job)


def test_an_image_that_decodes_to_more_than_the_memory_limit_fails_its_job(
    make_client: Callable[..., TestClient],
    make_key: Callable[[str], dict[str, str]],
    s3_env: str,
    s3_server: str,
    s3_model: str,
) -> None:
    # 340 KB of PNG that decodes to 350 MB (9400 x 9400 RGBA): under the 32 MiB read cap, over the check's memory.
    buf = io.BytesIO()
    Image.new("RGBA", (9400, 9400)).save(buf, format="PNG")
    put(s3_server, s3_env, {"d/m.jsonl": record("a.png"), "d/a.png": buf.getvalue(), "d/b.png": png((0, 0, 255))})
    client = make_client(validation_memory_bytes=400 << 20)
    auth = make_key("alpha")
    body = {"model": s3_model, "training_file": f"s3://{s3_env}/d/m.jsonl", "method": {"type": "inversion_dpo"}}
    job_id = client.post(JOBS, json=body, headers=auth).json()["id"]
    job = wait_terminal(lambda i: client.get(f"{JOBS}/{i}", headers=auth).json(), job_id)
    assert job["status"] == "failed", job
    assert job["error"]["code"] in ("too_many_bad_images", "validation_resources"), job["error"]
    assert "memory limit" in job["error"]["message"]


def test_a_job_whose_check_keeps_dying_ends_failed_after_max_attempts(
    client: TestClient, make_key: Callable[[str], dict[str, str]], job_body: Callable[..., dict[str, Any]]
) -> None:
    """As after an API killed mid-check: the job stays validating_files and the reconciler re-validates it; each
    attempt is counted before it starts, so a check that kills its process cannot loop for ever."""
    app = client.app
    auth = make_key("alpha")
    settings: Settings = app.state.settings  # type: ignore[attr-defined]
    factory = app.state.session_factory  # type: ignore[attr-defined]
    job_id = client.post(JOBS, json=job_body(), headers=auth).json()["id"]
    wait_terminal(lambda i: client.get(f"{JOBS}/{i}", headers=auth).json(), job_id)
    with factory() as session:  # back to validating, as if every check so far had died with its process
        job = session.get(Job, job_id)
        job.status, job.validation_attempts, job.dispatched_at = "validating_files", settings.max_attempts, None
        session.commit()
    report = reconciler.run_once(
        factory,
        settings.model_copy(update={"reconcile_after_seconds": 0.001}),
        app.state.celery,  # type: ignore[attr-defined]
    )
    assert report.revalidate == [job_id]
    job_out = client.get(f"{JOBS}/{job_id}", headers=auth).json()
    assert job_out["status"] == "failed"
    assert job_out["error"]["code"] == "validation_incomplete"
    assert f"did not finish in {settings.max_attempts} attempts" in job_out["error"]["message"]
    # Below the bound the same job would have been checked (and queued): attempts are counted, not refused.
    with factory() as session:
        job = session.get(Job, job_id)
        job.status, job.validation_attempts = "validating_files", 0
        session.commit()
    validate_job_files(factory, job_id, settings, celery=app.state.celery)  # type: ignore[attr-defined]
    assert client.get(f"{JOBS}/{job_id}", headers=auth).json()["status"] == "queued"
