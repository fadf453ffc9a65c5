"""The worker reads only what the job may read, even when the data changes after the API validated it: the real
API, a Celery worker process, Redis, PostgreSQL, moto S3 and an MLflow server (tests/worker/conftest.py)."""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from pathlib import Path

import pytest
from conftest import Workers
from fastapi.testclient import TestClient
from fixtures_s3 import s3_test_client
from PIL import Image
from test_worker_e2e import create_job, events, wait_for

from invdpo_core.storage import download_prefix, upload_dir
from services.admin import set_allowed_prefixes
from services.jobs.models import Job, Project

pytestmark = pytest.mark.slow


def test_a_manifest_rewritten_after_validation_to_read_the_workers_disk_fails_the_job(
    api: TestClient,
    auth: dict[str, str],
    workers: Workers,
    tiny_model_uri: str,
    toy_dataset_uri: str,
    bucket: str,
    tmp_path: Path,
) -> None:
    """Today's attack: absolute paths inside an S3 manifest, read by the worker from its own disk."""
    on_worker_disk = tmp_path / "host.png"
    Image.new("RGB", (64, 64), (255, 0, 0)).save(on_worker_disk)
    s3 = s3_test_client(os.environ["AWS_ENDPOINT_URL_S3"])
    # A copy of the toy dataset of its own, rewritten once the API has validated it.
    prefix = f"data/rewritten-{uuid.uuid4().hex[:6]}"
    with tempfile.TemporaryDirectory() as tmp:
        download_prefix(toy_dataset_uri.rsplit("/", 1)[0], tmp)
        manifest = (Path(tmp) / "manifest.jsonl").read_text()
        upload_dir(tmp, f"s3://{bucket}/{prefix}")
    job_id = create_job(api, auth, tiny_model_uri, f"s3://{bucket}/{prefix}/manifest.jsonl", max_steps=3)
    wait_for(api, auth, job_id, {"queued"}, workers, timeout=60)
    hostile = "".join(
        json.dumps({**json.loads(line), "chosen": str(on_worker_disk)}) + "\n" for line in manifest.splitlines()
    )
    s3.put_object(Bucket=bucket, Key=f"{prefix}/manifest.jsonl", Body=hostile.encode())
    workers.start()
    job = wait_for(api, auth, job_id, {"succeeded", "failed", "cancelled"}, workers)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "bad_image_path" and job["error"]["param"] == "training_file"
    assert f"field 'chosen' '{on_worker_disk}' is absolute or a URI" in job["error"]["message"]


def test_prefixes_set_after_the_job_was_created_are_enforced_by_the_worker(
    api: TestClient, auth: dict[str, str], workers: Workers, tiny_model_uri: str, toy_dataset_uri: str
) -> None:
    job_id = create_job(api, auth, tiny_model_uri, toy_dataset_uri, max_steps=3)
    wait_for(api, auth, job_id, {"queued"}, workers, timeout=60)
    model_bucket = tiny_model_uri.removeprefix("s3://").split("/", 1)[0]
    factory = api.app.state.session_factory  # type: ignore[attr-defined]
    with factory() as session:
        project = session.get(Project, session.get(Job, job_id).project_id)  # type: ignore[union-attr]
        name = project.name  # type: ignore[union-attr]
        set_allowed_prefixes(session, name, [tiny_model_uri, f"s3://{model_bucket}/nothing-here"])
    workers.start()
    job = wait_for(api, auth, job_id, {"succeeded", "failed", "cancelled"}, workers)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "forbidden_prefix" and job["error"]["param"] == "training_file"
    assert job["error"]["message"] == f"{toy_dataset_uri}: not under this project's prefixes"
    assert all(e["type"] != "metrics" for e in events(api, auth, job_id))  # not one step trained
