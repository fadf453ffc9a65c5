"""Liveness, readiness and Prometheus metrics, for compose healthchecks, Kubernetes probes and `helm test`."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from services.api import schemas
from services.jobs.queue import ping_broker

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=schemas.Health)
def healthz() -> schemas.Health:
    """Liveness: the process answers. Checks nothing else, so a database outage does not restart every pod."""
    return schemas.Health(status="ok")


def _database_ok(request: Request) -> bool:
    try:
        with request.app.state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:
        return False


@router.get("/readyz", response_model=schemas.Health, responses={503: {"model": schemas.Health}})
async def readyz(request: Request, response: Response) -> schemas.Health:
    """Readiness: the database and the broker both answer; 503 (naming which one does not) otherwise."""
    database = await run_in_threadpool(_database_ok, request)
    broker = await run_in_threadpool(ping_broker, request.app.state.settings.broker_url, request.app.state.celery)
    if not (database and broker):
        response.status_code = 503
    return schemas.Health(
        status="ok" if database and broker else "unavailable",
        database="ok" if database else "unavailable",
        broker="ok" if broker else "unavailable",
    )


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
