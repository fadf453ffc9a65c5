"""A multi-node job end to end, without a cluster: the real API, Celery worker processes, Redis, PostgreSQL, moto S3,
an MLflow server, and FakeKubernetes (tests/fixtures_kubernetes.py) as the Kubernetes API the workers' official
client talks to. The test plays what the cluster would do: Kueue holding then admitting the TrainJob, and the
kubelet running its two nodes (the manifest's own command and environment, Secret references resolved from a dict,
the PET_* variables Trainer's torch runtime sets).

Life cycle: create -> worker killed -> a new worker adopts the TrainJob (no second one) -> the nodes train and rank 0's
progress shows in the API -> cancel -> rank 0 checkpoints, the job is cancelled, the worker deletes the TrainJob.
Slow: two Celery workers and two training processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import JOBS, ROOT, Workers, free_port, wait_until
from fastapi.testclient import TestClient
from fixtures_kubernetes import FakeKubernetes, write_kubeconfig

pytestmark = pytest.mark.slow

NAMESPACE = "ml-team"
SECRET_ENV = [  # what the chart renders: credentials by reference only
    {"name": "INVDPO_DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": "invdpo-database", "key": "url"}}},
    {"name": "INVDPO_BROKER_URL", "valueFrom": {"secretKeyRef": {"name": "invdpo-broker", "key": "url"}}},
    {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "invdpo-s3", "key": "access-key-id"}}},
    {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "invdpo-s3", "key": "secret-key"}}},
]


@pytest.fixture(autouse=True)
def multi_node_api(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INVDPO_MAX_NODES_PER_JOB", "4")  # read by the `api` fixture's Settings


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[FakeKubernetes]:
    with FakeKubernetes() as fake:
        yield fake


def run_node_pods(manifest: dict[str, Any], secrets: dict[str, dict[str, str]], tmp: Path) -> list[subprocess.Popen]:
    """What the kubelet would run for the TrainJob: each node's container, its env resolved, on loopback."""
    trainer = manifest["spec"]["trainer"]
    env: dict[str, str] = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp),
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
    }
    for item in trainer["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secrets[ref["name"]][ref["key"]]
    assert trainer["command"][0] == "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", *trainer["command"][1:], *trainer["args"]]
    port, procs = free_port(), []
    for rank in range(trainer["numNodes"]):
        pet = {"PET_NNODES": str(trainer["numNodes"]), "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": str(rank),
               "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}  # fmt: skip
        # Each pod has its own /scratch and model cache.
        local = {"INVDPO_WORK_DIR": str(tmp / f"node{rank}"), "INVDPO_CACHE_DIR": str(tmp / f"cache{rank}")}
        log = open(tmp / f"node{rank}.log", "wb")
        procs.append(subprocess.Popen(cmd, env={**env, **pet, **local}, cwd=tmp, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))  # fmt: skip
    return procs


def test_a_multi_node_job_is_created_adopted_after_a_worker_restart_reports_progress_and_cancels(
    api: TestClient, auth: dict[str, str], workers: Workers, kube: FakeKubernetes, tiny_model_uri: str,
    toy_dataset_uri: str, pg_url: str, redis_server: Any, bucket: str, tmp_path: Path,
) -> None:  # fmt: skip
    node_env = [
        *SECRET_ENV,
        {"name": "INVDPO_MLFLOW_TRACKING_URI", "value": workers.env["INVDPO_MLFLOW_TRACKING_URI"]},
        {"name": "INVDPO_MLFLOW_EXPERIMENT", "value": "trainjob-e2e"},
        {"name": "INVDPO_ARTIFACT_URI", "value": workers.env["INVDPO_ARTIFACT_URI"]},
        {"name": "INVDPO_PROGRESS_INTERVAL_SECONDS", "value": "0"},
        {"name": "INVDPO_CANCEL_POLL_SECONDS", "value": "0.5"},
        {"name": "INVDPO_SYSTEM_METRICS", "value": "false"},
        {"name": "AWS_ENDPOINT_URL_S3", "value": os.environ["AWS_ENDPOINT_URL_S3"]},
        {"name": "AWS_DEFAULT_REGION", "value": "us-east-1"},
    ]
    worker_env = {
        "KUBECONFIG": str(write_kubeconfig(tmp_path / "kubeconfig", kube.url)),
        "INVDPO_TRAINJOB_NAMESPACE": NAMESPACE,
        "INVDPO_TRAINJOB_IMAGE": "registry.example.com/invdpo-worker:0.1.0",
        "INVDPO_TRAINJOB_QUEUE_NAME": "gpu-team-a",
        "INVDPO_TRAINJOB_ENV": json.dumps(node_env),
    }
    first = workers.start(**worker_env)
    body = {
        "model": tiny_model_uri, "training_file": toy_dataset_uri, "seed": 0,
        "method": {"type": "inversion_dpo", "hyperparameters": {
            "resolution": 64, "inversion_steps": 4, "max_steps": 400, "checkpoint_interval": 2}},
        "resources": {"nodes": 2, "gpus_per_node": 1},
    }  # fmt: skip
    response = api.post(JOBS, json=body, headers=auth)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    assert response.json()["resources"] == {"nodes": 2, "gpus_per_node": 1}

    def job() -> dict[str, Any]:
        return dict(api.get(f"{JOBS}/{job_id}", headers=auth).json())

    def messages() -> list[str]:
        return [
            e["message"]
            for e in api.get(f"{JOBS}/{job_id}/events", params={"limit": 100}, headers=auth).json()["data"]
        ]

    # 1. The worker creates the TrainJob; Kueue holds it (its webhook suspends TrainJobs of a queue).
    try:
        (created,) = wait_until(lambda: kube.trainjobs(NAMESPACE), 120, "the TrainJob")
    except AssertionError:
        raise AssertionError(workers.tails()) from None
    name = created["metadata"]["name"]
    kube.set_conditions(NAMESPACE, name, {"type": "Suspended", "reason": "Suspended"})
    assert created["metadata"]["labels"] == {
        "invdpo.io/job-id": job_id, "app.kubernetes.io/managed-by": "invdpo", "kueue.x-k8s.io/queue-name": "gpu-team-a"
    }  # fmt: skip
    assert pg_url not in json.dumps(created) and job()["status"] == "running"

    # 2. The worker dies. Its heartbeat goes stale, the API's reconciler sends the job again, and a new worker
    #    adopts the TrainJob it finds by label instead of creating a second.
    first.kill(signal.SIGKILL)
    first.proc.wait(30)
    workers.start(**worker_env)
    wait_until(lambda: any(m.startswith("Adopted the running TrainJob") for m in messages()), 120, "adoption")
    assert kube.creates() == 1 and len(kube.trainjobs(NAMESPACE)) == 1
    assert any("(attempt 2)" in m for m in messages())

    # 3. Kueue admits it; the nodes train. Rank 0's progress reaches the API while the worker watches.
    kube.set_conditions(NAMESPACE, name, {"type": "Created", "reason": "JobSetCreated"})
    secrets = {
        "invdpo-database": {"url": pg_url},
        "invdpo-broker": {"url": redis_server.url},
        "invdpo-s3": {
            "access-key-id": os.environ["AWS_ACCESS_KEY_ID"],
            "secret-key": os.environ["AWS_SECRET_ACCESS_KEY"],
        },
    }
    pods = run_node_pods(kube.trainjobs(NAMESPACE)[0], secrets, tmp_path)
    try:
        wait_until(lambda: (job().get("step") or 0) >= 3, 600, "rank 0's progress")
        assert any(m.startswith("Step ") for m in messages())

        # 4. Cancel: rank 0 stops at the next step, checkpoints, ends the job; the worker deletes the TrainJob.
        assert api.post(f"{JOBS}/{job_id}/cancel", headers=auth).json()["status"] == "cancel_requested"
        final = wait_until(lambda: (j := job())["status"] in ("cancelled", "failed", "succeeded") and j, 120, "cancel")
        assert final["status"] == "cancelled", final
        for pod in pods:
            assert pod.wait(120) == 0
    finally:
        for pod in pods:
            if pod.poll() is None:
                os.killpg(pod.pid, signal.SIGKILL)
        logs = "\n".join((tmp_path / f"node{r}.log").read_text(errors="replace")[-3000:] for r in range(2))
    checkpoints = api.get(f"{JOBS}/{job_id}/checkpoints", headers=auth).json()["data"]
    assert checkpoints and checkpoints[-1]["step_number"] >= 2, logs
    wait_until(lambda: kube.trainjobs(NAMESPACE) == [], 30, "the TrainJob deleted")
    assert ("DELETE", f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{NAMESPACE}/trainjobs/{name}") in kube.requests
    assert kube.creates() == 1
