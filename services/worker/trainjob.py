"""Jobs of more than one node, as Kubeflow Trainer v2 TrainJobs (trainer.kubeflow.org/v1alpha1), admitted by Kueue.

The worker that claims a job with `resources.nodes > 1` does not train it: it creates a TrainJob that runs the
worker's own image on every node, under torchrun as the ClusterTrainingRuntime starts it (settings.trainjob_runtime,
default `torch-distributed`, which sets the PET_* variables torchrun reads):

    torchrun --module services.worker.run_job JOB_ID --worker-id trainjob:NAME

then watches it until the job ends. The API still shows one job:

- The claim is `trainjob:<name>`, one per job whoever watches it, so rank 0 of the TrainJob reports status,
  events, progress, checkpoints and the model to the job database through the job store, exactly as a single-node
  job does (run_job). Every node restores the newest checkpoint from object storage (run_job, per node).
- The watcher renews the job's heartbeat. A watcher that dies leaves the TrainJob running; once the heartbeat is
  stale (rank 0 also refreshes it with every progress write) the reconciler sends the job again, and the worker
  that claims it adopts the TrainJob it finds by the label invdpo.io/job-id instead of creating a second one.
- Cancel (and pause alike): rank 0 sees `cancel_requested` (`pause_requested`), checkpoints and ends the job as
  cancelled (paused), then the watcher deletes the TrainJob. A TrainJob that is not running (suspended, say
  waiting for Kueue's admission) is deleted at once; one whose rank 0 has not ended the job after
  trainjob_cancel_grace_seconds is deleted anyway.
- Runtime limit: the watcher adds the time the TrainJob runs (not while it is suspended) to the job's runtime;
  rank 0 checkpoints and fails the job as runtime_limit at its max_runtime_seconds, and a TrainJob still there
  checkpoint_grace_seconds later is deleted and the job failed the same way.
- Preemption or a drained node (SIGTERM to the nodes): every rank checkpoints and rank 0 puts the job back in the
  queue; the watcher deletes the TrainJob and sends the job again. The next TrainJob restores from the checkpoint.
- A TrainJob that ends (Complete or Failed) or disappears while the job still runs ended without rank 0
  reporting: the job fails (code trainjob_failed), its checkpoints kept.

Kubernetes is reached with the official client: in a pod through its ServiceAccount (the chart's Role), elsewhere
through the kubeconfig (KUBECONFIG).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from services.jobs import jobstore
from services.jobs.runs import end_job_run
from services.worker.settings import Settings

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
JOB_ID_LABEL = "invdpo.io/job-id"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
NODE_MODULE = "services.worker.run_job"
NODE_CONTAINER = "node"  # the trainer container of the torch-distributed runtime (and of Trainer's other runtimes)
NODE_WORK_DIR = "/scratch"


def trainjob_name(job_id: str) -> str:
    """invdpo-<hex>: a DNS label (the job id's `ftjob-` prefix would do, but an explicit owner reads better)."""
    return "invdpo-" + job_id.removeprefix("ftjob-")


def claim_id(job_id: str) -> str:
    """The job's claim while a TrainJob trains it: the same for every worker that watches it, so that rank 0's
    writes stay valid when another worker adopts the TrainJob."""
    return f"trainjob:{trainjob_name(job_id)}"


def build_trainjob(job_id: str, nodes: int, gpus_per_node: int, settings: Settings) -> dict[str, Any]:
    """The TrainJob that trains `job_id` on `nodes` nodes of `gpus_per_node` GPUs. No secret value goes in: the
    nodes' credentials are references to Secrets (settings.trainjob_env), the job itself is read from the database."""
    assert settings.trainjob_image, "trainjob_image is required for multi-node jobs"
    labels = {JOB_ID_LABEL: job_id, "app.kubernetes.io/managed-by": "invdpo"}
    if settings.trainjob_queue_name:
        labels[QUEUE_LABEL] = settings.trainjob_queue_name
    env = list(settings.trainjob_env)
    if not any(e["name"] == "INVDPO_WORK_DIR" for e in env):
        env.append({"name": "INVDPO_WORK_DIR", "value": NODE_WORK_DIR})
    pod_spec: dict[str, Any] = {
        # Local scratch for the job's files and shared memory for the data loaders and gloo/NCCL.
        "volumes": [{"name": "scratch", "emptyDir": {}}, {"name": "dshm", "emptyDir": {"medium": "Memory"}}],
        "containers": [
            {
                "name": NODE_CONTAINER,
                "volumeMounts": [
                    {"name": "scratch", "mountPath": NODE_WORK_DIR},
                    {"name": "dshm", "mountPath": "/dev/shm"},
                ],
            }
        ],
    }
    if settings.trainjob_node_selector:
        pod_spec["nodeSelector"] = dict(settings.trainjob_node_selector)
    if settings.trainjob_tolerations:
        pod_spec["tolerations"] = list(settings.trainjob_tolerations)
    pod_template: dict[str, Any] = {"spec": pod_spec}
    if settings.trainjob_pod_labels:
        pod_template["metadata"] = {"labels": dict(settings.trainjob_pod_labels)}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": trainjob_name(job_id), "namespace": settings.trainjob_namespace, "labels": labels},
        "spec": {
            "runtimeRef": {"apiGroup": GROUP, "kind": "ClusterTrainingRuntime", "name": settings.trainjob_runtime},
            "trainer": {
                "image": settings.trainjob_image,
                "command": ["torchrun", "--module", NODE_MODULE],
                "args": [job_id, "--worker-id", claim_id(job_id)],
                "numNodes": nodes,
                "numProcPerNode": gpus_per_node,
                "resourcesPerNode": {"limits": {settings.trainjob_gpu_resource: str(gpus_per_node)}},
                "env": env,
            },
            "runtimePatches": [
                {
                    "manager": "invdpo.io/worker",
                    "trainingRuntimeSpec": {
                        "template": {
                            "spec": {
                                "replicatedJobs": [{"name": "node", "template": {"spec": {"template": pod_template}}}]
                            }
                        }
                    },
                }
            ],
        },
    }


def kubernetes_api() -> Any:
    """A CustomObjectsApi: the pod's ServiceAccount in a cluster, else the kubeconfig (KUBECONFIG)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        # Read KUBECONFIG now: the client's own default is the value it had when the client was imported.
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    return client.CustomObjectsApi()


def find_trainjob(api: Any, namespace: str, job_id: str) -> dict[str, Any] | None:
    """The TrainJob of `job_id`, by its label (not its name, so a renamed scheme still finds old ones)."""
    listing = api.list_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, label_selector=f"{JOB_ID_LABEL}={job_id}"
    )
    items = listing.get("items", [])
    return items[0] if items else None


def _condition(trainjob: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for condition in trainjob.get("status", {}).get("conditions", []) or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            return condition
    return None


def ended(trainjob: dict[str, Any]) -> str | None:
    """'Complete' or 'Failed: <message>' once the TrainJob ended, else None."""
    if _condition(trainjob, "Complete") is not None:
        return "Complete"
    failed = _condition(trainjob, "Failed")
    if failed is not None:
        return f"Failed: {failed.get('message') or failed.get('reason') or 'no reason given'}"
    return None


def is_suspended(trainjob: dict[str, Any]) -> bool:
    """Not running: suspended by us or by Kueue (waiting for admission)."""
    return bool(trainjob.get("spec", {}).get("suspend")) or _condition(trainjob, "Suspended") is not None


def delete_trainjob(api: Any, namespace: str, name: str, *, wait_seconds: float = 60.0) -> None:
    """Delete the TrainJob with its pods (foreground) and wait until it is gone, so that the next claim of the job
    cannot find and adopt it."""
    from kubernetes.client.exceptions import ApiException

    try:
        api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Foreground")
    except ApiException as exc:
        if exc.status != 404:
            raise
        return
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        try:
            api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        time.sleep(1.0)
    log.warning("TrainJob still being deleted", extra={"trainjob": name})


def _event(sessions: sessionmaker[Session], job_id: str, message: str) -> None:
    with sessions() as session:
        jobstore.add_event(session, job_id, message)


def _fail(
    sessions: sessionmaker[Session], job_id: str, worker_id: str, message: str, tracking_uri: str | None = None
) -> None:
    error: jobstore.JobErrorInfo = {"code": "trainjob_failed", "message": message, "param": None}
    with sessions() as session:
        jobstore.finish_job(session, job_id, "failed", error, worker_id=worker_id)
    if tracking_uri is not None:  # rank 0 had started the run; it is gone without ending it
        end_job_run(sessions, tracking_uri, job_id, "FAILED")
    log.error("TrainJob ended without reporting", extra={"job_id": job_id})


def run_trainjob(
    job_id: str,
    nodes: int,
    gpus_per_node: int,
    settings: Settings,
    sessions: sessionmaker[Session],
    enqueue: Callable[[str], None],
    api: Any = None,
) -> None:
    """Claim the job, create or adopt its TrainJob, and watch both until the job ends (see the module docstring)."""
    from kubernetes.client.exceptions import ApiException

    worker_id = claim_id(job_id)
    with sessions() as session:
        if not jobstore.claim_job(
            session, job_id, worker_id, heartbeat_timeout_seconds=settings.heartbeat_timeout_seconds
        ):
            log.info("job not claimable: watched elsewhere, finished or cancelled", extra={"job_id": job_id})
            return
    if not settings.trainjob_image:
        _fail(sessions, job_id, worker_id, "multi-node jobs are not enabled on this deployment (no TrainJob image)")
        return
    api = api if api is not None else kubernetes_api()
    namespace, name = settings.trainjob_namespace, trainjob_name(job_id)
    where = f"TrainJob {namespace}/{name}"
    try:
        trainjob = find_trainjob(api, namespace, job_id)
        if trainjob is not None and (ended(trainjob) or trainjob["metadata"].get("deletionTimestamp")):
            delete_trainjob(api, namespace, trainjob["metadata"]["name"])  # a previous attempt's: start afresh
            trainjob = None
        if trainjob is None:
            api.create_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, build_trainjob(job_id, nodes, gpus_per_node, settings)
            )
    except ApiException as exc:  # 403: no RBAC for trainjobs; 404: Trainer not installed; 422: refused
        _fail(sessions, job_id, worker_id, f"{where}: the Kubernetes API answered {exc.status} {exc.reason}")
        return
    if trainjob is not None:
        _event(sessions, job_id, f"Adopted the running {where}")
    else:
        queue = f", queue {settings.trainjob_queue_name}" if settings.trainjob_queue_name else ""
        _event(
            sessions,
            job_id,
            f"Training on {nodes} nodes x {gpus_per_node} GPUs as {where} "
            f"(runtime {settings.trainjob_runtime}{queue})",
        )
    log.info("watching the TrainJob", extra={"job_id": job_id, "trainjob": name})

    cancel_seen: float | None = None
    counted, training = time.monotonic(), trainjob is not None and not is_suspended(trainjob)
    while True:
        time.sleep(settings.heartbeat_interval_seconds)
        try:
            with sessions() as session:
                ours = jobstore.heartbeat(session, job_id, worker_id)
                # Runtime counts while the TrainJob runs, not while Kueue holds it suspended.
                now = time.monotonic()
                jobstore.add_runtime(session, job_id, now - counted if training else 0.0)
                counted = now
                job = jobstore.get_job(session, job_id)
        except SQLAlchemyError as exc:
            log.warning("job heartbeat failed", extra={"job_id": job_id, "error": type(exc).__name__})
            continue
        status = job.status if job is not None else None
        if not ours:
            # Rank 0 ended the job, or put it back in the queue after SIGTERM: the TrainJob is done either way.
            delete_trainjob(api, namespace, name)
            if status == "queued":
                enqueue(job_id)
            log.info("job left the TrainJob", extra={"job_id": job_id, "status": status})
            return
        try:
            trainjob = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                message = f"{where} was deleted before the job ended; checkpoints are kept"
                _fail(sessions, job_id, worker_id, message, settings.mlflow_tracking_uri)
                return
            log.warning("TrainJob not readable", extra={"job_id": job_id, "status": exc.status})
            continue
        training = not is_suspended(trainjob)
        limit = jobstore.runtime_limit(job, settings.max_runtime_seconds) if job is not None else float("inf")
        if job is not None and job.runtime_seconds >= limit + settings.checkpoint_grace_seconds:
            # Rank 0 stops at the limit by itself; this is for one that did not (stuck outside the training steps).
            delete_trainjob(api, namespace, name)
            with sessions() as session:
                error = jobstore.runtime_limit_error(limit, job.step)
                jobstore.finish_job(session, job_id, "failed", error, worker_id=worker_id)
            end_job_run(sessions, settings.mlflow_tracking_uri, job_id, "FAILED")
            return
        outcome = ended(trainjob)
        if outcome is not None:
            delete_trainjob(api, namespace, name)
            message = f"{where} ended ({outcome}) before rank 0 reported; checkpoints are kept"
            message = message if len(message) <= 300 else message[:297] + "..."
            _fail(sessions, job_id, worker_id, message, settings.mlflow_tracking_uri)
            return
        if status in ("cancel_requested", "pause_requested"):
            cancel_seen = cancel_seen or time.monotonic()
            overdue = time.monotonic() - cancel_seen > settings.trainjob_cancel_grace_seconds
            if is_suspended(trainjob) or overdue:
                delete_trainjob(api, namespace, name)
                with sessions() as session:
                    if status == "pause_requested":  # paused at its last stored checkpoint
                        jobstore.settle_pause(session, job_id, worker_id)
                    elif jobstore.settle_cancel(session, job_id, worker_id):
                        end_job_run(sessions, settings.mlflow_tracking_uri, job_id, "KILLED")
                _event(sessions, job_id, f"Deleted {where}" + (" (rank 0 did not stop in time)" if overdue else ""))
                return
