"""The model server's HTTP app: the OpenAI Images API over the served versions, health, readiness, metrics.

    POST /v1/images/generations {model, prompt, n, size, response_format: "b64_json", seed?, steps?}
        -> {created, data: [{b64_json}]}

Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, so OpenAI clients show them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from services.serving import access
from services.serving.batching import Batcher, QueueFull
from services.serving.metrics import Metrics
from services.serving.models import Follower, ModelSlot
from services.serving.settings import Settings, get_settings

log = logging.getLogger(__name__)


class ImageRequest(BaseModel):
    # OpenAI clients may send fields this server has no use for (quality, style, user...): ignored, not refused.
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="A registered model this server serves; optional if it serves one.")
    prompt: str = Field(min_length=1)
    n: int = Field(1, ge=1)
    size: str | None = Field(None, description="WIDTHxHEIGHT; only the model's trained size, which is the default.")
    response_format: Literal["b64_json"] | None = Field(None, description="Only b64_json: no image is stored.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Image i of the request uses seed + i.")
    steps: int | None = Field(None, ge=1, description="Denoising steps; the model's default if absent.")


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None,
        kind: str = "invalid_request_error", headers: dict[str, str] | None = None,
    ):  # fmt: skip
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers


def _error_body(message: str, kind: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    body = _error_body(exc.message, exc.kind, exc.param, exc.code)
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """The first problem, as OpenAI reports it: a 400 naming the field (the bad value is not echoed)."""
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0]
    loc = [str(part) for part in first["loc"] if part != "body"]
    param = ".".join(loc) or None
    message = f"{param}: {first['msg']}" if param else f"request body: {first['msg']}"
    return JSONResponse(_error_body(message, "invalid_request_error", param, "invalid_value"), status_code=400)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = Metrics()
    follower = Follower(settings, access.open_sessions(settings.database_url), metrics)
    for name in follower.slots:
        metrics.add_model(name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batchers = {
            name: Batcher(slot, settings.max_batch_size, settings.max_wait_ms, settings.max_queue, metrics)
            for name, slot in follower.slots.items()
        }
        tasks = [asyncio.create_task(batcher.run(), name=f"batcher-{name}") for name, batcher in batchers.items()]
        app.state.batchers = batchers
        follower.start()
        yield
        follower.stop()
        for task in tasks:
            task.cancel()

    app = FastAPI(title="invdpo model server", lifespan=lifespan)
    app.state.settings, app.state.metrics, app.state.follower = settings, metrics, follower
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)

    @app.post("/v1/images/generations")
    async def generate_images(
        body: ImageRequest, request: Request, authorization: Annotated[str | None, Header()] = None
    ) -> JSONResponse:
        started = time.monotonic()
        raw_key = (authorization or "").removeprefix("Bearer ").strip()
        project = await run_in_threadpool(_project, follower, raw_key) if raw_key else None
        if project is None:
            raise ApiError(401, "missing or invalid API key", code="invalid_api_key")
        name = _model_name(body.model, follower)
        slot = follower.slots[name]
        served = slot.current
        if served is None:
            raise ApiError(
                503, f"model {name} has no version loaded yet", kind="server_error", code="model_not_ready",
                headers={"Retry-After": str(settings.retry_after_seconds)},
            )  # fmt: skip
        if served.project_id != project:
            # Another project's model looks like one that does not exist.
            raise ApiError(404, f"model {name} not found", param="model", code="model_not_found")
        size = _check(body, served.resolution, settings)
        batcher: Batcher = request.app.state.batchers[name]
        try:
            future = batcher.submit(body.prompt, body.n, _seed(body.seed), body.steps, size)
        except QueueFull:
            metrics.rejected.labels(name, "queue_full").inc()
            raise ApiError(
                429, f"too many requests waiting for model {name}; retry later", kind="rate_limit_error",
                code="queue_full", headers={"Retry-After": str(settings.retry_after_seconds)},
            ) from None  # fmt: skip
        status = "500"
        try:
            version, images = await asyncio.wait_for(future, settings.request_timeout_seconds)
            status = "200"
        except asyncio.TimeoutError:
            status = "504"
            raise ApiError(504, "generation timed out", kind="server_error", code="timeout") from None
        except Exception:
            raise ApiError(500, "generation failed", kind="server_error", code="generation_failed") from None
        finally:
            metrics.request_seconds.labels(name, status).observe(time.monotonic() - started)
        return JSONResponse(
            {"created": int(time.time()), "data": [{"b64_json": image} for image in images]},
            headers={"X-Model-Version": str(version)},
        )

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        """Always 200 while the process runs; says what each model serves and why a newer version is not."""
        return {"status": "ok", "models": {name: _slot_status(slot) for name, slot in follower.slots.items()}}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        """200 once every model has a version loaded (Kubernetes sends traffic only then), else 503."""
        models = {name: _slot_status(slot) for name, slot in follower.slots.items()}
        ready = all(slot.current is not None for slot in follower.slots.values())
        return JSONResponse({"ready": ready, "models": models}, status_code=200 if ready else 503)

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _project(follower: Follower, raw_key: str) -> int | None:
    with follower.sessions() as session:
        return access.project_for_key(session, raw_key)


def _model_name(model: str | None, follower: Follower) -> str:
    if model is None:
        if len(follower.slots) == 1:
            return next(iter(follower.slots))
        raise ApiError(400, "model: required (this server serves several)", param="model", code="invalid_value")
    if model not in follower.slots:
        raise ApiError(400, f"model: {model!r} is not served here", param="model", code="invalid_value")
    return model


def _check(body: ImageRequest, resolution: int, settings: Settings) -> int:
    """The limits that depend on the settings or the model; returns the image side in pixels."""
    if len(body.prompt) > settings.max_prompt_chars:
        raise ApiError(
            400, f"prompt: longer than {settings.max_prompt_chars} characters", param="prompt", code="invalid_value"
        )
    if body.n > settings.max_images_per_request:
        raise ApiError(
            400, f"n: at most {settings.max_images_per_request} images per request", param="n", code="invalid_value"
        )
    if body.steps is not None and body.steps > settings.max_steps:
        raise ApiError(400, f"steps: at most {settings.max_steps}", param="steps", code="invalid_value")
    supported = f"{resolution}x{resolution}"
    if body.size is not None and body.size != supported:
        raise ApiError(
            400, f"size: {body.size!r} is not supported; this model generates {supported}", param="size",
            code="invalid_value",
        )  # fmt: skip
    return resolution


def _seed(seed: int | None) -> int:
    # Image i uses seed + i: keep the last one within the generator's 64 bits.
    return seed if seed is not None else secrets.randbelow(2**62)


def _slot_status(slot: ModelSlot) -> dict[str, Any]:
    status: dict[str, Any] = {"alias": slot.alias, "version": slot.current.version if slot.current else None}
    if slot.held_back is not None:
        version, reason = slot.held_back
        status["not_served"] = {"version": version or None, "reason": reason}
    return status
