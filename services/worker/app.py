"""The GPU worker: `celery -A services.worker.app worker -Q gpu,default --concurrency 1 --prefetch-multiplier 1`.

Tasks: `invdpo.train_job(job_id)` on the `gpu` queue, `invdpo.reconcile()` on `default` (one reconciler pass, as
the API runs periodically). The Celery configuration is services.jobs.queue's, shared with the API.

The database, not Celery, decides whether a job runs. The task claims the job with an atomic conditional UPDATE
(`jobstore.claim_job`): a duplicate or redelivered message finds the job taken and returns; a message for a job
whose worker died (heartbeat older than INVDPO_HEARTBEAT_TIMEOUT_SECONDS) takes it over and resumes it.

The Redis visibility-timeout trap: messages are acknowledged early (`task_acks_late=False`, services.jobs.queue), so
Redis never redelivers a job that trains for longer than the visibility timeout. A message lost with a dead
worker is not lost work: the job's database heartbeat goes stale, the reconciler (the API's loop, or
invdpo.reconcile) sends it again, and the next claim resumes it from its last checkpoint.

Processes:
- the Celery main process touches INVDPO_HEARTBEAT_FILE (container probes) from a thread, and on warm shutdown
  (SIGTERM) passes SIGTERM on to the training processes, which checkpoint and put the job back in the queue;
- the pool process runs the task: it claims the job, starts a fresh `accelerate launch ... -m
  services.worker.run_job` (one process per visible GPU), renews the job's database heartbeat while it waits,
  kills the training process if a cancel request is not honoured within INVDPO_STOP_GRACE_SECONDS, and queues the
  job again (resume from the last checkpoint) if the training process died without reporting, until
  INVDPO_MAX_ATTEMPTS. It never imports torch, so CUDA is never
  initialised in a process that forks, and every job gives all GPU memory back when its process exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import psutil
from celery import signals
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from invdpo_core.config import TrainingConfig
from services.jobs import jobstore
from services.jobs.db import make_engine, make_session_factory
from services.jobs.logs import configure_logging
from services.jobs.queue import RECONCILE_TASK, TRAIN_TASK, enqueue_training, make_celery
from services.jobs.runs import end_job_run
from services.worker.settings import Settings, get_settings

log = logging.getLogger(__name__)

RUN_JOB = "services.worker.run_job"
_MAIN_PID = os.getpid()  # the Celery main process imports this module; pool processes are forked from it later

app = make_celery(get_settings().broker_url)


@lru_cache
def sessions() -> sessionmaker[Session]:
    # Pre-ping: after a database restart or failover the pooled connections are dead; test each before use.
    return make_session_factory(make_engine(get_settings().database_url, pool_pre_ping=True))


# ---------------------------------------------------------------- process lifecycle


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    configure_logging(get_settings().log_level)  # JSON lines, credentials masked (instead of Celery's format)


def _touch(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError as exc:
        log.warning("cannot touch the heartbeat file", extra={"path": str(path), "error": exc.strerror})


def _beat_forever(path: Path, interval: float) -> None:
    while True:
        _touch(path)
        time.sleep(interval)


@signals.worker_init.connect
def _start_heartbeat(**_: Any) -> None:
    # A thread of the main process: it keeps beating while the pool process waits on an hour-long training.
    settings = get_settings()
    interval = min(settings.heartbeat_interval_seconds, 30.0)
    threading.Thread(
        target=_beat_forever, args=(Path(settings.heartbeat_file), interval), name="heartbeat", daemon=True
    ).start()


@signals.worker_process_init.connect
def _fresh_pool_process(**_: Any) -> None:
    sessions.cache_clear()  # never share the parent's database connections across fork


@signals.worker_shutting_down.connect
def _stop_training(**_: Any) -> None:
    """Warm shutdown (SIGTERM to the main process, as `docker stop` or Kubernetes send it): ask the training
    processes to checkpoint and requeue their job. Celery then waits for the task, which waits for them."""
    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline = proc.cmdline()
            # The training ranks only: the accelerate launcher (which ignores SIGTERM) must not tear them down.
            if RUN_JOB in cmdline and "accelerate.commands.launch" not in cmdline:
                proc.send_signal(signal.SIGTERM)
                log.warning("asked the training process to checkpoint and requeue", extra={"pid": proc.pid})
        except psutil.Error:
            continue


# ---------------------------------------------------------------- training


def visible_gpus() -> int:
    """GPUs this worker may use, counted without initialising CUDA here: CUDA_VISIBLE_DEVICES, else nvidia-smi."""
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    if devices is not None:
        return len([d for d in devices.split(",") if d.strip() and not d.strip().startswith("-")])
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


def launch_command(job_id: str, worker_id: str, processes: int, mixed_precision: str) -> list[str]:
    """`accelerate launch` of run_job, through this interpreter (the same environment as the worker)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    cmd += ["--num_machines", "1", "--mixed_precision", mixed_precision, "--dynamo_backend", "no"]
    if processes > 1:
        with socket.socket() as s:  # a free rendezvous port: two workers on one host must not collide
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd += ["--multi_gpu", "--main_process_port", str(port)]
    return [*cmd, "-m", RUN_JOB, job_id, "--worker-id", worker_id]


def _describe(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"


@app.task(name=TRAIN_TASK)
def train_job(job_id: str) -> None:
    """Claim the job and train it in a fresh process; return at once if the job is not claimable."""
    settings = get_settings()
    if not jobstore.is_job_id(job_id):
        log.warning("message ignored: not a job id", extra={"job_id": job_id[:64]})
        return
    with sessions()() as session:
        job = jobstore.get_job(session, job_id)
        resources = (job.resources if job is not None else None) or {}
    if resources.get("nodes", 1) > 1:  # more than one node: a Kubeflow Trainer TrainJob, watched from here
        from services.worker.trainjob import run_trainjob

        nodes, gpus = resources["nodes"], resources["gpus_per_node"]
        run_trainjob(job_id, nodes, gpus, settings, sessions(), enqueue=lambda job_id: enqueue_training(job_id, app))
        return
    worker_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
    with sessions()() as session:
        claimed = jobstore.claim_job(
            session, job_id, worker_id, heartbeat_timeout_seconds=settings.heartbeat_timeout_seconds
        )
        job = jobstore.get_job(session, job_id) if claimed else None
    if job is None:
        log.info("job not claimable: running elsewhere, finished or cancelled", extra={"job_id": job_id})
        return
    processes = settings.num_processes or max(1, visible_gpus())
    config = TrainingConfig.model_validate(job.config)  # validated when the job was created
    limit = jobstore.runtime_limit(job, settings.max_runtime_seconds)
    runtime_left = limit - job.runtime_seconds
    cmd = launch_command(job_id, worker_id, processes, config.mixed_precision)
    log.info("training started", extra={"job_id": job_id, "worker_id": worker_id, "processes": processes})
    # SIGTERM is ignored while the launcher starts, so that it inherits the ignore: a SIGTERM to the whole process
    # group must reach the training process (run_job installs its own handler: checkpoint, then requeue) and not
    # kill the launcher under it. A pool process keeps ignoring it until the training ends, so that the process
    # reporting for the job outlives it; the main process (solo pool) keeps Celery's warm-shutdown handler.
    in_pool = os.getpid() != _MAIN_PID
    previous = _ignore_sigterm()
    try:
        proc = subprocess.Popen(cmd)
        if not in_pool:
            _restore_sigterm(previous)
        returncode, over_limit = _wait(proc, job_id, worker_id, settings, runtime_left)
    finally:
        _restore_sigterm(previous)
    _after_exit(
        job_id, worker_id, returncode, settings.max_attempts, runtime_limit=limit if over_limit else None,
        tracking_uri=settings.mlflow_tracking_uri,
    )  # fmt: skip


def _ignore_sigterm() -> Any:
    try:
        return signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:  # not the main thread (threads pool): leave signals alone
        return None


def _restore_sigterm(previous: Any) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def _training_processes(worker_id: str) -> list[psutil.Process]:
    """Training processes of this claim still alive, wherever they were reparented (if their launcher died)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if worker_id in cmdline and "accelerate.commands.launch" not in cmdline:
            found.append(proc)
    return found


def _wait(
    proc: subprocess.Popen[bytes], job_id: str, worker_id: str, settings: Settings, runtime_left: float
) -> tuple[int, bool]:
    """Wait for the launcher, then for any training process that outlived it, renewing the job's heartbeat and
    adding to its runtime meanwhile (also through model loading, caching and uploads, when no step reports
    progress). A cancel request is honoured here too, whatever the training process is doing (importing, loading,
    evaluating, uploading): it gets stop_grace_seconds to stop by itself, then it is killed and the caller settles
    the cancel. A pause request gets SIGTERM to the training processes (outside the training steps they let the
    job go at once; in them they checkpoint first) and checkpoint_grace_seconds. So does the runtime limit: the
    trainer stops itself at it, and checkpoint_grace_seconds later it is killed. Returns the exit status and
    whether it was killed for the runtime limit."""
    returncode = None
    tick = min(settings.heartbeat_interval_seconds, max(settings.cancel_poll_seconds, 0.2))
    started = time.monotonic()
    last_beat, counted, stop_seen, over_limit = float("-inf"), started, None, False
    grace = settings.stop_grace_seconds
    while True:
        if returncode is None:
            try:
                returncode = proc.wait(timeout=tick)
            except subprocess.TimeoutExpired:
                pass
        if returncode is not None:
            alive = _training_processes(worker_id)
            if not alive:
                _add_runtime(job_id, time.monotonic() - counted)
                return returncode, over_limit
            psutil.wait_procs(alive, timeout=tick)
        now = time.monotonic()
        try:
            with sessions()() as session:
                if now - last_beat >= settings.heartbeat_interval_seconds:
                    jobstore.heartbeat(session, job_id, worker_id)
                    jobstore.add_runtime(session, job_id, now - counted)
                    last_beat = counted = now
                # True also when the job was taken over by another worker: then it must stop as well.
                if stop_seen is None and jobstore.is_cancel_requested(session, job_id, worker_id):
                    stop_seen = now
                    job = jobstore.get_job(session, job_id)
                    if job is not None and job.status == "pause_requested" and job.claimed_by == worker_id:
                        grace = settings.checkpoint_grace_seconds
                        for training in _training_processes(worker_id):
                            with contextlib.suppress(psutil.Error):
                                training.send_signal(signal.SIGTERM)
        except SQLAlchemyError as exc:
            log.warning("job heartbeat failed", extra={"job_id": job_id, "error": type(exc).__name__})
        if stop_seen is not None and now - stop_seen >= grace:
            _kill(proc, worker_id)
            log.warning("training process killed: it did not stop when asked", extra={"job_id": job_id})
            stop_seen = float("inf")  # once
        if not over_limit and now - started >= runtime_left + settings.checkpoint_grace_seconds:
            _kill(proc, worker_id)
            log.warning("training process killed: past the job's runtime limit", extra={"job_id": job_id})
            over_limit = True


def _kill(proc: subprocess.Popen[bytes], worker_id: str) -> None:
    for training in [psutil.Process(proc.pid), *_training_processes(worker_id)]:
        with contextlib.suppress(psutil.Error):
            training.kill()


def _add_runtime(job_id: str, seconds: float) -> None:
    try:
        with sessions()() as session:
            jobstore.add_runtime(session, job_id, seconds)
    except SQLAlchemyError as exc:  # the last interval is lost: the job's runtime undercounts by it
        log.warning("runtime not recorded", extra={"job_id": job_id, "error": type(exc).__name__})


def _after_exit(
    job_id: str,
    worker_id: str,
    returncode: int,
    max_attempts: int,
    *,
    runtime_limit: float | None = None,
    tracking_uri: str | None = None,
) -> None:
    """If the training process ended without ending the job (killed by the OOM killer, a segfault, a lost GPU),
    queue the job again to resume from its last checkpoint (and its MLflow run), as if its worker had died; after
    max_attempts, fail it with the reason. Killed past the job's runtime limit (`runtime_limit` given): fail it as
    runtime_limit. A job ended here gets its MLflow run (on `tracking_uri`) ended too: the dead process left it
    running. (User errors never get here: the training process reports them itself.)"""

    def end_run(status: Literal["FAILED", "KILLED"]) -> None:
        if tracking_uri is not None:
            end_job_run(sessions(), tracking_uri, job_id, status)

    with sessions()() as session:
        job = jobstore.get_job(session, job_id)
        if not jobstore.owns(job, worker_id):
            log.info("training process done", extra={"job_id": job_id, "returncode": returncode})
            return
        if jobstore.settle_cancel(session, job_id, worker_id):
            end_run("KILLED")
            return
        if jobstore.settle_pause(session, job_id, worker_id):  # paused at its last stored checkpoint
            return
        if runtime_limit is not None:
            jobstore.finish_job(
                session, job_id, "failed", jobstore.runtime_limit_error(runtime_limit, job.step), worker_id=worker_id
            )
            end_run("FAILED")
            return
        how = f"the training process {_describe(returncode)} before reporting"
        if job.attempt < max_attempts and jobstore.requeue_job(
            session, job_id, worker_id, lost=f"{how[0].upper()}{how[1:]} (attempt {job.attempt} of {max_attempts})"
        ):
            log.error("training process died; job queued again", extra={"job_id": job_id, "returncode": returncode})
            try:
                enqueue_training(job_id, app)
            except Exception as exc:  # the broker is down: the reconciler re-sends the queued job
                log.warning("re-enqueue failed; the reconciler will", extra={"job_id": job_id, "error": str(exc)})
            return
        error: jobstore.JobErrorInfo = {
            "code": "training_process_died",
            "message": f"{how}, {job.attempt} times; checkpoints are kept",
            "param": None,
        }
        jobstore.finish_job(session, job_id, "failed", error, worker_id=worker_id)
        end_run("FAILED")
        log.error("training process died", extra={"job_id": job_id, "returncode": returncode})


# ---------------------------------------------------------------- light work


@app.task(name=RECONCILE_TASK)
def reconcile() -> None:
    """One reconciler pass (re-send lost messages, resume jobs of dead workers, re-validate stuck jobs)."""
    from services.jobs.reconciler import run_once

    run_once(sessions(), get_settings(), celery=app)
