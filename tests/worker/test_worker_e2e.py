"""The worker end to end: the real API, Celery worker processes, Redis, PostgreSQL, moto S3 and an MLflow server.

Each test trains the tiny SD1.5-shaped model on the toy dataset for a few dozen 64 px steps. Slow (the training
process alone takes 10-20 s to import torch, diffusers and MLflow on a shared 2-core machine).
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import JOBS, ROOT, RedisServer, Workers, free_port, report, wait_until
from fastapi.testclient import TestClient
from fixtures_s3 import s3_test_client
from mlflow import MlflowClient
from PIL import Image

from invdpo_core.storage import download_prefix, upload_dir
from services.jobs.models import Job

pytestmark = pytest.mark.slow

HYPERPARAMETERS = {
    "resolution": 64,
    "inversion_steps": 8,
    "learning_rate": 1e-4,
    "beta": 2000,
    "checkpoint_interval": 5,
    "checkpoints_to_keep": 2,
}


def create_job(api: TestClient, auth: dict[str, str], model: str, dataset: str, **hyperparameters: Any) -> str:
    body = {
        "model": model,
        "training_file": dataset,
        "method": {"type": "inversion_dpo", "hyperparameters": {**HYPERPARAMETERS, **hyperparameters}},
        "seed": 0,
        "registered_model_name": f"worker-test-{uuid.uuid4().hex[:8]}",
    }
    response = api.post(JOBS, json=body, headers=auth)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def get_job(api: TestClient, auth: dict[str, str], job_id: str) -> dict[str, Any]:
    return dict(api.get(f"{JOBS}/{job_id}", headers=auth).json())


def wait_for(
    api: TestClient, auth: dict[str, str], job_id: str, statuses: set[str], workers: Workers, timeout: float = 180
) -> dict[str, Any]:
    try:
        return dict(
            wait_until(lambda: (j := get_job(api, auth, job_id))["status"] in statuses and j, timeout, str(statuses))
        )
    except AssertionError:
        events = api.get(f"{JOBS}/{job_id}/events", params={"limit": 100}, headers=auth).json()["data"]
        job = get_job(api, auth, job_id)
        raise AssertionError(
            f"job {job['status']} (step {job['step']}), not {statuses}\n"
            + "\n".join(e["message"][:300] for e in events)
            + "\n"
            + workers.tails()
        ) from None


def wait_for_step(api: TestClient, auth: dict[str, str], job_id: str, step: int, timeout: float = 180) -> None:
    """Until the job has a stored checkpoint at `step` or later (its row is written once the upload is complete)."""

    def reached() -> bool:
        checkpoints = api.get(f"{JOBS}/{job_id}/checkpoints", headers=auth).json()["data"]
        assert get_job(api, auth, job_id)["status"] in ("queued", "running"), get_job(api, auth, job_id)
        return any(c["step_number"] >= step for c in checkpoints)

    wait_until(reached, timeout, f"a checkpoint at step {step}")


def events(api: TestClient, auth: dict[str, str], job_id: str) -> list[dict[str, Any]]:
    return list(api.get(f"{JOBS}/{job_id}/events", params={"limit": 100}, headers=auth).json()["data"])


def test_job_succeeds_tracked_in_mlflow_registered_promoted_and_served(
    api: TestClient, auth: dict[str, str], workers: Workers, tiny_model_uri: str, toy_dataset_uri: str,
    mlflow_server: str,
) -> None:  # fmt: skip
    workers.start()
    job_id = create_job(
        api, auth, tiny_model_uri, toy_dataset_uri, max_steps=12,
        validation_prompts=["a red apple", "a blue car"], validation_interval=6, validation_inference_steps=2,
    )  # fmt: skip
    job = wait_for(api, auth, job_id, {"succeeded", "failed", "cancelled"}, workers)
    assert job["status"] == "succeeded", job
    assert (job["step"], job["total_steps"]) == (12, 12)
    name = job["fine_tuned_model"].split("/")[1]
    assert job["fine_tuned_model"] == f"models:/{name}/{job['registered_model_version']}"
    checkpoints = api.get(f"{JOBS}/{job_id}/checkpoints", headers=auth).json()["data"]
    assert [c["step_number"] for c in checkpoints] == [10, 12]  # checkpoints_to_keep 2: step 5 was pruned
    assert all(c["uri"].endswith(f"/{job_id}/checkpoints/checkpoint-{c['step_number']}") for c in checkpoints)
    assert any(e["type"] == "metrics" and "implicit_acc" in e["data"] for e in events(api, auth, job_id))

    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(job["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["job_id"] == job_id
    assert run.data.tags["dataset_uri"] == toy_dataset_uri and len(run.data.tags["dataset_sha256"]) == 64
    assert run.data.tags["base_model"] == tiny_model_uri and run.data.tags["code_version"].startswith("0.1.0")
    assert run.data.params["max_steps"] == "12" and run.data.params["adapter.type"] == "full"
    for metric in ("loss", "implicit_acc", "rewards/margins", "lr", "grad_norm", "pairs_per_s"):
        history = client.get_metric_history(run.info.run_id, metric)
        assert sorted({m.step for m in history}) == list(range(1, 13)), metric
    assert any(key.startswith("system/") for key in run.data.metrics), sorted(run.data.metrics)
    grids = [a.path for a in client.list_artifacts(run.info.run_id, "validation")]
    assert grids == ["validation/step-000006.png", "validation/step-000012.png"]
    grid = Image.open(client.download_artifacts(run.info.run_id, grids[0]))
    assert grid.size == (128, 64)  # two 64 px samples side by side

    versions = client.search_model_versions(f"name = '{name}'")
    assert [str(v.version) for v in versions] == [job["registered_model_version"]]
    assert versions[0].tags["job_id"] == job_id  # (search results carry no aliases)
    assert str(client.get_model_version_by_alias(name, "candidate").version) == job["registered_model_version"]

    # Promote through the API, then serve the champion with MLflow's own scoring server.
    response = api.post(f"/v1/models/{name}/promote", json={"version": int(versions[0].version)}, headers=auth)
    assert response.status_code == 200, response.text
    assert response.json()["model_uri"] == f"models:/{name}@champion"
    assert str(client.get_model_version_by_alias(name, "champion").version) == str(versions[0].version)
    assert api.post(f"/v1/models/{name}/promote", json={"version": 99}, headers=auth).status_code == 404

    port = free_port()
    serve = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        # The scoring server is `exec uvicorn ...`: this environment's bin directory must be on PATH.
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server,
             "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"},
        cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:

        def answers() -> bytes | None:
            assert serve.poll() is None, "mlflow models serve exited"
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations",
                data=b'{"dataframe_records": [{"prompt": "a red apple", "seed": 3, "steps": 2}]}',
                headers={"Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=60) as answer:
                    return bytes(answer.read())
            except OSError:
                return None

        predictions = json.loads(wait_until(answers, 180, "mlflow models serve", interval=1))["predictions"]
        image = Image.open(io.BytesIO(base64.b64decode(predictions[0]["image"])))
        assert image.format == "PNG" and image.size == (64, 64)
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(30)


def test_cancel_during_training_stops_within_10_s_and_keeps_checkpoints(
    api: TestClient, auth: dict[str, str], workers: Workers, tiny_model_uri: str, toy_dataset_uri: str,
    mlflow_server: str,
) -> None:  # fmt: skip
    workers.start()
    job_id = create_job(api, auth, tiny_model_uri, toy_dataset_uri, max_steps=2000)
    wait_for_step(api, auth, job_id, 5)
    t0 = time.monotonic()
    assert api.post(f"{JOBS}/{job_id}/cancel", headers=auth).json()["status"] == "cancel_requested"
    job = wait_for(api, auth, job_id, {"cancelled", "failed", "succeeded"}, workers, timeout=10)
    assert job["status"] == "cancelled", job
    assert time.monotonic() - t0 < 10
    checkpoints = api.get(f"{JOBS}/{job_id}/checkpoints", headers=auth).json()["data"]
    assert checkpoints and checkpoints[-1]["step_number"] >= 5
    assert MlflowClient(tracking_uri=mlflow_server).get_run(job["mlflow_run_id"]).info.status == "KILLED"


@pytest.mark.shipped_timeouts  # what a deployment gets: the default heartbeat, heartbeat timeout and reconcile loop
def test_sigkill_of_the_worker_then_a_new_worker_resumes_from_the_last_checkpoint(
    api: TestClient, auth: dict[str, str], workers: Workers, tiny_model_uri: str, toy_dataset_uri: str,
    mlflow_server: str,
) -> None:  # fmt: skip
    first = workers.start()
    max_steps = 40
    job_id = create_job(api, auth, tiny_model_uri, toy_dataset_uri, max_steps=max_steps, checkpoint_interval=10)
    wait_for_step(api, auth, job_id, 10)
    first.kill(signal.SIGKILL)  # the Celery main process, its pool process and the training process
    killed_t = time.monotonic()
    first.proc.wait(30)
    killed_at = get_job(api, auth, job_id)
    assert killed_at["status"] == "running" and killed_at["step"] < max_steps, killed_at
    stored = [c["step_number"] for c in api.get(f"{JOBS}/{job_id}/checkpoints", headers=auth).json()["data"]]

    workers.start()  # a new machine: empty work dir, restores from the object store
    claimed: list[float] = []  # when the new worker claimed the job (attempt 2)

    def progressed() -> bool:
        if not claimed:
            with api.app.state.session_factory() as session:  # type: ignore[attr-defined]
                if session.get(Job, job_id).attempt == 2:  # type: ignore[union-attr]
                    claimed.append(time.monotonic() - killed_t)
        return bool(get_job(api, auth, job_id)["step"] != killed_at["step"])

    wait_until(progressed, 240, "progress after the kill")
    resumed_s = time.monotonic() - killed_t
    print(f"SIGKILL, shipped timeouts: claimed again after {claimed[0]:.1f} s, progress after {resumed_s:.1f} s")
    # The shipped heartbeat timeout and reconcile interval (40 + 5 s) leave the new training process time to start.
    assert resumed_s < 90, resumed_s
    job = wait_for(api, auth, job_id, {"succeeded", "failed", "cancelled"}, workers, timeout=240)
    assert job["status"] == "succeeded", job
    assert (job["step"], job["total_steps"]) == (max_steps, max_steps)
    messages = [e["message"] for e in events(api, auth, job_id)]
    resumed = [m for m in messages if m.startswith("Resuming from the checkpoint of step")]
    assert resumed == [f"Resuming from the checkpoint of step {max(stored)}"], messages
    report("whole worker SIGKILLed", outcome=job["status"], steps_lost=killed_at["step"] - max(stored),
           seconds_to_claim=round(claimed[0], 1), seconds_to_progress=round(resumed_s, 1))  # fmt: skip
    assert any("(attempt 2)" in m for m in messages)

    client = MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("worker-tests").experiment_id],
                              filter_string=f"tags.job_id = '{job_id}'")  # fmt: skip
    assert [r.info.run_id for r in runs] == [job["mlflow_run_id"]]
    # Every step trained and logged once: the steps retrained after the last checkpoint are not logged again.
    steps = [m.step for m in client.get_metric_history(job["mlflow_run_id"], "loss")]
    assert sorted(steps) == list(range(1, max_steps + 1))
    name = job["fine_tuned_model"].split("/")[1]
    assert len(client.search_model_versions(f"name = '{name}'")) == 1


def test_redis_restart_while_a_job_is_queued_the_job_still_runs(
    api: TestClient, auth: dict[str, str], workers: Workers, tiny_model_uri: str, toy_dataset_uri: str,
    redis_server: RedisServer,
) -> None:  # fmt: skip
    job_id = create_job(api, auth, tiny_model_uri, toy_dataset_uri, max_steps=3)
    wait_for(api, auth, job_id, {"queued"}, workers, timeout=30)
    assert redis_server.url and wait_until(lambda: _queued_in_redis(redis_server, job_id), 10, "the message")
    redis_server.restart()  # no persistence: the message is gone
    assert not _queued_in_redis(redis_server, job_id)
    worker = workers.start()
    job = wait_for(api, auth, job_id, {"succeeded", "failed", "cancelled"}, workers)
    assert job["status"] == "succeeded", job
    # The liveness file the container probes read: touched by the worker while it lives.
    assert time.time() - (workers.root / "hb-0").stat().st_mtime < 5 and worker.proc.poll() is None


def _queued_in_redis(server: RedisServer, job_id: str) -> bool:
    from services.jobs.queue import pending_job_ids

    return job_id in (pending_job_ids(server.url) or set())


def test_pause_frees_the_worker_and_resume_continues_the_same_job_and_run(
    api: TestClient, auth: dict[str, str], workers: Workers, tiny_model_uri: str, toy_dataset_uri: str,
    mlflow_server: str,
) -> None:  # fmt: skip
    from services.admin import create_api_key

    workers.start()  # one worker, one job at a time: the resumed job can run only if the pause let it go
    max_steps = 60
    job_id = create_job(api, auth, tiny_model_uri, toy_dataset_uri, max_steps=max_steps, checkpoint_interval=100)
    wait_until(lambda: (get_job(api, auth, job_id)["step"] or 0) >= 3, 180, "training steps")
    with api.app.state.session_factory() as session:  # type: ignore[attr-defined]
        key, _ = create_api_key(session, f"other-{uuid.uuid4().hex[:6]}")
    for action in ("pause", "resume"):  # another project's key: no such job
        assert api.post(f"{JOBS}/{job_id}/{action}", headers={"Authorization": f"Bearer {key}"}).status_code == 404
    assert api.post(f"{JOBS}/{job_id}/pause", headers=auth).json()["status"] in ("pause_requested", "paused")
    paused = wait_for(api, auth, job_id, {"paused"}, workers, timeout=120)
    checkpoints = [c["step_number"] for c in api.get(f"{JOBS}/{job_id}/checkpoints", headers=auth).json()["data"]]
    assert checkpoints == [paused["step"]] and paused["step"] < max_steps  # written at the pause, not an interval
    time.sleep(3)
    assert get_job(api, auth, job_id)["status"] == "paused"  # nothing runs it until a resume

    assert api.post(f"{JOBS}/{job_id}/resume", headers=auth).json()["status"] == "queued"
    job = wait_for(api, auth, job_id, {"succeeded", "failed", "cancelled"}, workers, timeout=300)
    assert job["status"] == "succeeded" and job["step"] == max_steps, job
    assert job["id"] == job_id and job["mlflow_run_id"] == paused["mlflow_run_id"]
    messages = [e["message"] for e in events(api, auth, job_id)]
    assert f"Resuming from the checkpoint of step {paused['step']}" in messages
    client = MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("worker-tests").experiment_id],
                              filter_string=f"tags.job_id = '{job_id}'")  # fmt: skip
    assert [r.info.run_id for r in runs] == [job["mlflow_run_id"]]
    assert sorted(m.step for m in client.get_metric_history(job["mlflow_run_id"], "loss")) == list(
        range(1, max_steps + 1)
    )
    name = job["fine_tuned_model"].split("/")[1]
    assert len(client.search_model_versions(f"name = '{name}'")) == 1


def test_sigterm_checkpoints_and_requeues_then_another_worker_finishes(
    api: TestClient, auth: dict[str, str], workers: Workers, tiny_model_uri: str, toy_dataset_uri: str
) -> None:
    first = workers.start()
    max_steps = 40
    job_id = create_job(api, auth, tiny_model_uri, toy_dataset_uri, max_steps=max_steps, checkpoint_interval=100)
    wait_until(lambda: (get_job(api, auth, job_id)["step"] or 0) >= 3, 180, "training steps")
    os.kill(first.proc.pid, signal.SIGTERM)  # the main process only, as `docker stop` does
    assert first.proc.wait(120) == 0, first.logs()[-3000:]
    job = get_job(api, auth, job_id)
    assert job["status"] in ("queued", "running"), job
    checkpoints = [c["step_number"] for c in api.get(f"{JOBS}/{job_id}/checkpoints", headers=auth).json()["data"]]
    assert len(checkpoints) == 1 and 3 <= checkpoints[0] < max_steps  # saved on SIGTERM, not at an interval
    workers.start()
    job = wait_for(api, auth, job_id, {"succeeded", "failed", "cancelled"}, workers, timeout=240)
    assert job["status"] == "succeeded" and job["step"] == max_steps, job
    messages = [e["message"] for e in events(api, auth, job_id)]
    assert any(m.startswith("The worker is shutting down") for m in messages)
    assert f"Resuming from the checkpoint of step {checkpoints[0]}" in messages


def test_dataset_gone_after_validation_fails_the_job_with_a_code_and_the_traceback_only_in_the_logs(
    api: TestClient, auth: dict[str, str], workers: Workers, tiny_model_uri: str, toy_dataset_uri: str, bucket: str
) -> None:
    # A dataset of its own, deleted once the job is queued (validated) and before a worker trains it.
    prefix = f"data/doomed-{uuid.uuid4().hex[:6]}"
    with tempfile.TemporaryDirectory() as tmp:
        download_prefix(toy_dataset_uri.rsplit("/", 1)[0], tmp)
        upload_dir(tmp, f"s3://{bucket}/{prefix}")
    s3 = s3_test_client(os.environ["AWS_ENDPOINT_URL_S3"])
    job_id = create_job(api, auth, tiny_model_uri, f"s3://{bucket}/{prefix}/manifest.jsonl", max_steps=3)
    wait_for(api, auth, job_id, {"queued"}, workers, timeout=30)
    for obj in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]:
        s3.delete_object(Bucket=bucket, Key=obj["Key"])
    workers.start()
    job = wait_for(api, auth, job_id, {"succeeded", "failed", "cancelled"}, workers)
    assert job["status"] == "failed", job
    assert job["error"]["code"] not in ("internal_error", "training_process_died"), job["error"]
    assert "Traceback" not in job["error"]["message"] and "\n" not in job["error"]["message"]
    # Users see reasons: no traceback, worker host:pid, internal host or port in the job or its events.
    seen = json.dumps([job, events(api, auth, job_id)])
    for internal in ("Traceback", socket.gethostname(), "127.0.0.1", os.environ["AWS_ENDPOINT_URL_S3"], "/tmp/"):
        assert internal not in seen, internal
    # The detail is in the worker's log, under the job id.
    assert any(job_id in line and "Traceback" in line for line in workers.tails().splitlines())
