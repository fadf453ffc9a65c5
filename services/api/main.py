"""The control-plane app: `create_app()` for tests and embedding, `app` for `uvicorn services.api.main:app`."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from services.api.metrics import Metrics
from services.api.middleware import BodyLimitMiddleware, RequestContextMiddleware
from services.api.routes import health, jobs, models
from services.api.settings import Settings, get_settings
from services.jobs import reconciler
from services.jobs.db import make_engine, make_session_factory, migrate
from services.jobs.logs import configure_logging, mask_secrets
from services.jobs.queue import make_celery

log = logging.getLogger(__name__)

DESCRIPTION = """Fine-tune text-to-image diffusion models with Inversion-DPO or Diffusion-DPO.

Authenticate with `Authorization: Bearer <key>` (keys come from `invdpo-admin create-key --project P`).
Jobs go `validating_files` -> `queued` -> `running` -> `succeeded` | `failed` | `cancelled`."""


def _json_safe(value: Any) -> Any:
    """422s echo the inputs: mask credentials in them, and what JSON cannot carry (lone surrogates, NaN)."""
    if isinstance(value, str):
        return mask_secrets(value.encode("utf-8", "backslashreplace").decode("utf-8"))
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {_json_safe(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """422 with FastAPI's error list; each `msg` starts with the field's path (method.hyperparameters.beta: ...)."""
    assert isinstance(exc, RequestValidationError)
    errors = []
    for error in exc.errors():
        path = ".".join(str(p) for p in error.get("loc", ())[1:])  # loc starts with where: body, query, header...
        errors.append({**error, "msg": f"{path}: {error['msg']}" if path else error["msg"]})
    return JSONResponse({"detail": _json_safe(jsonable_encoder(errors))}, status_code=422)


async def _reconcile_forever(app: FastAPI) -> None:
    state = app.state
    while True:
        await asyncio.sleep(state.settings.reconcile_interval_seconds)
        try:
            report = await run_in_threadpool(reconciler.run_once, state.session_factory, state.settings, state.celery)
        except Exception:
            log.exception("reconcile pass failed")
            continue
        for reason in ("requeued", "resumed", "failed", "cancelled", "revalidate"):
            state.metrics.jobs_enqueued.labels(reason).inc(len(getattr(report, reason)))


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level)
    engine = make_engine(settings.database_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.migrate_on_startup:
            await run_in_threadpool(migrate, engine)
        loop = None
        if settings.reconcile_interval_seconds > 0:
            loop = asyncio.create_task(_reconcile_forever(app))
        yield
        if loop is not None:
            loop.cancel()
        engine.dispose()

    app = FastAPI(
        title="invdpo",
        description=DESCRIPTION,
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    app.state.celery = make_celery(settings.broker_url)
    app.state.metrics = Metrics(app.state.session_factory)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    # Added last, so outermost: the request id and latency cover every answer, 413s included.
    app.add_middleware(RequestContextMiddleware, metrics=app.state.metrics)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.include_router(jobs.router)
    app.include_router(models.router)
    app.include_router(health.router)
    return app


app = create_app()
