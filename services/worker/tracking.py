"""MLflow for a job: one run per job (found again on resume), its params and tags, validation grids, and the final
model logged as a pyfunc and registered exactly once with alias `candidate`.

Everything here runs in the training process (`run_job`), never in the Celery parent.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import posixpath
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from PIL import Image

from invdpo_core import __version__ as core_version
from invdpo_core.config import LOCAL_FIELDS, TrainingConfig
from invdpo_core.storage import is_s3, s3_client, split_s3
from services.jobs.logs import mask_secrets

CANDIDATE_ALIAS = "candidate"
SERVING_CODE = Path(__file__).with_name("serving.py")
# seed and steps are doubles so that a request may leave them out (pandas turns a missing int into NaN).
SIGNATURE = ModelSignature(
    inputs=Schema(
        [ColSpec("string", "prompt"), ColSpec("double", "seed", required=False), ColSpec("double", "steps", False)]
    ),
    outputs=Schema([ColSpec("string", "image")]),
)


def code_version() -> str:
    """The invdpo version, plus the git commit when running from a checkout (images have no .git)."""
    try:
        version = metadata.version("invdpo")
    except metadata.PackageNotFoundError:
        version = core_version
    root = Path(__file__).resolve().parents[2]
    if (root / ".git").exists():
        try:
            sha = subprocess.run(
                ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                capture_output=True, text=True, timeout=5, check=True,
            ).stdout.strip()  # fmt: skip
            version = f"{version}+g{sha}"
        except (OSError, subprocess.SubprocessError):
            pass
    return version


def _listing(root: str) -> list[tuple[str, str]]:
    """(name relative to root, "size etag") of every file under an s3 prefix or a local directory."""
    if is_s3(root):
        bucket, key = split_s3(root)
        prefix = key + "/" if key else ""
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [
            (obj["Key"][len(prefix) :], f"{obj['Size']} {obj.get('ETag', '').strip(chr(34))}")
            for page in pages
            for obj in page.get("Contents", [])
        ]
    path = Path(root)
    return [(p.relative_to(path).as_posix(), str(p.stat().st_size)) for p in path.rglob("*") if p.is_file()]


def dataset_fingerprint(uri: str) -> str:
    """sha256 over the sorted (relative name, size, ETag) of the dataset's files, reading no content: a file
    changed, added or removed changes it; the same files copied elsewhere keep it. A JSONL manifest counts with
    everything beside it (its images), a parquet file alone, a glob with the files it matches, a prefix or
    directory with everything under it."""
    base = uri.rstrip("/")
    name = posixpath.basename(base)
    parent = posixpath.dirname(base) if is_s3(base) else str(Path(base).parent)
    if any(c in name for c in "*?["):
        root, keep = parent, lambda rel: fnmatch.fnmatch(rel, name)
    elif name.endswith(".jsonl"):
        root, keep = parent, lambda rel: True
    elif name.endswith(".parquet"):
        root, keep = parent, lambda rel: rel == name
    else:
        root, keep = base, lambda rel: True
    entries = sorted(f"{rel}\t{info}" for rel, info in _listing(root) if keep(rel))
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def flat_params(config: TrainingConfig) -> dict[str, str]:
    """The hyperparameters as MLflow params (every field but the local ones): nested fields dotted (adapter.rank),
    lists as JSON."""
    params: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}{key}.", item)
        else:
            text = json.dumps(value) if isinstance(value, list) else str(value)
            params[prefix[:-1]] = mask_secrets(text)[:6000]  # MLflow's param value limit

    walk("", {k: v for k, v in config.model_dump(mode="json").items() if k not in LOCAL_FIELDS})
    return params


def start_job_run(
    *, job_id: str, run_id: str | None, experiment: str, config: TrainingConfig, system_metrics: bool
) -> str:
    """Start (or continue) the job's run and return its id. A job has one run: the id stored on the job, else a
    run tagged with the job id (created before a crash could store its id), else a new one."""
    if run_id is None:
        experiment_id = mlflow.set_experiment(experiment).experiment_id
        found = mlflow.search_runs(
            experiment_ids=[experiment_id], filter_string=f"tags.job_id = '{job_id}'", output_format="list"
        )
        run_id = found[0].info.run_id if found else None
    if run_id is None:
        tags = {
            "job_id": job_id,
            "base_model": mask_secrets(config.base_model),
            "dataset_uri": mask_secrets(config.dataset),
            "dataset_sha256": dataset_fingerprint(config.dataset),
            "method": config.method,
            "code_version": code_version(),
        }
        run = mlflow.start_run(
            experiment_id=experiment_id, run_name=job_id, tags=tags, log_system_metrics=system_metrics
        )
    else:
        run = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)
    mlflow.log_params(flat_params(config))
    return str(run.info.run_id)


def last_logged_step(run_id: str, metric: str = "loss") -> int:
    """The last step of `metric` the run has (0 for none). A resumed job retrains the steps after its checkpoint;
    those up to here are in the history already (with the same values: resume is exact), so they are not logged
    again and the history keeps one point per step."""
    history = MlflowClient().get_metric_history(run_id, metric)
    return max((m.step for m in history), default=0)


def log_validation_grid(step: int, images: list[Image.Image]) -> None:
    """The validation images of one step side by side (at most 4 a row) as validation/step-NNNNNN.png."""
    columns = min(4, len(images))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % columns) * width, (i // columns) * height))
    mlflow.log_image(grid, artifact_file=f"validation/step-{step:06d}.png")


def _requirements() -> list[str]:
    """What serving needs, pinned to this worker's versions (MLflow would otherwise load the model to infer it)."""
    wanted = ["mlflow", "torch", "diffusers", "transformers", "accelerate", "safetensors", "pandas", "pillow"]
    pins = []
    for name in wanted:
        try:
            pins.append(f"{name}=={metadata.version(name).split('+')[0]}")  # no local label: 2.13.0+cpu -> 2.13.0
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def register_model_once(
    *, job_id: str, name: str, pipeline_dir: Path, resolution: int | None, inference_steps: int
) -> tuple[str, bool]:
    """Log the pipeline as a pyfunc model in the active run and register it under `name` with alias `candidate`,
    unless a version of `name` tagged with this job id already exists (a resumed job after a crash at the very
    end). Returns (version, newly registered). resolution None: the served model uses the UNet's own."""
    client = MlflowClient()
    existing = client.search_model_versions(f"name = '{name}' and tags.job_id = '{job_id}'")
    if existing:
        version, created = str(min(int(v.version) for v in existing)), False
    else:
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(SERVING_CODE),
            artifacts={"pipeline": str(pipeline_dir)},
            model_config={"resolution": resolution, "num_inference_steps": inference_steps},
            signature=SIGNATURE,
            pip_requirements=_requirements(),
            tags={"job_id": job_id},
        )
        version, created = str(mlflow.register_model(info.model_uri, name, tags={"job_id": job_id}).version), True
    client.set_registered_model_alias(name, CANDIDATE_ALIAS, version)
    return version, created


def quiet() -> None:
    """No progress bars in worker logs (they are one line per refresh in a container log)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
