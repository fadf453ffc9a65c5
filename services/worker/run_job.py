"""The training process of one job, started fresh by the Celery task for every job:

    accelerate launch --num_processes N -m services.worker.run_job JOB_ID --worker-id WORKER_ID

It loads the job row, restores the job's newest checkpoint from the object store, calls `invdpo_core.train.train`
with callbacks that report to the database and MLflow, and ends the job: succeeded (model evaluated against its
base, logged and registered), cancelled, queued again (SIGTERM: checkpoint first), or failed (a code and one line;
the traceback goes to the events). With several processes (GPUs) every rank trains; only rank 0 talks to the
database, MLflow and the store.

Exit status 0 means the job's state was reported (whatever it is); anything else tells the parent it was not.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import posixpath
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from services.jobs import jobstore
from services.jobs.db import make_engine, make_session_factory
from services.jobs.logs import adopt_library_loggers, configure_logging, mask_secrets
from services.jobs.models import Checkpoint, Job
from services.worker.settings import Settings, get_settings

log = logging.getLogger("services.worker.run_job")


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
    if isinstance(exc, DatasetError):
        code, param = exc.code, "training_file"
    elif isinstance(exc, ModelReferenceError):
        code, param = exc.code, "model"
    elif isinstance(exc, ConfigError):
        code, param = "invalid_config", "method.hyperparameters"
    elif isinstance(exc, CheckpointError):
        code = "checkpoint_error"
    elif isinstance(exc, TrainError):
        code = "training_error"
    elif isinstance(exc, StorageError):
        code = f"storage_{exc.code}"
    elif isinstance(exc, torch.OutOfMemoryError):
        code, text = "out_of_memory", "the GPU ran out of memory; lower batch_size or resolution, or use LoRA"
    elif isinstance(exc, MlflowException):
        code, text = "tracking_error", f"MLflow: {text}"
    else:
        text = f"{type(exc).__name__}: {text}"
    text = mask_secrets(text)
    return {"code": code, "message": text if len(text) <= 300 else text[:297] + "...", "param": param}


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
        self.run_id: str | None = None
        self.pairs_per_step = 1
        self.last_metrics: dict[str, float] = {}
        self._stop = False
        self._last_poll = self._last_progress = float("-inf")
        self._last_step_at = time.monotonic()

    # ------------------------------------------------------------------ callbacks

    def on_step(self, step: int, total: int, metrics: dict[str, float]) -> None:
        import mlflow

        now = time.monotonic()
        metrics = {**metrics, "pairs_per_s": self.pairs_per_step / max(now - self._last_step_at, 1e-6)}
        self._last_step_at = now
        self.last_metrics = metrics
        # Asynchronous: MLflow batches the per-step metrics in a thread; end_run flushes them.
        mlflow.log_metrics(metrics, step=step, synchronous=False)
        if step == total or now - self._last_progress >= self.settings.progress_interval_seconds:
            self._last_progress = now
            try:
                with self.sessions() as session:
                    jobstore.record_progress(session, self.job_id, step, total, metrics, worker_id=self.worker_id)
            except SQLAlchemyError as exc:  # a database hiccup must not kill an hour of training
                log.warning("progress not recorded", extra={"job_id": self.job_id, "error": type(exc).__name__})

    def should_stop(self) -> bool:
        if self.stop_signal is not None:
            return True
        if not self.main:
            return False  # rank 0's answer reaches every rank through the trainer's reduction
        now = time.monotonic()
        if not self._stop and now - self._last_poll >= self.settings.cancel_poll_seconds:
            self._last_poll = now
            try:
                with self.sessions() as session:
                    self._stop = jobstore.is_cancel_requested(session, self.job_id, self.worker_id)
            except SQLAlchemyError as exc:
                log.warning("cancel poll failed", extra={"job_id": self.job_id, "error": type(exc).__name__})
        return self._stop

    def on_checkpoint(self, path: Path, step: int) -> None:
        uri = job_uri(self.settings, self.job_id, "checkpoints", path.name)
        upload_checkpoint(path, uri)
        with self.sessions() as session:  # the row is written last: a checkpoint with a row is complete
            jobstore.add_checkpoint(session, self.job_id, step, uri, metrics=self.last_metrics)

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
            rows = session.execute(
                select(Checkpoint.step_number, Checkpoint.uri)
                .where(Checkpoint.job_id == self.job_id)
                .order_by(Checkpoint.step_number.desc(), Checkpoint.id.desc())
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
        from accelerate import PartialState

        from invdpo_core.config import parse_config
        from invdpo_core.train import TrainCallbacks, train

        state = PartialState()
        with self.sessions() as session:
            job = jobstore.get_job(session, self.job_id)
        if not jobstore.owns(job, self.worker_id):
            log.warning("the job is not this worker's to run", extra={"job_id": self.job_id})
            return 0
        try:
            config = parse_config({**job.config, "output_dir": str(self.out), "resume": True})
            self.pairs_per_step = config.batch_size * state.num_processes * config.gradient_accumulation_steps
            if self.main:
                self.start_tracking(job, config)
                restored = self.restore_checkpoint()
                if restored is not None:
                    self.event(f"Resuming from the checkpoint of step {restored}")
            state.wait_for_everyone()  # the other ranks read the restored checkpoint
            callbacks = TrainCallbacks(on_step=self.on_step, should_stop=self.should_stop)
            if self.main:
                callbacks.on_checkpoint = self.on_checkpoint
                callbacks.on_validation = self.on_validation
            result = train(config, callbacks, model_cache_dir=self.settings.cache_dir)
            if not self.main:
                return 0
            if result.stopped_early:
                return self.stopped()
            return self.succeeded(job, config, result.model_path)
        except Exception as exc:
            if not self.main:
                raise
            self.failed(exc)
            return 0

    def start_tracking(self, job: Job, config: Any) -> None:
        import mlflow

        from services.worker.tracking import start_job_run

        mlflow.set_tracking_uri(self.settings.mlflow_tracking_uri)
        self.run_id = start_job_run(
            job_id=self.job_id,
            run_id=job.mlflow_run_id,
            experiment=self.settings.mlflow_experiment,
            config=config,
            system_metrics=self.settings.system_metrics,
        )
        with self.sessions() as session:
            jobstore.set_run_info(session, self.job_id, mlflow_run_id=self.run_id)

    def stopped(self) -> int:
        """The trainer stopped early: after SIGTERM requeue, after a cancel request settle it as cancelled, and if
        the job is no longer this worker's (taken over by another) leave it alone."""
        import mlflow

        with self.sessions() as session:
            job = jobstore.get_job(session, self.job_id)
            if not jobstore.owns(job, self.worker_id):
                log.warning("the job is no longer this worker's; stopping", extra={"job_id": self.job_id})
                mlflow.end_run("RUNNING")  # the run is the new owner's now (not FINISHED by the atexit hook)
                return 0
            if self.stop_signal is not None and jobstore.requeue_job(session, self.job_id, self.worker_id):
                mlflow.end_run("SCHEDULED")
                self.enqueue()
                return 0
            # The run first: once the job is final, whoever reads it may read the run too.
            mlflow.end_run("KILLED")
            jobstore.settle_cancel(session, self.job_id, self.worker_id)
        self.cleanup()
        return 0

    def enqueue(self) -> None:
        """Send the job's message again. If the broker is down, the API's reconciler re-sends the queued job."""
        from services.jobs.queue import enqueue_training, make_celery

        try:
            enqueue_training(self.job_id, make_celery(self.settings.broker_url))
        except Exception as exc:
            log.warning("re-enqueue failed; the reconciler will", extra={"job_id": self.job_id, "error": str(exc)})

    def succeeded(self, job: Job, config: Any, model_path: Path | None) -> int:
        import mlflow

        from invdpo_core.storage import upload_dir
        from services.worker.evaluation import evaluate_job, summary
        from services.worker.tracking import default_model_name, register_model_once

        assert model_path is not None, "a finished run has a model"
        # Evaluated before registering: the version appears with its evidence already on the job and the run.
        evaluation = evaluate_job(config, model_path, self.out / "evaluation", self.settings)
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
        upload_dir(pipeline, job_uri(self.settings, self.job_id, "model"))
        name = job.registered_model_name or default_model_name(self.job_id, job.suffix)
        version, created = register_model_once(
            job_id=self.job_id,
            name=name,
            pipeline_dir=pipeline,
            resolution=config.resolution,
            inference_steps=config.validation_inference_steps,
        )
        model = f"models:/{name}/{version}"
        self.event(f"Model {'registered' if created else 'already registered'} as {model} (alias candidate)")
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
        log.error("job failed", extra={"job_id": self.job_id, "code": error["code"]}, exc_info=exc)
        if mlflow.active_run() is not None:
            with contextlib.suppress(Exception):  # MLflow may be what failed: the job must still be reported
                mlflow.end_run("FAILED")
        with self.sessions() as session:
            jobstore.add_event(session, self.job_id, "".join(traceback.format_exception(exc)), level="error")
            jobstore.finish_job(session, self.job_id, "failed", error, worker_id=self.worker_id)
        self.cleanup()

    def event(self, message: str) -> None:
        with self.sessions() as session:
            jobstore.add_event(session, self.job_id, message)

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
    main_rank = int(os.environ.get("RANK", "0")) == 0
    sessions = make_session_factory(make_engine(settings.database_url))
    runner = JobRunner(settings, sessions, args.job_id, args.worker_id, main_rank)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        # Only a flag: the trainer sees it before its next step, checkpoints and returns; then we requeue.
        runner.stop_signal = signal.Signals(signum).name
        log.warning("stop signal received", extra={"job_id": args.job_id, "signal": runner.stop_signal})

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
