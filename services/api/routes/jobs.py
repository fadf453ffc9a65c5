"""Fine-tuning jobs: create, list, get, cancel, pause, resume, events (paged and streamed) and checkpoints."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Depends, Header, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.sse import EventSourceResponse, ServerSentEvent
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from invdpo_core.config import RESERVED_FIELDS, TrainingConfig
from invdpo_core.storage import is_hub_id, is_s3, within_prefixes
from services.api import schemas
from services.api.deps import CallerDep, JobDep, SessionDep, SettingsDep
from services.api.settings import Settings
from services.jobs import jobstore
from services.jobs.logs import mask_secrets
from services.jobs.models import TERMINAL_STATUSES, Checkpoint, Job, JobEvent, Project
from services.jobs.queue import enqueue_training
from services.jobs.validation import validate_job_files

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning jobs"])

_MAX_JSON_INT = 2**53  # larger integers lose precision in JSON clients and overflow BIGINT columns
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": schemas.ErrorDetail, "description": "Missing or invalid API key."},
    403: {"model": schemas.ErrorDetail, "description": "The API key lacks the scope (jobs:read, jobs:write)."},
    404: {"model": schemas.ErrorDetail, "description": "No such job in this project."},
}
_CURSOR_ERROR: dict[int | str, dict[str, Any]] = {400: {"model": schemas.ErrorDetail, "description": "Bad cursor."}}


def _error(loc: Sequence[str | int], message: str, value: Any) -> dict[str, Any]:
    return {"type": "value_error", "loc": ["body", *loc], "msg": message, "input": value}


def _storable_errors(value: Any, loc: tuple[str | int, ...]) -> list[dict[str, Any]]:
    """Values the database cannot store as JSON: NaN/Infinity (which Python's JSON parser accepts), integers past
    2^53, NUL characters and lone surrogates (PostgreSQL rejects both in text and JSONB)."""
    if isinstance(value, float) and not math.isfinite(value):
        return [_error(loc, "must be a finite number", str(value))]
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _MAX_JSON_INT:
        return [_error(loc, "must be between -2^53 and 2^53", str(value))]
    if isinstance(value, dict):
        errors = []
        for k, v in value.items():
            if isinstance(k, str) and not _storable_text(k):
                errors.append(_error(loc, "keys must not contain NUL characters or lone surrogates", None))
            else:
                errors += _storable_errors(v, (*loc, k))
        return errors
    if isinstance(value, list):
        return [e for i, v in enumerate(value) for e in _storable_errors(v, (*loc, i))]
    if isinstance(value, str) and not _storable_text(value):
        return [_error(loc, "must not contain NUL characters or lone surrogates", None)]
    return []


def _storable_text(text: str) -> bool:
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def training_config(body: schemas.JobCreate, seed: int) -> TrainingConfig:
    """The job's full TrainingConfig: the hyperparameters the request set (validated with the body) and the
    job's own fields. A 422 if a value cannot be stored."""
    hyperparameters = body.method.hyperparameters.model_dump(exclude_unset=True)
    errors = _storable_errors(hyperparameters, ("method", "hyperparameters"))
    if errors:
        raise RequestValidationError(errors)
    return TrainingConfig(
        **hyperparameters,
        base_model=body.model,
        dataset=body.training_file,
        validation_dataset=body.validation_file,
        method=body.method.type,
        seed=seed,
    )


def _check_local_files(body: schemas.JobCreate) -> None:
    errors = []
    for name in ("model", "training_file", "validation_file"):
        uri = getattr(body, name)
        if uri is None or uri.startswith("s3://") or (name == "model" and is_hub_id(uri)):
            continue
        errors.append(_error((name,), "must be an s3:// URI" + (" or a hub id" if name == "model" else ""), uri))
    if errors:
        raise RequestValidationError(errors)


def _check_model_name(session: Session, body: schemas.JobCreate, job_id: str, project_id: int) -> None:
    """A job may register only into a model its project owns or a new name (the worker claims it at
    registration). Otherwise its version would land in another project's model and move that model's alias."""
    name = body.registered_model_name or jobstore.default_model_name(job_id, body.suffix)
    owner = jobstore.model_owner(session, name)
    if owner is not None and owner != project_id:
        field = "registered_model_name" if body.registered_model_name else "suffix"
        raise RequestValidationError([_error((field,), f"registered model {name} belongs to another project", name)])


def _check_prefixes(body: schemas.JobCreate, prefixes: list[str]) -> None:
    """The project's data must lie under its allowed prefixes (a hub id is a public model, not the store's)."""
    errors = []
    for name in ("model", "training_file", "validation_file"):
        uri = getattr(body, name)
        if uri is None or (name == "model" and not is_s3(uri) and is_hub_id(uri)) or within_prefixes(uri, prefixes):
            continue
        errors.append(_error((name,), f"must lie under one of this project's prefixes: {', '.join(prefixes)}", uri))
    if errors:
        raise RequestValidationError(errors)


def _check_project_limits(
    session: Session,
    project_id: int,
    resources: dict[str, int] | None,
    max_runtime: int,
    settings: Settings,
    idempotency_key: str | None = None,
    *,
    creating: bool = True,
) -> Job | None:
    """The project's limits on active jobs and on the GPU time they ask for, checked with the project row locked
    (for a new job, or a paused one resuming: `creating` False). Returns the job to replay if a request with the
    same idempotency key committed while this one waited for the lock: a retry is answered as a retry even when
    the project is at its limit."""
    usage = jobstore.lock_project_usage(session, project_id, settings.max_runtime_seconds)
    if idempotency_key is not None:
        existing = jobstore.find_by_idempotency_key(session, project_id, idempotency_key)
        if existing is not None:
            session.rollback()
            return existing
    retry = {"Retry-After": str(settings.retry_after_seconds)}
    max_jobs = usage["max_active_jobs"] or settings.max_active_jobs_per_project
    if usage["active_jobs"] >= max_jobs:
        session.rollback()
        raise HTTPException(429, f"too many active jobs in this project (limit {max_jobs})", headers=retry)
    max_hours = usage["max_gpu_hours"] if usage["max_gpu_hours"] is not None else settings.max_gpu_hours_per_project
    if max_hours <= 0:
        return None
    asked = jobstore.gpu_seconds(resources, max_runtime) / 3600
    if asked > max_hours:
        session.rollback()
        message = (
            f"asks for {asked:.4g} GPU-hours (nodes x gpus_per_node x max_runtime_seconds), more than this project's "
            f"limit of {max_hours:.4g}"
        )
        if not creating:
            raise HTTPException(409, message)
        raise RequestValidationError(
            [_error(("max_runtime_seconds",), f"{message}; lower it or resources", max_runtime)]
        )
    active = usage["gpu_seconds"] / 3600
    if active + asked > max_hours:
        session.rollback()
        raise HTTPException(
            429,
            f"GPU-hours limit of this project: its active jobs ask for {active:.4g} of {max_hours:.4g} GPU-hours, "
            f"this job for {asked:.4g} more",
            headers=retry,
        )
    return None


def _ts(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp())


def job_out(job: Job) -> schemas.Job:
    error = None
    if job.error_code is not None:
        error = schemas.JobError(code=job.error_code, message=job.error_message or "", param=job.error_param)
    return schemas.Job(
        id=job.id,
        status=job.status,  # type: ignore[arg-type]
        model=job.model,
        training_file=job.training_file,
        validation_file=job.validation_file,
        method=schemas.Method(
            type=job.method_type,  # type: ignore[arg-type]
            hyperparameters={k: v for k, v in job.config.items() if k not in RESERVED_FIELDS},
        ),
        seed=job.seed,
        suffix=job.suffix,
        registered_model_name=job.registered_model_name,
        metadata=job.metadata_,
        created_at=int(job.created_at.timestamp()),
        started_at=_ts(job.started_at),
        finished_at=_ts(job.finished_at),
        estimated_finish=_ts(job.estimated_finish),
        step=job.step,
        total_steps=job.total_steps,
        mlflow_run_id=job.mlflow_run_id,
        registered_model_version=job.registered_model_version,
        fine_tuned_model=job.fine_tuned_model,
        evaluation=schemas.JobEvaluation.model_validate(job.evaluation) if job.evaluation else None,
        error=error,
        resources=schemas.JobResources.model_validate(job.resources) if job.resources else None,
        max_runtime_seconds=job.max_runtime_seconds,
        runtime_seconds=round(job.runtime_seconds or 0.0, 1),
    )


def event_out(event: JobEvent) -> schemas.JobEvent:
    return schemas.JobEvent(
        id=f"ftevent-{event.id}",
        created_at=int(event.created_at.timestamp()),
        level=event.level,  # type: ignore[arg-type]
        type=event.type,  # type: ignore[arg-type]
        message=event.message,
        data=event.data,
    )


def checkpoint_out(checkpoint: Checkpoint) -> schemas.JobCheckpoint:
    return schemas.JobCheckpoint(
        id=f"ftckpt-{checkpoint.id}",
        fine_tuning_job_id=checkpoint.job_id,
        created_at=int(checkpoint.created_at.timestamp()),
        step_number=checkpoint.step_number,
        uri=mask_secrets(checkpoint.uri),
        metrics=checkpoint.metrics or {},
    )


def _parse_cursor(value: str | None, prefix: str) -> int | None:
    if value is None:
        return None
    digits = value.removeprefix(prefix)
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 18:
        raise HTTPException(400, "invalid cursor")
    return int(digits)


def _request_hash(body: schemas.JobCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json", exclude_unset=True), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def _replay(job: Job, request_hash: str, response: Response) -> schemas.Job:
    if job.request_hash != request_hash:
        raise HTTPException(409, "idempotency key reused with a different request")
    response.headers["Idempotent-Replayed"] = "true"
    return job_out(job)


Limit = Annotated[int, Query(ge=1, le=100, description="Page size.")]


@router.post(
    "",
    status_code=201,
    response_model=schemas.Job,
    responses={
        **_ERRORS,
        **schemas.BAD_BODY,
        409: {"model": schemas.ErrorDetail, "description": "Idempotency key reused with a different body."},
        413: {"model": schemas.ErrorDetail, "description": "Request body too large."},
        429: {
            "model": schemas.ErrorDetail,
            "description": "The project's active jobs are at its limit (jobs, or GPU-hours requested); retry later.",
        },
    },
)
def create_job(
    body: schemas.JobCreate,
    session: SessionDep,
    caller: CallerDep,
    settings: SettingsDep,
    request: Request,
    response: Response,
    background: BackgroundTasks,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=255,
            pattern=r"^[\x21-\x7e]+$",
            description="A retry with the same key and body returns the same job; a different body gets a 409.",
        ),
    ] = None,
) -> schemas.Job:
    """Create a fine-tuning job. It starts as `validating_files`; the model and the datasets are checked, then
    the job is `queued` for a GPU worker, or `failed` with an error naming the file at fault."""
    caller.require("jobs:write")
    if not settings.allow_local_files:
        _check_local_files(body)
    prefixes = session.scalar(select(Project.allowed_prefixes).where(Project.id == caller.project_id))
    if prefixes is not None:
        _check_prefixes(body, prefixes)
    request_hash = _request_hash(body)
    if idempotency_key is not None:
        existing = jobstore.find_by_idempotency_key(session, caller.project_id, idempotency_key)
        if existing is not None:
            return _replay(existing, request_hash, response)
    if body.resources is not None and body.resources.nodes > settings.max_nodes_per_job:
        limit = settings.max_nodes_per_job
        raise RequestValidationError(
            [_error(("resources", "nodes"), f"must be at most {limit} here", body.resources.nodes)]
        )
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    config = training_config(body, seed)
    if body.resources is not None and body.resources.nodes > 1 and config.inversion_cache == "disk":
        # Each node of a TrainJob has its own disk: a rank would miss the entries another node's ranks wrote.
        where, value = ("method", "hyperparameters", "inversion_cache"), "disk"
        raise RequestValidationError([_error(where, "disk needs one disk for all nodes; use memory or none", value)])
    job_id = jobstore.new_job_id()
    _check_model_name(session, body, job_id, caller.project_id)
    max_runtime = body.max_runtime_seconds or settings.max_runtime_seconds
    resources = body.resources.model_dump() if body.resources else None
    replay = _check_project_limits(session, caller.project_id, resources, max_runtime, settings, idempotency_key)
    if replay is not None:
        return _replay(replay, request_hash, response)
    job = Job(
        id=job_id,
        project_id=caller.project_id,
        model=body.model,
        training_file=body.training_file,
        validation_file=body.validation_file,
        method_type=body.method.type,
        config=config.model_dump(mode="json"),
        seed=seed,
        suffix=body.suffix,
        registered_model_name=body.registered_model_name,
        metadata_=body.metadata,
        resources=body.resources.model_dump() if body.resources is not None else None,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        total_steps=config.max_steps,
        attempt=0,
        max_runtime_seconds=max_runtime,
    )
    try:
        jobstore.create_job(session, job)
    except IntegrityError:
        # A concurrent request with the same idempotency key won the race: answer as its retry.
        existing = jobstore.find_by_idempotency_key(session, caller.project_id, idempotency_key or "")
        if existing is None:
            raise
        return _replay(existing, request_hash, response)
    log.info("job created", extra={"job_id": job.id, "project_id": caller.project_id, "key": caller.key_prefix})
    state = request.app.state
    background.add_task(validate_job_files, state.session_factory, job.id, settings, celery=state.celery)
    return job_out(job)


@router.get("", response_model=schemas.JobList, responses={**_ERRORS, **_CURSOR_ERROR})
def list_jobs(
    session: SessionDep,
    caller: CallerDep,
    after: Annotated[str | None, Query(max_length=64, description="Id of the last job of the previous page.")] = None,
    limit: Limit = 20,
    status: Annotated[schemas.JobStatus | None, Query(description="Only jobs in this status.")] = None,
) -> schemas.JobList:
    """The project's jobs, newest first."""
    caller.require("jobs:read")
    try:
        jobs, has_more = jobstore.list_jobs(session, caller.project_id, after=after, limit=limit, status=status)
    except jobstore.InvalidCursor:
        raise HTTPException(400, "invalid cursor") from None
    return schemas.JobList(data=[job_out(j) for j in jobs], has_more=has_more)


@router.get("/{job_id}", response_model=schemas.Job, responses=_ERRORS)
async def get_job(job: JobDep) -> schemas.Job:
    """One job with its progress, timestamps, MLflow run and model version once known, and error if it failed."""
    return job_out(job)


@router.post(
    "/{job_id}/cancel",
    response_model=schemas.Job,
    responses={**_ERRORS, 409: {"model": schemas.ErrorDetail, "description": "The job already finished."}},
)
def cancel_job(job: JobDep, session: SessionDep, caller: CallerDep) -> schemas.Job:
    """Cancel: a job not yet running is cancelled at once; a running one becomes `cancel_requested` and then
    `cancelled` when its worker stops. Cancelling a cancelled job is a no-op."""
    caller.require("jobs:write")
    cancelled = jobstore.cancel_job(session, job.id)
    if cancelled is None:
        raise HTTPException(409, "job already finished")
    return job_out(cancelled)


@router.post(
    "/{job_id}/pause",
    response_model=schemas.Job,
    responses={**_ERRORS, 409: {"model": schemas.ErrorDetail, "description": "The job cannot be paused now."}},
)
def pause_job(job: JobDep, session: SessionDep, caller: CallerDep) -> schemas.Job:
    """Pause: a queued job is `paused` at once; a running one becomes `pause_requested`, its worker writes a
    checkpoint and lets the GPU go, and the job is `paused`. Pausing a paused job is a no-op. Resume it with
    POST .../resume."""
    caller.require("jobs:write")
    paused = jobstore.pause_job(session, job.id)
    if paused is None:
        raise HTTPException(409, f"a {job.status} job cannot be paused (only queued or running ones)")
    return job_out(paused)


@router.post(
    "/{job_id}/resume",
    response_model=schemas.Job,
    responses={
        **_ERRORS,
        409: {"model": schemas.ErrorDetail, "description": "The job is not paused, or asks for more than the limit."},
        429: {"model": schemas.ErrorDetail, "description": "The project is at its limit of active jobs or GPU-hours."},
    },
)
def resume_job(
    job: JobDep, session: SessionDep, caller: CallerDep, settings: SettingsDep, request: Request
) -> schemas.Job:
    """Resume a paused job: it is `queued` again, within the project's limits, and the worker that claims it
    continues from its last checkpoint, in the same MLflow run. Resuming a job that is not paused is a 409."""
    caller.require("jobs:write")
    if job.status != "paused":
        raise HTTPException(409, f"only a paused job can be resumed; this one is {job.status}")
    max_runtime = job.max_runtime_seconds or settings.max_runtime_seconds
    _check_project_limits(session, caller.project_id, job.resources, max_runtime, settings, creating=False)
    if not jobstore.resume_job(session, job.id):
        session.rollback()
        raise HTTPException(409, "only a paused job can be resumed")
    session.commit()
    try:  # after the commit: if the broker is down, the reconciler sends the queued job
        enqueue_training(job.id, request.app.state.celery)
    except Exception as exc:
        log.warning("enqueue failed; the reconciler will", extra={"job_id": job.id, "error": type(exc).__name__})
    session.refresh(job)
    return job_out(job)


@router.get("/{job_id}/events", response_model=schemas.JobEventList, responses={**_ERRORS, **_CURSOR_ERROR})
def list_job_events(
    job: JobDep,
    session: SessionDep,
    after: Annotated[str | None, Query(max_length=64, description="Id of the last event already seen.")] = None,
    limit: Limit = 20,
) -> schemas.JobEventList:
    """The job's events, oldest first (status messages, and `metrics` events with the training curves)."""
    events, has_more = jobstore.list_events(session, job.id, after=_parse_cursor(after, "ftevent-"), limit=limit)
    return schemas.JobEventList(data=[event_out(e) for e in events], has_more=has_more)


def _poll(session_factory: sessionmaker[Session], job_id: str, after: int | None) -> tuple[str, list[JobEvent]]:
    with session_factory() as session:
        # Status first: a job's final event is committed with its final status, so none is missed.
        status = session.scalar(select(Job.status).where(Job.id == job_id)) or "failed"
        events, _ = jobstore.list_events(session, job_id, after=after, limit=500)
        return status, list(events)


def _stream_cursor(
    after: Annotated[str | None, Query(max_length=64, description="Id of the last event already seen.")] = None,
    last_event_id: Annotated[str | None, Header(max_length=64, description="Set by EventSource on reconnect.")] = None,
) -> int | None:
    # A dependency: a bad cursor is a 400 before the stream starts (inside the generator it would abort a 200).
    return _parse_cursor(last_event_id or after, "ftevent-")


@router.get(
    "/{job_id}/events/stream",
    response_class=EventSourceResponse,
    responses={**_ERRORS, **_CURSOR_ERROR},
)
async def stream_job_events(
    job: JobDep,
    request: Request,
    settings: SettingsDep,
    cursor: Annotated[int | None, Depends(_stream_cursor)],
) -> AsyncIterator[ServerSentEvent]:
    """Server-sent events: every event of the job as it happens (data: the JobEvent JSON, id: its id), then one
    `done` event with the final status (or `paused`). Closes after INVDPO_EVENTS_STREAM_MAX_SECONDS; reconnect with
    Last-Event-ID (EventSource does this itself) to continue where it stopped."""
    job_id, session_factory = job.id, request.app.state.session_factory
    deadline = time.monotonic() + settings.events_stream_max_seconds
    while True:
        status, events = await run_in_threadpool(_poll, session_factory, job_id, cursor)
        for event in events:
            yield ServerSentEvent(data=event_out(event), id=f"ftevent-{event.id}")
            cursor = event.id
        # Paused: nothing more happens until a resume (a new stream follows that).
        if (status in TERMINAL_STATUSES or status == "paused") and len(events) < 500:
            yield ServerSentEvent(data={"status": status}, event="done")
            return
        if time.monotonic() > deadline:
            return
        await asyncio.sleep(settings.events_poll_seconds)


@router.get("/{job_id}/checkpoints", response_model=schemas.JobCheckpointList, responses={**_ERRORS, **_CURSOR_ERROR})
def list_job_checkpoints(
    job: JobDep,
    session: SessionDep,
    after: Annotated[str | None, Query(max_length=64, description="Id of the last checkpoint already seen.")] = None,
    limit: Limit = 20,
) -> schemas.JobCheckpointList:
    """The job's saved checkpoints, oldest first, with the step and the metrics at that step."""
    checkpoints, has_more = jobstore.list_checkpoints(
        session, job.id, after=_parse_cursor(after, "ftckpt-"), limit=limit
    )
    return schemas.JobCheckpointList(data=[checkpoint_out(c) for c in checkpoints], has_more=has_more)
