"""The training process of one job, started fresh by the Celery task for every job:

    accelerate launch --num_processes N -m services.worker.run_job JOB_ID --worker-id WORKER_ID

or, on every node of a multi-node job's TrainJob, by torchrun as Kubeflow Trainer starts it (trainjob.py):

    torchrun --module services.worker.run_job JOB_ID --worker-id trainjob:NAME

It loads the job row, restores the job's newest checkpoint from the object store, calls `invdpo_core.train.train`
with callbacks that report to the database and MLflow, and ends the job: succeeded (model evaluated against its
base, logged and registered), cancelled, queued again (SIGTERM: checkpoint first), or failed (a code and one line;
the traceback goes to the events). With several processes (GPUs, nodes) every rank trains; only rank 0 talks to
the database, MLflow and the store, and one process per node restores the checkpoint.

Exit status 0 means the job's state was reported (whatever it is); anything else tells the parent it was not.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import posixpath
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from services.jobs import jobstore
from services.jobs.db import make_engine, make_session_factory
from services.jobs.logs import adopt_library_loggers, configure_logging, mask_secrets
from services.jobs.models import Checkpoint, Job, Project
from services.worker.settings import Settings, get_settings

log = logging.getLogger("services.worker.run_job")

# What each phase says on the job's event stream (TrainCallbacks.on_phase, then this runner's own phases).
PHASES = {
    "loading_model": "Loading the base model",
    "building_cache": "Building the inversion cache",
    "training": "Training",
    "sampling": "Sampling validation images",
    "saving_model": "Saving the model",
    "evaluating": "Evaluating the model against its base",
    "uploading": "Uploading the model",
    "registering": "Registering the model in MLflow",
}


def transient_mlflow_error(exc: BaseException) -> bool:
    """MLflow unreachable or overloaded (after its own HTTP retries): worth retrying, unlike a rejected request."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.error_code in (
        "INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED",
    )  # fmt: skip


def job_uri(settings: Settings, job_id: str, *parts: str) -> str:
    """<artifact_uri>/<job id>/<parts...>: where the job's checkpoints and model go (s3:// or a local path)."""
    if settings.artifact_uri.startswith("s3://"):
        return posixpath.join(settings.artifact_uri, job_id, *parts)
    return str(Path(settings.artifact_uri, job_id, *parts))


def upload_checkpoint(path: Path, uri: str) -> None:
    """Copy a checkpoint directory to `uri`, manifest last, so the copy counts as complete only once it is."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    from invdpo_core.checkpoint import MANIFEST
    from invdpo_core.storage import StorageError, is_s3, s3_client, split_s3

    files = sorted(p for p in path.iterdir() if p.is_file() and p.name != MANIFEST) + [path / MANIFEST]
    if not is_s3(uri):
        Path(uri).mkdir(parents=True, exist_ok=True)
        for file in files:
            shutil.copyfile(file, Path(uri) / file.name)
        return
    bucket, key = split_s3(uri)
    for file in files:
        target = posixpath.join(key, file.name)
        try:
            s3_client().upload_file(str(file), bucket, target)
        except (ClientError, BotoCoreError, S3UploadFailedError) as exc:
            raise StorageError("s3_error", f"s3://{bucket}/{target}: upload failed ({type(exc).__name__})") from None


class ModelNameTaken(Exception):
    """The job's registered model name belongs to another project (claimed after the API accepted the job)."""


def job_error(exc: BaseException) -> jobstore.JobErrorInfo:
    """The user-facing {code, message, param} of an exception: a stable code and one masked line."""
    import torch
    from mlflow.exceptions import MlflowException

    from invdpo_core.checkpoint import CheckpointError
    from invdpo_core.config import ConfigError
    from invdpo_core.data import DatasetError
    from invdpo_core.storage import ModelReferenceError, StorageError
    from invdpo_core.train import TrainError

    text = " ".join(str(exc).split())
    code, param = "internal_error", None
    # About the user's own inputs (their URIs are theirs to see):
    if isinstance(exc, DatasetError):
        code, param = exc.code, "training_file"
    elif isinstance(exc, ModelReferenceError):
        code, param = exc.code, "model"
    elif isinstance(exc, ConfigError):
        code, param = "invalid_config", "method.hyperparameters"
    elif isinstance(exc, ModelNameTaken):
        code, param = "model_name_taken", "registered_model_name"
    # About the service's own systems: a reason, never their hosts, ports or paths (the log has the detail).
    elif isinstance(exc, CheckpointError):
        code, text = "checkpoint_error", public_text(text)
    elif isinstance(exc, TrainError):
        code, text = "training_error", public_text(text)
    elif isinstance(exc, StorageError):
        code, text = f"storage_{exc.code}", f"the service's object store failed ({exc.code}); the job can be retried"
    elif isinstance(exc, torch.OutOfMemoryError):
        code, text = "out_of_memory", "the GPU ran out of memory; lower batch_size or resolution, or use LoRA"
    elif isinstance(exc, MlflowException):
        code, text = "tracking_error", "the tracking server (MLflow) failed; the job can be retried"
    else:
        text = f"the job stopped on an internal error ({type(exc).__name__}); the operators have the details"
    text = mask_secrets(text)
    return {"code": code, "message": text if len(text) <= 300 else text[:297] + "...", "param": param}


def check_prefixes(config: Any, prefixes: list[str] | None) -> None:
    """Refuse a model or dataset outside the project's allowed prefixes (checked by the API at create time, again
    here: the limit may have been set since). Images are inside their manifest's prefix (invdpo_core.data)."""
    from invdpo_core.data import DatasetError
    from invdpo_core.storage import ModelReferenceError, is_hub_id, is_s3, within_prefixes

    if prefixes is None:
        return
    model = config.base_model
    if not (within_prefixes(model, prefixes) or (not is_s3(model) and is_hub_id(model))):
        raise ModelReferenceError("forbidden_prefix", f"base model {model}: not under this project's prefixes")
    for uri in (config.dataset, config.validation_dataset):
        if uri is not None and not within_prefixes(uri, prefixes):
            raise DatasetError("forbidden_prefix", f"{uri}: not under this project's prefixes")


# What must not reach users: addresses (URLs other than s3://, ip:port, host:port) and absolute local paths.
_INTERNAL = re.compile(
    r"\b(?!s3://)[a-z][a-z0-9+.\-]*://\S+"  # URLs of other systems
    r"|\b(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?\b|\blocalhost:\d+\b|\b[\w.\-]+:\d{2,5}\b"  # hosts and ports
    r"|(?<![\w:/.\-])/(?:[\w.\-]+/)*[\w.\-]+"  # absolute paths (not the key part of an s3:// URI)
)


def public_text(text: str) -> str:
    """`text` with internal addresses and local paths replaced by <internal>."""
    return _INTERNAL.sub("<internal>", text)


def merge_lora(base_model: str, lora_dir: Path, dest: Path, *, model_cache_dir: str | None = None) -> Path:
    """A full pipeline directory with the LoRA fused into the base UNet: what the served model loads."""
    from invdpo_core.pipeline import load_pipeline

    pipe = load_pipeline(base_model, model_cache_dir=model_cache_dir)
    pipe.load_lora_weights(str(lora_dir))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    shutil.rmtree(dest, ignore_errors=True)
    pipe.save_pretrained(dest)
    return dest


class JobRunner:
    """One job in this process: the trainer's callbacks and the job's end."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], job_id: str, worker_id: str, main: bool):
        self.settings, self.sessions, self.job_id, self.worker_id, self.main = (
            settings,
            sessions,
            job_id,
            worker_id,
            main,
        )
        self.out = Path(settings.work_dir) / job_id
        self.stop_signal: str | None = None  # set by the SIGTERM/SIGINT handler
        self.phase = "starting"  # the current PHASES key; a stop signal outside "training" requeues at once
        self._phases_shown: set[str] = set()
        self._cache_started: float | None = None
        self.run_id: str | None = None
        self.logged_through = 0  # the last step the job's MLflow run has metrics of (an earlier attempt's)
        self.pairs_per_step = 1
        self.max_bad_share = 0.01  # the job's config.max_bad_share, once read
        self.checkpoints_to_keep: int | None = None  # the job's config.checkpoints_to_keep, once read
        self.last_metrics: dict[str, float] = {}
        self._stop = False
        self._last_poll = self._last_progress = float("-inf")
        # The job's max_runtime_seconds, and when (monotonic) this attempt reaches it: set by run().
        self.runtime_limit, self.deadline, self.over_runtime = 0.0, float("inf"), False
        self._last_step_at = time.monotonic()

    # ------------------------------------------------------------------ callbacks

    def on_step(self, step: int, total: int, metrics: dict[str, float]) -> None:
        import mlflow

        now = time.monotonic()
        metrics = {**metrics, "pairs_per_s": self.pairs_per_step / max(now - self._last_step_at, 1e-6)}
        self._last_step_at = now
        self.last_metrics = metrics
        # Asynchronous: MLflow batches the per-step metrics in a thread; end_run flushes them. A step an earlier
        # attempt logged already is not logged twice (tracking.last_logged_step).
        if step > self.logged_through:
            mlflow.log_metrics(metrics, step=step, synchronous=False)
        if step == total or now - self._last_progress >= self.settings.progress_interval_seconds:
            try:
                with self.sessions() as session:
                    jobstore.record_progress(session, self.job_id, step, total, metrics, worker_id=self.worker_id)
                self._last_progress = now
            except SQLAlchemyError as exc:  # a database outage must not stop training: the next step tries again
                log.warning("progress not recorded", extra={"job_id": self.job_id, "error": type(exc).__name__})

    def should_stop(self) -> bool:
        if self.stop_signal is not None:
            return True
        if not self.main:
            return False  # rank 0's answer reaches every rank through the trainer's reduction
        now = time.monotonic()
        if now >= self.deadline:  # the trainer checkpoints, then stopped() fails the job as runtime_limit
            self.over_runtime = True
            return True
        if not self._stop and now - self._last_poll >= self.settings.cancel_poll_seconds:
            self._last_poll = now
            try:
                with self.sessions() as session:
                    self._stop = jobstore.is_cancel_requested(session, self.job_id, self.worker_id)
            except SQLAlchemyError as exc:
                log.warning("cancel poll failed", extra={"job_id": self.job_id, "error": type(exc).__name__})
        return self._stop

    def on_checkpoint(self, path: Path, step: int) -> None:
        from invdpo_core.storage import StorageError

        uri = job_uri(self.settings, self.job_id, "checkpoints", path.name)
        try:
            upload_checkpoint(path, uri)  # botocore retries a store outage for about a minute first
        except StorageError as exc:
            # Training goes on: the next checkpoint is uploaded in full. Only the final model must be stored.
            log.warning("checkpoint not stored", extra={"job_id": self.job_id, "step": step, "error": str(exc)})
            self.event(f"Checkpoint of step {step} not stored (the object store is unreachable); training goes on")
            return
        with self.sessions() as session:  # the row is written last: a checkpoint with a row is complete
            jobstore.add_checkpoint(session, self.job_id, step, uri, metrics=self.last_metrics)
        self.prune_checkpoints()

    def prune_checkpoints(self) -> None:
        """Delete the stored checkpoints past the job's checkpoints_to_keep newest (the final model is not one of
        them): row first, then files, so the checkpoints endpoint lists only what exists."""
        from invdpo_core.storage import StorageError, delete_prefix

        if self.checkpoints_to_keep is None:
            return
        with self.sessions() as session:
            old = jobstore.checkpoints_beyond(session, self.job_id, self.checkpoints_to_keep)
        for uri in old:
            with self.sessions() as session:
                jobstore.forget_checkpoint(session, self.job_id, uri)
            try:
                delete_prefix(uri)
            except StorageError as exc:  # left behind in the store, no longer listed or restored
                log.warning("old checkpoint not deleted", extra={"job_id": self.job_id, "error": str(exc)})

    def on_phase(self, phase: str) -> None:
        """Each phase is announced once on the job's event stream (data.phase); `sampling` alternates with
        `training`."""
        self.phase = phase
        if phase not in self._phases_shown:
            self._phases_shown.add(phase)
            self.event(PHASES[phase], data={"phase": phase})

    def on_cache_progress(self, done: int, total: int) -> None:
        """Pairs inverted so far, as an event (data: phase, pairs_done, pairs_total, eta_seconds)."""
        now = time.monotonic()
        if self._cache_started is None:
            self._cache_started = now
        if done < total and now - self._last_progress < self.settings.progress_interval_seconds:
            return
        self._last_progress = now
        eta = (now - self._cache_started) * (total - done) / done if done else None
        data = {"phase": "building_cache", "pairs_done": done, "pairs_total": total, "eta_seconds": eta}
        left = f", about {eta:.0f} s left" if eta is not None else ""
        self.event(f"Inversion cache: {done}/{total} pairs{left}", data=data)

    def on_skipped_pair(self, count: int, reason: str) -> None:
        """A pair skipped for an unreadable image, as a warning event: the first ten, then every hundredth (the
        step metrics carry the count, skipped_pairs, all along)."""
        if count <= 10 or count % 100 == 0:
            share = self.max_bad_share
            with self.sessions() as session:
                jobstore.add_event(
                    session, self.job_id,
                    f"Skipped a pair with an unreadable image ({count} so far; max_bad_share {share:g}): {reason}",
                    level="warn", data={"skipped_pairs": count},
                )  # fmt: skip

    def requeue_now(self) -> None:
        """SIGTERM outside the training steps (loading, caching, evaluating, uploading): there is nothing new to
        checkpoint, so give the job back at once (or settle its pause or cancel) and exit, rather than after the
        phase."""
        with self.sessions() as session:
            if jobstore.requeue_job(session, self.job_id, self.worker_id):
                self.enqueue()
            elif not jobstore.settle_pause(session, self.job_id, self.worker_id):
                jobstore.settle_cancel(session, self.job_id, self.worker_id)
        log.warning("stopped before the end of the phase", extra={"job_id": self.job_id, "phase": self.phase})
        logging.shutdown()
        os._exit(0)  # the main thread may be deep in a model load; nothing of it is worth keeping

    def on_validation(self, step: int, images: list[Any]) -> None:
        from services.worker.tracking import log_validation_grid

        log_validation_grid(step, images)

    # ------------------------------------------------------------------ the job

    def restore_checkpoint(self) -> int | None:
        """Bring the job's newest stored checkpoint into the work dir unless a local one is as new. Returns the
        step training will resume from, or None (from the base model)."""
        from invdpo_core.checkpoint import checkpoint_step, latest_checkpoint, read_manifest
        from invdpo_core.storage import download_prefix

        root = self.out / "checkpoints"
        local = latest_checkpoint(root)
        local_step = checkpoint_step(local) if local is not None else None
        with self.sessions() as session:
            rows = jobstore.retry_outages(Session.execute)(
                session,
                select(Checkpoint.step_number, Checkpoint.uri)
                .where(Checkpoint.job_id == self.job_id)
                .order_by(Checkpoint.step_number.desc(), Checkpoint.id.desc()),
            ).all()
        for step, uri in rows:
            if local_step is not None and step <= local_step:
                break
            staging = root / f".restore-{step}"
            shutil.rmtree(staging, ignore_errors=True)
            try:
                download_prefix(uri, staging)
            except FileNotFoundError:
                log.warning("stored checkpoint missing", extra={"job_id": self.job_id, "step": step})
                continue
            final = root / f"checkpoint-{step}"
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)
            if read_manifest(final) is not None:
                return int(step)
            shutil.rmtree(final, ignore_errors=True)
        return local_step

    def run(self) -> int:
        import torch
        from accelerate import PartialState

        from invdpo_core.config import parse_config
        from invdpo_core.train import TrainCallbacks, train

        state = PartialState(cpu=not torch.cuda.is_available())  # as train() does: several CPU ranks distribute
        with self.sessions() as session:
            job = jobstore.retry_outages(jobstore.get_job)(session, self.job_id)
            prefixes = session.scalar(select(Project.allowed_prefixes).join(Job).where(Job.id == self.job_id))
        if not jobstore.owns(job, self.worker_id):
            log.warning("the job is not this worker's to run", extra={"job_id": self.job_id})
            return 0
        # Counted from here: the worker adds the time before (attempts, launch) to the job's runtime_seconds.
        self.runtime_limit = jobstore.runtime_limit(job, self.settings.max_runtime_seconds)
        self.deadline = time.monotonic() + self.runtime_limit - job.runtime_seconds
        if time.monotonic() >= self.deadline:  # requeued after its time was up (say it stopped for SIGTERM there)
            if self.main:
                self.fail_runtime_limit(job.step)
            return 0
        try:
            config = parse_config({**job.config, "output_dir": str(self.out), "resume": True})
            check_prefixes(config, prefixes)
            self.pairs_per_step = config.batch_size * state.num_processes * config.gradient_accumulation_steps
            self.max_bad_share = config.max_bad_share
            self.checkpoints_to_keep = config.checkpoints_to_keep
            if self.main:
                self.start_tracking(job, config)
            if state.is_local_main_process:  # one restore per node: each node of a TrainJob has its own disk
                restored = self.restore_checkpoint()
                if restored is not None and self.main:
                    self.event(f"Resuming from the checkpoint of step {restored}")
            state.wait_for_everyone()  # the other ranks read the restored checkpoint
            callbacks = TrainCallbacks(on_step=self.on_step, should_stop=self.should_stop)
            if self.main:
                callbacks.on_checkpoint = self.on_checkpoint
                callbacks.on_validation = self.on_validation
                callbacks.on_phase = self.on_phase
                callbacks.on_cache_progress = self.on_cache_progress
                callbacks.on_skipped_pair = self.on_skipped_pair
            result = train(config, callbacks, model_cache_dir=self.settings.cache_dir)
            if not self.main:
                return 0
            if result.stopped_early:
                return self.stopped(result.steps)
            return self.succeeded(job, config, result.model_path)
        except Exception as exc:
            if not self.main:
                raise
            self.failed(exc)
            return 0

    def start_tracking(self, job: Job, config: Any) -> None:
        import mlflow

        from services.worker.tracking import last_logged_step, start_job_run

        mlflow.set_tracking_uri(self.settings.mlflow_tracking_uri)
        self.run_id = start_job_run(
            job_id=self.job_id,
            run_id=job.mlflow_run_id,
            experiment=self.settings.mlflow_experiment,
            config=config,
            system_metrics=self.settings.system_metrics,
        )
        self.logged_through = last_logged_step(self.run_id)
        with self.sessions() as session:
            jobstore.set_run_info(session, self.job_id, mlflow_run_id=self.run_id)

    def stopped(self, step: int) -> int:
        """The trainer stopped early (at `step`, checkpointed): after a pause request settle it as paused, after
        SIGTERM requeue, at the runtime limit fail it as runtime_limit, after a cancel request settle it as
        cancelled, and if the job is no longer this worker's (taken over by another) leave it alone."""
        import mlflow

        with self.sessions() as session:
            job = jobstore.get_job(session, self.job_id)
            if not jobstore.owns(job, self.worker_id):
                log.warning("the job is no longer this worker's; stopping", extra={"job_id": self.job_id})
                mlflow.end_run("RUNNING")  # the run is the new owner's now (not FINISHED by the atexit hook)
                return 0
            if job.status == "pause_requested":  # the resume continues this run (here, from the local checkpoint)
                mlflow.end_run("SCHEDULED")
                jobstore.settle_pause(session, self.job_id, self.worker_id, step=step)
                return 0
            if self.stop_signal is not None and jobstore.requeue_job(session, self.job_id, self.worker_id):
                mlflow.end_run("SCHEDULED")
                if not self.worker_id.startswith("trainjob:"):  # a TrainJob's watcher sends it once it is gone
                    self.enqueue()
                return 0
            if self.over_runtime and job.status == "running":  # a cancel request wins: it is settled below
                self.fail_runtime_limit(step)
                return 0
            # The run first: once the job is final, whoever reads it may read the run too.
            mlflow.end_run("KILLED")
            jobstore.settle_cancel(session, self.job_id, self.worker_id)
        self.cleanup()
        return 0

    def fail_runtime_limit(self, step: int | None) -> None:
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.end_run("FAILED")
        log.warning("runtime limit reached", extra={"job_id": self.job_id, "step": step})
        with self.sessions() as session:
            error = jobstore.runtime_limit_error(self.runtime_limit, step)
            jobstore.finish_job(session, self.job_id, "failed", error, worker_id=self.worker_id)
        self.cleanup()

    def enqueue(self) -> None:
        """Send the job's message again. If the broker is down, the API's reconciler re-sends the queued job."""
        from services.jobs.queue import enqueue_training, make_celery

        try:
            enqueue_training(self.job_id, make_celery(self.settings.broker_url))
        except Exception as exc:
            log.warning("re-enqueue failed; the reconciler will", extra={"job_id": self.job_id, "error": str(exc)})

    def succeeded(self, job: Job, config: Any, model_path: Path | None) -> int:
        import mlflow
        from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential

        from invdpo_core.gate import evaluate_gate
        from invdpo_core.storage import upload_dir
        from services.worker.evaluation import evaluate_job, summary
        from services.worker.tracking import register_model_once

        assert model_path is not None, "a finished run has a model"
        self.on_phase("evaluating")
        name = job.registered_model_name or jobstore.default_model_name(self.job_id, job.suffix)
        with self.sessions() as session:
            # First registration wins: claimed before anything reaches MLflow, so no version lands in another
            # project's model.
            if not jobstore.claim_model_name(session, name, job.project_id):
                raise ModelNameTaken(f"registered model {name} belongs to another project")
        # Evaluated before registering: the version appears with its evidence already on the job and the run.
        evaluation = evaluate_job(
            config, model_path, self.out / "evaluation", self.settings, job_uri(self.settings, self.job_id, "model")
        )
        with self.sessions() as session:
            jobstore.set_evaluation(session, self.job_id, evaluation)
        self.event(summary(evaluation))
        pipeline = (
            model_path
            if config.adapter.type == "full"
            else merge_lora(
                config.base_model, model_path, self.out / "merged", model_cache_dir=self.settings.cache_dir
            )
        )
        self.on_phase("uploading")
        upload_dir(pipeline, job_uri(self.settings, self.job_id, "model"))  # after botocore's retries, a failure
        self.on_phase("registering")
        # MLflow retries each HTTP request itself (main() sets MLFLOW_HTTP_REQUEST_*); this rides out a longer
        # outage. Registering twice is harmless: register_model_once finds the version tagged with this job.
        for attempt in Retrying(
            retry=retry_if_exception(transient_mlflow_error),
            wait=wait_exponential(multiplier=1, max=15),
            stop=stop_after_delay(jobstore.OUTAGE_BUDGET_SECONDS),
            reraise=True,
        ):
            with attempt:
                version, created = register_model_once(
                    job_id=self.job_id,
                    name=name,
                    pipeline_dir=pipeline,
                    resolution=config.resolution,
                    inference_steps=config.validation_inference_steps,
                )
        model = f"models:/{name}/{version}"
        self.event(f"Model {'registered' if created else 'already registered'} as {model} (alias candidate)")
        # The gate's verdict, recorded where the promote route and the model server read it (not MLflow's tags).
        rule = self.settings.gate_rule()
        passed, reasons = evaluate_gate(evaluation.get("metrics") or {}, rule) if rule else (True, [])
        with self.sessions() as session:
            jobstore.record_model_version(
                session, name, int(version), job_id=self.job_id, project_id=job.project_id, gate_passed=passed,
                gate_reasons=reasons,
            )  # fmt: skip
        self.event(f"Promotion gate: {'passed' if passed else 'refused: ' + '; '.join(reasons)}")
        mlflow.end_run("FINISHED")  # before the job is final: whoever reads the job may read the run at once
        with self.sessions() as session:
            jobstore.set_run_info(session, self.job_id, registered_model_version=version, fine_tuned_model=model)
            jobstore.finish_job(
                session, self.job_id, "succeeded", fine_tuned_model=model, registered_model_version=version,
                worker_id=self.worker_id,
            )  # fmt: skip
        self.cleanup()
        return 0

    def failed(self, exc: BaseException) -> None:
        import mlflow

        error = job_error(exc)
        # The traceback goes to the log with the job id, never to the job's events (hosts, paths, internals).
        log.error("job failed", extra={"job_id": self.job_id, "code": error["code"]}, exc_info=exc)
        if mlflow.active_run() is not None:
            with contextlib.suppress(Exception):  # MLflow may be what failed: the job must still be reported
                mlflow.end_run("FAILED")
        with self.sessions() as session:
            jobstore.finish_job(session, self.job_id, "failed", error, worker_id=self.worker_id)
        self.cleanup()

    def event(self, message: str, data: dict[str, Any] | None = None) -> None:
        with self.sessions() as session:
            jobstore.add_event(session, self.job_id, message, data=data)

    def cleanup(self) -> None:
        shutil.rmtree(self.out, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="services.worker.run_job", description=__doc__.split("\n\n")[0])
    parser.add_argument("job_id")
    parser.add_argument("--worker-id", required=True, help="The claim this process trains under.")
    args = parser.parse_args(argv)
    settings = get_settings()
    configure_logging(settings.log_level)
    if not jobstore.is_job_id(args.job_id):
        log.error("not a job id", extra={"job_id": args.job_id[:64]})
        return 2
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow writes run URLs to stdout and logs through handlers of its own: neither would be masked.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # MLflow's own HTTP retries (urllib3): 7 retries 1, 2, 4 ... 64 s apart ride out an outage of about 2 minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    main_rank = int(os.environ.get("RANK", "0")) == 0
    # Pre-ping: after a database restart or failover the pooled connections are dead; test each before use.
    sessions = make_session_factory(make_engine(settings.database_url, pool_pre_ping=True))
    runner = JobRunner(settings, sessions, args.job_id, args.worker_id, main_rank)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        # In training, a flag: the trainer sees it before its next micro-batch, checkpoints and returns; then we
        # requeue. In any other phase at once, from a thread (this handler may have interrupted a database call).
        runner.stop_signal = signal.Signals(signum).name
        log.warning("stop signal received", extra={"job_id": args.job_id, "signal": runner.stop_signal})
        if main_rank and runner.phase != "training":
            threading.Thread(target=runner.requeue_now, name="requeue", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    import mlflow  # noqa: F401  (gives its loggers handlers of its own on import; undone below)

    adopt_library_loggers()
    return runner.run()


if __name__ == "__main__":
    sys.exit(main())
