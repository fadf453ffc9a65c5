"""Multi-node jobs as Kubeflow Trainer TrainJobs (services/worker/trainjob.py), without a cluster.

The manifests are checked against the TrainJob CRD's openAPIV3Schema (Kubeflow Trainer v2.3.0) with `jsonschema`,
strictly (tests/fixtures_kubernetes.py). The life cycle runs the worker's real code and the official `kubernetes`
client against FakeKubernetes, a real HTTP server on loopback that stores TrainJobs and validates every body; the
job database is SQLite. Rank 0 of the TrainJob is played by the job-store calls run_job makes (its real run under
torchrun is tests/worker/test_trainjob_nodes.py). Nothing here runs pods, Kueue or Trainer's controller.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from fixtures_kubernetes import FakeKubernetes, validate_trainjob, write_kubeconfig
from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from services.jobs import jobstore
from services.jobs.models import Job, Project
from services.worker import trainjob
from services.worker.settings import Settings

NAMESPACE = "ml-team"
SECRET_URL = "postgresql+psycopg://invdpo:s3cret-pw@db:5432/invdpo"
NODE_ENV = [
    {"name": "INVDPO_DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": "invdpo-db", "key": "url"}}},
    {"name": "INVDPO_BROKER_URL", "valueFrom": {"secretKeyRef": {"name": "invdpo-broker", "key": "url"}}},
    {"name": "INVDPO_MLFLOW_TRACKING_URI", "value": "http://invdpo-mlflow:5000"},
    {"name": "INVDPO_ARTIFACT_URI", "value": "s3://bucket/checkpoints"},
    {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "invdpo-s3", "key": "access-key-id"}}},
    {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "invdpo-s3", "key": "secret-key"}}},
]


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": SECRET_URL,  # the worker's own value: must never reach a manifest
        "trainjob_namespace": NAMESPACE,
        "trainjob_image": "registry.example.com/invdpo:0.1.0",
        "trainjob_env": NODE_ENV,
        "heartbeat_interval_seconds": 0.1,
        **overrides,
    }
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


JOB_ID = "ftjob-0123456789abcdef01234567"


# ---------------------------------------------------------------- the manifest


@pytest.mark.parametrize("nodes", [1, 2, 16])
@pytest.mark.parametrize("queue", [None, "gpu-team-a"])
def test_the_manifest_validates_against_the_crd_for_one_and_several_nodes_with_and_without_kueue(
    nodes: int, queue: str | None
) -> None:
    tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    manifest = trainjob.build_trainjob(
        JOB_ID,
        nodes,
        8,
        settings(
            trainjob_queue_name=queue,
            trainjob_node_selector={"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
            trainjob_tolerations=tolerations,
            trainjob_pod_labels={"app.kubernetes.io/instance": "demo"},
        ),
    )
    validate_trainjob(manifest)
    spec, labels = manifest["spec"], manifest["metadata"]["labels"]
    assert manifest["metadata"]["name"] == "invdpo-0123456789abcdef01234567"
    assert manifest["metadata"]["namespace"] == NAMESPACE and labels[trainjob.JOB_ID_LABEL] == JOB_ID
    assert labels.get("kueue.x-k8s.io/queue-name") == queue
    assert spec["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime", "name": "torch-distributed"
    }  # fmt: skip
    trainer = spec["trainer"]
    assert trainer["numNodes"] == nodes and trainer["numProcPerNode"] == 8
    assert trainer["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": "8"}}
    assert trainer["command"] == ["torchrun", "--module", "services.worker.run_job"]
    assert trainer["args"] == [JOB_ID, "--worker-id", "trainjob:invdpo-0123456789abcdef01234567"]
    (patch,) = spec["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]["spec"]
    assert node["template"]["spec"]["template"]["metadata"]["labels"] == {"app.kubernetes.io/instance": "demo"}
    assert node["name"] == "node" and pod["tolerations"] == tolerations
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    # Credentials are references to Secrets; no value of the worker's own environment is copied in.
    text = json.dumps(manifest)
    assert "s3cret-pw" not in text and SECRET_URL not in text
    env = {e["name"]: e for e in trainer["env"]}
    assert env["INVDPO_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "invdpo-db", "key": "url"}
    assert env["INVDPO_WORK_DIR"] == {"name": "INVDPO_WORK_DIR", "value": "/scratch"}


def test_the_validator_refuses_what_the_api_server_would() -> None:
    good = trainjob.build_trainjob(JOB_ID, 2, 1, settings())
    for mutate, what in [
        (lambda m: m["spec"]["trainer"].update(numNode=2), "unknown field"),
        (lambda m: m["spec"]["trainer"].update(numNodes="two"), "wrong type"),
        (lambda m: m["spec"].pop("runtimeRef"), "missing runtimeRef"),
        (lambda m: m["metadata"].update(name="Invdpo_Job"), "name not a DNS label"),
        (lambda m: m["metadata"]["labels"].update({"kueue.x-k8s.io/queue-name": "no spaces allowed"}), "label"),
        (lambda m: m["spec"]["runtimePatches"][0].pop("manager"), "patch without manager"),
    ]:
        bad = json.loads(json.dumps(good))
        mutate(bad)
        with pytest.raises((jsonschema.ValidationError, ValueError)):
            validate_trainjob(bad)
            pytest.fail(what)


def test_a_credential_as_a_literal_value_is_refused_by_the_settings() -> None:
    with pytest.raises(ValidationError, match="INVDPO_DATABASE_URL must come from a Secret"):
        settings(trainjob_env=[{"name": "INVDPO_DATABASE_URL", "value": SECRET_URL}])


# ---------------------------------------------------------------- the life cycle


@pytest.fixture
def kube(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKubernetes]:
    with FakeKubernetes() as fake:
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not in a pod: the kubeconfig is used
        monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "kubeconfig", fake.url)))
        yield fake


def make_job(sessions: sessionmaker[Session], nodes: int = 2) -> str:
    with sessions() as session:
        project = Project(name=f"p-{nodes}")
        session.add(project)
        session.flush()
        job_id = jobstore.new_job_id()
        session.add(
            Job(id=job_id, project_id=project.id, status="queued", model="org/m", training_file="s3://b/d.jsonl",
                method_type="inversion_dpo", config={"max_steps": 10}, seed=0, attempt=0,
                resources={"nodes": nodes, "gpus_per_node": 4})
        )  # fmt: skip
        session.commit()
    return job_id


def watch(job_id: str, sessions: sessionmaker[Session], **overrides: Any) -> tuple[threading.Thread, list[str]]:
    """run_trainjob in a thread, as the Celery task runs it; returns the thread and the jobs it re-sent."""
    sent: list[str] = []
    thread = threading.Thread(
        target=trainjob.run_trainjob,
        args=(job_id, 2, 4, settings(**overrides), sessions, sent.append),
        daemon=True,
    )
    thread.start()
    return thread, sent


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def status(sessions: sessionmaker[Session], job_id: str) -> Job:
    with sessions() as session:
        job = jobstore.get_job(session, job_id)
        assert job is not None
        session.expunge(job)
        return job


def events(sessions: sessionmaker[Session], job_id: str) -> list[str]:
    with sessions() as session:
        rows, _ = jobstore.list_events(session, job_id, after=None, limit=100)
        return [r.message for r in rows]


def test_create_progress_cancel_after_a_checkpoint_then_the_trainjob_is_deleted(
    sessions: sessionmaker[Session], kube: FakeKubernetes
) -> None:
    job_id = make_job(sessions)
    thread, _ = watch(job_id, sessions)
    (created,) = wait_for(lambda: kube.trainjobs(NAMESPACE), "the TrainJob")
    assert created["metadata"]["labels"][trainjob.JOB_ID_LABEL] == job_id
    claim = trainjob.claim_id(job_id)
    assert status(sessions, job_id).claimed_by == claim and status(sessions, job_id).status == "running"

    # Rank 0, as run_job does it under that claim: progress and a checkpoint reach the job.
    with sessions() as session:
        assert jobstore.record_progress(session, job_id, 3, 10, {"loss": 0.5}, worker_id=claim)
        jobstore.add_checkpoint(session, job_id, 3, "s3://bucket/checkpoints/x/checkpoint-3")
    job = status(sessions, job_id)
    assert (job.step, job.total_steps) == (3, 10)

    with sessions() as session:
        jobstore.cancel_job(session, job_id)
    # The TrainJob is left to rank 0 while it checkpoints: still there after several watcher rounds.
    path = f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{NAMESPACE}/trainjobs/{created['metadata']['name']}"
    wait_for(lambda: kube.requests.count(("GET", path)) >= 3, "watcher rounds")
    assert kube.trainjobs(NAMESPACE) and status(sessions, job_id).status == "cancel_requested"
    with sessions() as session:  # rank 0 saw the cancel, checkpointed and ended the job
        assert jobstore.is_cancel_requested(session, job_id, claim)
        jobstore.add_checkpoint(session, job_id, 4, "s3://bucket/checkpoints/x/checkpoint-4")
        jobstore.finish_job(session, job_id, "cancelled", worker_id=claim)
    thread.join(20)
    assert not thread.is_alive()
    assert kube.trainjobs(NAMESPACE) == [] and ("DELETE", path) in kube.requests
    assert status(sessions, job_id).status == "cancelled" and kube.creates() == 1
    assert any(
        e.startswith("Training on 2 nodes x 4 GPUs as TrainJob ml-team/invdpo-") for e in events(sessions, job_id)
    )


def test_a_cancel_while_kueue_holds_the_trainjob_deletes_it_at_once(
    sessions: sessionmaker[Session], kube: FakeKubernetes
) -> None:
    job_id = make_job(sessions)
    thread, _ = watch(job_id, sessions, trainjob_queue_name="gpu-team-a")
    (created,) = wait_for(lambda: kube.trainjobs(NAMESPACE), "the TrainJob")
    kube.set_conditions(NAMESPACE, created["metadata"]["name"], {"type": "Suspended", "reason": "Suspended"})
    with sessions() as session:
        jobstore.cancel_job(session, job_id)
    thread.join(20)
    assert not thread.is_alive() and kube.trainjobs(NAMESPACE) == []
    assert status(sessions, job_id).status == "cancelled"


def test_a_restarted_worker_adopts_the_running_trainjob_instead_of_creating_a_second(
    sessions: sessionmaker[Session], kube: FakeKubernetes
) -> None:
    job_id = make_job(sessions)
    # The first worker created the TrainJob and died: the job is running under the TrainJob's claim, its heartbeat
    # older than the timeout (no rank 0 progress yet, say waiting for nodes).
    manifest = trainjob.build_trainjob(job_id, 2, 4, settings())
    kube.serve("POST", NAMESPACE, None, {}, lambda: manifest)
    with sessions() as session:
        assert jobstore.claim_job(session, job_id, trainjob.claim_id(job_id))
        session.query(Job).filter(Job.id == job_id).update({"heartbeat_at": None})
        session.commit()
    before = len(kube.requests)

    thread, _ = watch(job_id, sessions)
    wait_for(lambda: any(e.startswith("Adopted the running TrainJob") for e in events(sessions, job_id)), "adoption")
    assert kube.creates() == 0 and len(kube.trainjobs(NAMESPACE)) == 1
    assert ("GET", f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{NAMESPACE}/trainjobs") in kube.requests[before:]
    job = status(sessions, job_id)
    assert job.attempt == 2 and job.claimed_by == trainjob.claim_id(job_id)
    with sessions() as session:  # rank 0's writes are still valid under the adopted claim
        assert jobstore.record_progress(session, job_id, 10, 10, worker_id=trainjob.claim_id(job_id))
        assert jobstore.finish_job(session, job_id, "succeeded", worker_id=trainjob.claim_id(job_id))
    thread.join(20)
    assert not thread.is_alive() and kube.trainjobs(NAMESPACE) == []


def test_a_trainjob_that_fails_before_rank_0_reports_fails_the_job(
    sessions: sessionmaker[Session], kube: FakeKubernetes
) -> None:
    job_id = make_job(sessions)
    thread, _ = watch(job_id, sessions)
    (created,) = wait_for(lambda: kube.trainjobs(NAMESPACE), "the TrainJob")
    kube.set_conditions(
        NAMESPACE,
        created["metadata"]["name"],
        {"type": "Failed", "reason": "JobsFailed", "message": "node-1 OOMKilled"},
    )
    thread.join(20)
    job = status(sessions, job_id)
    assert (job.status, job.error_code) == ("failed", "trainjob_failed")
    assert "Failed: node-1 OOMKilled" in (job.error_message or "") and "checkpoints are kept" in (
        job.error_message or ""
    )
    assert kube.trainjobs(NAMESPACE) == []


def test_sigterm_on_the_nodes_requeues_then_the_watcher_deletes_the_trainjob_and_resends(
    sessions: sessionmaker[Session], kube: FakeKubernetes
) -> None:
    job_id = make_job(sessions)
    thread, sent = watch(job_id, sessions)
    wait_for(lambda: kube.trainjobs(NAMESPACE), "the TrainJob")
    with sessions() as session:  # rank 0 after SIGTERM: checkpointed, then gave the job back
        assert jobstore.requeue_job(session, job_id, trainjob.claim_id(job_id))
    thread.join(20)
    assert sent == [job_id] and kube.trainjobs(NAMESPACE) == []
    assert status(sessions, job_id).status == "queued"


def test_without_a_trainjob_image_a_multi_node_job_fails_with_a_reason(
    sessions: sessionmaker[Session], kube: FakeKubernetes
) -> None:
    job_id = make_job(sessions)
    thread, _ = watch(job_id, sessions, trainjob_image=None)
    thread.join(20)
    job = status(sessions, job_id)
    assert job.status == "failed" and "multi-node jobs are not enabled" in (job.error_message or "")
    assert kube.creates() == 0


def test_without_rbac_for_trainjobs_the_job_fails_naming_the_answer(
    sessions: sessionmaker[Session], kube: FakeKubernetes
) -> None:
    kube.forbidden = True
    job_id = make_job(sessions)
    thread, _ = watch(job_id, sessions)
    thread.join(20)
    job = status(sessions, job_id)
    assert (job.status, job.error_code) == ("failed", "trainjob_failed")
    assert "the Kubernetes API answered 403 Forbidden" in (job.error_message or "")
