"""Fault injection on the real stack (API, Celery worker, PostgreSQL, Redis, moto S3, MLflow on loopback): the
faults of a real cluster during training, each ridden out, and cancels honoured within 10 s in every phase.

The worker reaches PostgreSQL and S3 through a FaultProxy (tests/fault_proxy.py) that resets connections for a
while; the training process is SIGKILLed as the OOM killer does. The whole worker SIGKILLed and a Redis restart
are in test_worker_e2e.py. With INVDPO_FAULTS_REPORT set, each test appends what it measured (outcome, steps lost,
seconds to resumed progress) as a JSON line: `python benchmarks/faults.py` runs this suite and prints the table.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import psutil
import pytest
from conftest import JOBS, Workers, report, wait_until
from fastapi.testclient import TestClient
from fault_proxy import FaultProxy
from test_worker_e2e import create_job, events, get_job, wait_for, wait_for_step

pytestmark = pytest.mark.slow

FINAL = {"succeeded", "failed", "cancelled"}


def ride_out(
    api: TestClient, auth: dict[str, str], workers: Workers, job_id: str, fault: str, inject: Callable[[], None]
) -> dict[str, Any]:
    """Inject the fault while the job trains; return the final job after recording outcome, steps lost (trained
    twice after resuming from a checkpoint) and seconds until the job reported a new step."""
    step_at_fault = get_job(api, auth, job_id)["step"] or 0
    t0 = time.monotonic()
    inject()
    wait_until(
        lambda: (j := get_job(api, auth, job_id))["step"] != step_at_fault or j["status"] in FINAL,
        300,
        "progress after the fault",
    )
    resumed_s = time.monotonic() - t0
    job = wait_for(api, auth, job_id, FINAL, workers, timeout=400)
    resumed = [e["message"] for e in events(api, auth, job_id) if e["message"].startswith("Resuming from")]
    steps_lost = step_at_fault - int(resumed[-1].rsplit(" ", 1)[1]) if resumed else 0
    report(fault, outcome=job["status"], steps_lost=steps_lost, seconds_to_progress=round(resumed_s, 1))
    return job


def through(proxy: FaultProxy, url: str) -> str:
    """`url` with its loopback port replaced by the proxy's."""
    host, port = proxy.target
    return url.replace(f"{host}:{port}", f"127.0.0.1:{proxy.port}")


def test_postgres_down_10_s_during_training_the_job_succeeds(
    api: TestClient, auth: dict[str, str], workers: Workers, pg_url: str, tiny_model_uri: str, toy_dataset_uri: str
) -> None:
    proxy = FaultProxy(5432)
    workers.start(INVDPO_DATABASE_URL=through(proxy, pg_url))
    # Every checkpoint kept (not the newest 2), so the list shows whether the outage lost one.
    job_id = create_job(
        api, auth, tiny_model_uri, toy_dataset_uri, max_steps=40, checkpoint_interval=5, checkpoints_to_keep=100
    )
    wait_until(lambda: (get_job(api, auth, job_id)["step"] or 0) >= 3, 300, "training steps")
    job = ride_out(api, auth, workers, job_id, "PostgreSQL down 10 s", lambda: proxy.down(10))
    assert proxy.resets > 0
    assert job["status"] == "succeeded" and job["step"] == 40, job
    checkpoints = [c["step_number"] for c in api.get(f"{JOBS}/{job_id}/checkpoints", headers=auth).json()["data"]]
    assert checkpoints == list(range(5, 41, 5))  # none lost to the outage


def test_s3_down_15_s_during_training_the_job_succeeds(
    api: TestClient, auth: dict[str, str], workers: Workers, aws_env: str, tiny_model_uri: str, toy_dataset_uri: str
) -> None:
    proxy = FaultProxy(int(aws_env.rsplit(":", 1)[1]))
    workers.start(AWS_ENDPOINT_URL_S3=through(proxy, aws_env))
    job_id = create_job(api, auth, tiny_model_uri, toy_dataset_uri, max_steps=40, checkpoint_interval=5)
    wait_until(lambda: (get_job(api, auth, job_id)["step"] or 0) >= 3, 300, "training steps")
    job = ride_out(api, auth, workers, job_id, "S3 connection down 15 s", lambda: proxy.down(15))
    assert proxy.resets > 0
    assert job["status"] == "succeeded" and job["step"] == 40, job
    checkpoints = [c["step_number"] for c in api.get(f"{JOBS}/{job_id}/checkpoints", headers=auth).json()["data"]]
    assert checkpoints[-1] == 40


def test_s3_writes_dropped_during_a_checkpoint_upload_the_job_succeeds(
    api: TestClient, auth: dict[str, str], workers: Workers, aws_env: str, tiny_model_uri: str, toy_dataset_uri: str
) -> None:
    proxy = FaultProxy(int(aws_env.rsplit(":", 1)[1]))
    proxy.down_when(b"/checkpoints/checkpoint-10/", 12)  # the request line of the first file's PUT
    workers.start(AWS_ENDPOINT_URL_S3=through(proxy, aws_env))
    job_id = create_job(
        api, auth, tiny_model_uri, toy_dataset_uri, max_steps=30, checkpoint_interval=10, checkpoints_to_keep=100
    )
    wait_until(lambda: (get_job(api, auth, job_id)["step"] or 0) >= 3, 300, "training steps")
    job = ride_out(
        api, auth, workers, job_id, "S3 writes dropped during a checkpoint upload (12 s)",
        lambda: wait_until(lambda: proxy.tripped_at, 300, "the checkpoint upload"),
    )  # fmt: skip
    assert proxy.resets > 0
    assert job["status"] == "succeeded" and job["step"] == 30, job
    checkpoints = [c["step_number"] for c in api.get(f"{JOBS}/{job_id}/checkpoints", headers=auth).json()["data"]]
    assert checkpoints == [10, 20, 30]  # the interrupted upload was retried, not skipped


def _training_process(workers: Workers) -> psutil.Process:
    """The run_job process of the worker (not the accelerate launcher above it)."""
    for proc in psutil.Process(workers.started[-1].proc.pid).children(recursive=True):
        cmdline = proc.cmdline()
        if "services.worker.run_job" in cmdline and "accelerate.commands.launch" not in cmdline:
            return proc
    raise AssertionError("no training process")


def test_training_process_sigkilled_resumes_from_its_checkpoint_and_succeeds(
    api: TestClient, auth: dict[str, str], workers: Workers, tiny_model_uri: str, toy_dataset_uri: str
) -> None:
    workers.start()
    job_id = create_job(api, auth, tiny_model_uri, toy_dataset_uri, max_steps=30, checkpoint_interval=10)
    wait_for_step(api, auth, job_id, 10, timeout=300)
    job = ride_out(
        api, auth, workers, job_id, "training process SIGKILLed (OOM killer)",
        lambda: _training_process(workers).send_signal(signal.SIGKILL),
    )  # fmt: skip
    assert job["status"] == "succeeded" and job["step"] == 30, job
    messages = [e["message"] for e in events(api, auth, job_id)]
    # (Through `accelerate launch`, the worker sees its launcher exit with status 1, not the SIGKILL itself.)
    assert any(m.startswith("The training process") and "(attempt 1 of 3)" in m for m in messages), messages
    assert any(m.startswith("Resuming from the checkpoint of step") for m in messages), messages


def cancel_within_10_s(api: TestClient, auth: dict[str, str], workers: Workers, job_id: str, phase: str) -> None:
    t0 = time.monotonic()
    assert api.post(f"{JOBS}/{job_id}/cancel", headers=auth).json()["status"] == "cancel_requested"
    job = wait_for(api, auth, job_id, FINAL, workers, timeout=60)
    elapsed = time.monotonic() - t0
    report(f"cancel during {phase}", outcome=job["status"], seconds_to_cancelled=round(elapsed, 1))
    assert job["status"] == "cancelled", job
    assert elapsed < 10, f"cancelled after {elapsed:.1f} s"


def wait_for_phase(api: TestClient, auth: dict[str, str], job_id: str, phase: str) -> None:
    wait_until(
        lambda: any((e.get("data") or {}).get("phase") == phase for e in events(api, auth, job_id)),
        300,
        f"phase {phase}",
        interval=0.1,
    )


def test_cancel_right_after_running_while_the_model_loads_within_10_s(
    api: TestClient, auth: dict[str, str], workers: Workers, tiny_model_uri: str, toy_dataset_uri: str
) -> None:
    workers.start()
    job_id = create_job(api, auth, tiny_model_uri, toy_dataset_uri, max_steps=40)
    wait_until(lambda: get_job(api, auth, job_id)["status"] == "running", 300, "running", interval=0.1)
    cancel_within_10_s(api, auth, workers, job_id, "process start and model load")


def test_cancel_during_the_inversion_cache_build_within_10_s(
    api: TestClient, auth: dict[str, str], workers: Workers, tiny_model_uri: str, toy_dataset_uri: str
) -> None:
    workers.start()
    # 8 pairs x 2 images x 600 inversion steps: a cache build of a minute or more on a shared CPU.
    job_id = create_job(api, auth, tiny_model_uri, toy_dataset_uri, max_steps=8, inversion_steps=600)
    wait_for_phase(api, auth, job_id, "building_cache")
    cancel_within_10_s(api, auth, workers, job_id, "the inversion cache build")


def test_cancel_during_a_huge_step_within_10_s(
    api: TestClient, auth: dict[str, str], workers: Workers, tiny_model_uri: str, toy_dataset_uri: str
) -> None:
    workers.start()
    job_id = create_job(api, auth, tiny_model_uri, toy_dataset_uri, max_steps=2, gradient_accumulation_steps=4096)
    wait_for_phase(api, auth, job_id, "training")
    time.sleep(2)  # inside the first step's micro-batches
    cancel_within_10_s(api, auth, workers, job_id, "a huge step (4096 micro-batches, the most allowed)")


def test_sigterm_during_the_inversion_cache_build_requeues_within_10_s(
    api: TestClient, auth: dict[str, str], workers: Workers, tiny_model_uri: str, toy_dataset_uri: str
) -> None:
    worker = workers.start()
    job_id = create_job(api, auth, tiny_model_uri, toy_dataset_uri, max_steps=8, inversion_steps=600)
    wait_for_phase(api, auth, job_id, "building_cache")
    t0 = time.monotonic()
    os.kill(worker.proc.pid, signal.SIGTERM)  # the main process only, as `docker stop` and a node drain do
    job = wait_for(api, auth, job_id, {"queued", *FINAL}, workers, timeout=60)
    elapsed = time.monotonic() - t0
    report("SIGTERM during the inversion cache build", outcome=job["status"], seconds_to_requeued=round(elapsed, 1))
    assert job["status"] == "queued", job
    assert elapsed < 10, f"queued again after {elapsed:.1f} s"
    assert worker.proc.wait(60) == 0
