"""Settings of the GPU worker, read from the environment (prefix INVDPO_), behind a cached `get_settings()`."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from pydantic import Field, field_validator

from services.jobs.settings import JobSettings


class Settings(JobSettings):
    """The worker's settings. Environment variables (all prefixed INVDPO_): shared with the API (JobSettings):
    INVDPO_DATABASE_URL, INVDPO_BROKER_URL, INVDPO_MLFLOW_TRACKING_URI, INVDPO_LOG_LEVEL,
    INVDPO_HEARTBEAT_TIMEOUT_SECONDS, INVDPO_RECONCILE_AFTER_SECONDS, INVDPO_MAX_ATTEMPTS, INVDPO_VALIDATION_SAMPLE,
    INVDPO_MAX_RUNTIME_SECONDS, INVDPO_PROMOTION_GATE, INVDPO_VALIDATION_TIMEOUT_SECONDS,
    INVDPO_VALIDATION_MEMORY_BYTES, INVDPO_ALLOW_LOCAL_FILES, INVDPO_MAX_IMAGE_BYTES; the worker's own:
    INVDPO_MLFLOW_EXPERIMENT, INVDPO_ARTIFACT_URI, INVDPO_WORK_DIR, INVDPO_CACHE_DIR, INVDPO_HEARTBEAT_FILE,
    INVDPO_HEARTBEAT_INTERVAL_SECONDS, INVDPO_PROGRESS_INTERVAL_SECONDS, INVDPO_CANCEL_POLL_SECONDS,
    INVDPO_STOP_GRACE_SECONDS, INVDPO_CHECKPOINT_GRACE_SECONDS, INVDPO_NUM_PROCESSES, INVDPO_SYSTEM_METRICS,
    INVDPO_EVAL_SCORERS, INVDPO_EVAL_GUIDANCE_SCALE, and for multi-node jobs (services/worker/trainjob.py)
    INVDPO_TRAINJOB_NAMESPACE, INVDPO_TRAINJOB_RUNTIME, INVDPO_TRAINJOB_IMAGE, INVDPO_TRAINJOB_QUEUE_NAME,
    INVDPO_TRAINJOB_POD_LABELS, INVDPO_TRAINJOB_NODE_SELECTOR, INVDPO_TRAINJOB_TOLERATIONS, INVDPO_TRAINJOB_ENV,
    INVDPO_TRAINJOB_GPU_RESOURCE, INVDPO_TRAINJOB_CANCEL_GRACE_SECONDS.
    """

    mlflow_experiment: str = Field("invdpo", min_length=1, description="MLflow experiment the job runs go to.")
    artifact_uri: str = Field(
        "./artifacts",
        min_length=1,
        description="Where checkpoints and final models go, under <artifact_uri>/<job id>/: s3://bucket/prefix or "
        "a local directory.",
    )
    work_dir: str = Field(
        "./work", min_length=1, description="Local scratch: one directory per running job, removed when it ends."
    )
    cache_dir: str | None = Field(
        None, description="Cache of base models downloaded from s3:// (default ~/.cache/invdpo; the trainer's)."
    )
    heartbeat_file: str = Field(
        "/tmp/invdpo-worker-heartbeat", description="File touched while the worker lives (container probes)."
    )
    heartbeat_interval_seconds: float = Field(
        10.0,
        gt=0,
        description="How often the heartbeat file and the running job's database heartbeat are renewed (a few times "
        "within heartbeat_timeout_seconds, so that a slow beat is not taken for a dead worker).",
    )
    progress_interval_seconds: float = Field(
        2.0, ge=0, description="At most one progress write (step, metrics event) per this many seconds."
    )
    cancel_poll_seconds: float = Field(
        1.0, ge=0, description="The trainer asks the database whether to stop at most this often."
    )
    stop_grace_seconds: float = Field(
        5.0,
        ge=0,
        description="After a cancel request, how long the training process may take to stop by itself before the "
        "worker kills it (model loading, evaluation and uploads do not poll for cancels).",
    )
    checkpoint_grace_seconds: float = Field(
        600.0,
        ge=0,
        description="At a pause request or a job's max_runtime_seconds, how long the training process gets to write "
        "its last checkpoint and stop by itself (the trainer stops at the next micro-batch) before the worker kills "
        "it: the job is then paused, or failed as runtime_limit, at its last stored checkpoint.",
    )
    num_processes: int | None = Field(
        None, ge=1, description="Training processes per job; default: one per visible GPU (one on a CPU)."
    )
    system_metrics: bool = Field(True, description="Log CPU/GPU/memory system metrics to the MLflow run.")
    eval_scorers: dict[str, str] = Field(
        {},
        description="Scorers the evaluation after training uses, as JSON {name: local directory} (pickscore, hpsv2, "
        "hpsv2.1, clip_score, aesthetic; invdpo_core/evaluate.py). The built-in toy reward always runs; the others "
        "are reported as not run.",
    )
    eval_guidance_scale: float = Field(
        7.5, ge=0, description="Classifier-free guidance of the evaluation's images (base and fine-tuned alike)."
    )

    # ---- multi-node jobs: Kubeflow Trainer TrainJobs (services/worker/trainjob.py, docs/deploy.md) ----
    trainjob_namespace: str = Field(
        "default", min_length=1, description="Namespace the TrainJobs are created in (the worker's own, deployed)."
    )
    trainjob_runtime: str = Field(
        "torch-distributed", min_length=1, description="ClusterTrainingRuntime the TrainJobs reference (torchrun)."
    )
    trainjob_image: str | None = Field(
        None, description="Image of the TrainJob nodes: the worker's own. Unset: multi-node jobs fail at once."
    )
    trainjob_queue_name: str | None = Field(
        None, description="Kueue LocalQueue (label kueue.x-k8s.io/queue-name) that admits the TrainJobs; unset: none."
    )
    trainjob_pod_labels: dict[str, str] = Field(
        {},
        description="Labels of the TrainJob pods, as JSON (the chart's, so its NetworkPolicy lets them reach MLflow).",
    )
    trainjob_node_selector: dict[str, str] = Field({}, description="nodeSelector of the TrainJob pods, as JSON.")
    trainjob_tolerations: list[dict[str, Any]] = Field([], description="Tolerations of the TrainJob pods, as JSON.")
    trainjob_env: list[dict[str, Any]] = Field(
        [],
        description="Environment of the TrainJob nodes as a JSON list of Kubernetes EnvVars (database, broker, "
        "MLflow, S3...). Credentials only as valueFrom.secretKeyRef: a literal value of one is refused.",
    )
    trainjob_gpu_resource: str = Field("nvidia.com/gpu", min_length=1, description="Resource name of one GPU.")
    trainjob_cancel_grace_seconds: float = Field(
        300.0,
        gt=0,
        description="After a cancel, rank 0 gets this long to checkpoint and end the job; then the TrainJob is "
        "deleted anyway.",
    )

    @field_validator("trainjob_env")
    @classmethod
    def _credentials_from_secrets(cls, env: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for entry in env:
            name = entry.get("name")
            if not isinstance(name, str) or not name:
                raise ValueError(f"every entry needs a name: {json.dumps(entry)[:80]}")
            if name in CREDENTIAL_ENV and "value" in entry:
                raise ValueError(f"{name} must come from a Secret (valueFrom.secretKeyRef), not a literal value")
        return env


# Variables that carry credentials (URLs with passwords, keys, tokens): never written into a TrainJob as values.
CREDENTIAL_ENV = frozenset(
    {
        "INVDPO_DATABASE_URL",
        "INVDPO_BROKER_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "HF_TOKEN",
        "MLFLOW_TRACKING_TOKEN",
        "MLFLOW_TRACKING_PASSWORD",
    }
)


@lru_cache
def get_settings() -> Settings:
    return Settings()
