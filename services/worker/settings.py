"""Settings of the GPU worker, read from the environment (prefix INVDPO_), behind a cached `get_settings()`."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field

from services.jobs.settings import JobSettings


class Settings(JobSettings):
    """The worker's settings. Environment variables (all prefixed INVDPO_): shared with the API (JobSettings):
    INVDPO_DATABASE_URL, INVDPO_BROKER_URL, INVDPO_MLFLOW_TRACKING_URI, INVDPO_LOG_LEVEL,
    INVDPO_HEARTBEAT_TIMEOUT_SECONDS, INVDPO_RECONCILE_AFTER_SECONDS, INVDPO_MAX_ATTEMPTS, INVDPO_VALIDATION_SAMPLE;
    the worker's own:
    INVDPO_MLFLOW_EXPERIMENT, INVDPO_ARTIFACT_URI, INVDPO_WORK_DIR, INVDPO_CACHE_DIR, INVDPO_HEARTBEAT_FILE,
    INVDPO_HEARTBEAT_INTERVAL_SECONDS, INVDPO_PROGRESS_INTERVAL_SECONDS, INVDPO_CANCEL_POLL_SECONDS,
    INVDPO_NUM_PROCESSES, INVDPO_SYSTEM_METRICS, INVDPO_EVAL_SCORERS, INVDPO_EVAL_GUIDANCE_SCALE.
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
        30.0, gt=0, description="How often the heartbeat file and the running job's database heartbeat are renewed."
    )
    progress_interval_seconds: float = Field(
        2.0, ge=0, description="At most one progress write (step, metrics event) per this many seconds."
    )
    cancel_poll_seconds: float = Field(
        1.0, ge=0, description="The trainer asks the database whether to stop at most this often."
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


@lru_cache
def get_settings() -> Settings:
    return Settings()
