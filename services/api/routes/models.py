"""Registered models: promote a version (alias `champion`), the one the serving command loads.

    mlflow models serve -m models:/NAME@champion --env-manager local

A worker registers each job's model with alias `candidate`; promotion moves `champion` through MLflow's aliases
(stages are deprecated). A project may promote only versions its own jobs registered (the `job_id` tag), and only
when the job's evaluation passes the promotion gate (INVDPO_PROMOTION_GATE, invdpo_core/gate.py), unless the
request says `force`: the version is then tagged with who forced it and why the gate refused. People who promote
by hand in the MLflow UI are not gated.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path
from pydantic import BaseModel, Field

from invdpo_core.gate import evaluate_gate
from services.api import schemas
from services.api.deps import CallerDep, SessionDep, SettingsDep
from services.jobs import jobstore
from services.jobs.logs import adopt_library_loggers

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/models", tags=["models"])

CHAMPION = "champion"
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": schemas.ErrorDetail, "description": "Missing or invalid API key."},
    404: {"model": schemas.ErrorDetail, "description": "No such model version registered by this project."},
    409: {
        "model": schemas.ErrorDetail,
        "description": "The job's evaluation fails the promotion gate (`promotion gate failed: <reasons>`); "
        "`force` overrides.",
    },
    503: {"model": schemas.ErrorDetail, "description": "The model registry (MLflow) did not answer."},
}
ModelName = Annotated[
    str, Path(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Registered model.")
]


class PromoteRequest(BaseModel):
    # MLflow keeps versions as 32-bit integers: a larger one is a bad request, not a registry failure.
    version: int = Field(ge=1, le=2**31 - 1, description="The registered model version to serve as `champion`.")
    force: bool = Field(
        False, description="Promote even if the promotion gate refuses; recorded as tags on the model version."
    )


class ModelAlias(BaseModel):
    name: str
    version: int
    alias: str
    job_id: str
    model_uri: str = Field(description="What `mlflow models serve -m` takes.")


@router.post("/{name}/promote", response_model=ModelAlias, responses=_ERRORS)
def promote_model(
    name: ModelName, body: PromoteRequest, session: SessionDep, caller: CallerDep, settings: SettingsDep
) -> ModelAlias:
    """Point alias `champion` of the registered model at `version` (a version a job of this project registered),
    if the job's evaluation passes the promotion gate or `force` is set."""
    from mlflow import MlflowClient  # imported on use: MLflow takes seconds to import and only this route needs it
    from mlflow.exceptions import MlflowException

    adopt_library_loggers()  # MLflow's own handlers would not mask credentials

    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    try:
        version = client.get_model_version(name, str(body.version))
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise HTTPException(404, "model version not found") from None
        log.warning("model registry error", extra={"error_code": exc.error_code})
        raise HTTPException(503, "model registry unavailable") from None
    except Exception as exc:  # connection refused, timeouts: the registry is down, not the request wrong
        log.warning("model registry unreachable", extra={"error": type(exc).__name__})
        raise HTTPException(503, "model registry unavailable") from None
    job_id = (version.tags or {}).get("job_id", "")
    # Another project's version (or one registered outside invdpo) is indistinguishable from a missing one.
    job = jobstore.get_job(session, job_id, caller.project_id) if jobstore.is_job_id(job_id) else None
    if job is None:
        raise HTTPException(404, "model version not found")
    rule = settings.gate_rule()
    passed, reasons = evaluate_gate((job.evaluation or {}).get("metrics") or {}, rule) if rule else (True, [])
    if not passed and not body.force:
        raise HTTPException(409, "promotion gate failed: " + "; ".join(reasons))
    try:
        if not passed:
            forced_by = f"project {caller.project_id}, key {caller.key_prefix}"
            client.set_model_version_tag(name, str(body.version), "promotion_forced_by", forced_by)
            client.set_model_version_tag(name, str(body.version), "promotion_gate_failed", "; ".join(reasons))
        client.set_registered_model_alias(name, CHAMPION, str(body.version))
    except Exception as exc:
        log.warning("model registry error", extra={"error": type(exc).__name__})
        raise HTTPException(503, "model registry unavailable") from None
    log.info("model promoted", extra={"model": name, "version": body.version, "job_id": job_id, "forced": not passed})
    return ModelAlias(
        name=name, version=body.version, alias=CHAMPION, job_id=job_id, model_uri=f"models:/{name}@{CHAMPION}"
    )
