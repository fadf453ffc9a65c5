"""Registered models: list and read a project's models, promote a version (alias `champion`), the one the serving
command loads.

    mlflow models serve -m models:/NAME@champion --env-manager local

A worker registers each job's model with alias `candidate` and records the version in the database with the
promotion gate's verdict (INVDPO_PROMOTION_GATE, invdpo_core/gate.py). The database, not MLflow's tags, says which
project owns a model name (the first to register it) and whether a version may be promoted: another project's
model is indistinguishable from a missing one (404). A version the gate refused is promoted only with `force`, by
a key with scope models:force and with a `reason`; the key and the reason are recorded on the version (and as
MLflow tags, for people looking in the MLflow UI). A champion moved in the MLflow UI is checked by
services/jobs/champions.py.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path
from pydantic import BaseModel, Field, model_validator

from invdpo_core.gate import evaluate_gate
from services.api import schemas
from services.api.deps import CallerDep, SessionDep, SettingsDep
from services.jobs import jobstore
from services.jobs.logs import adopt_library_loggers
from services.jobs.models import ModelVersion, RegisteredModel

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/models", tags=["models"])

CHAMPION = "champion"
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": schemas.ErrorDetail, "description": "Missing or invalid API key."},
    403: {
        "model": schemas.ErrorDetail,
        "description": "The API key lacks the scope (models:read, models:promote, models:force).",
    },
    404: {"model": schemas.ErrorDetail, "description": "No such model (version) registered by this project."},
    409: {
        "model": schemas.ErrorDetail,
        "description": "The promotion gate refused the version (`promotion gate failed: <reasons>`); `force` "
        "overrides.",
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
        False,
        description="Promote even if the promotion gate refused the version. Needs scope models:force and a "
        "`reason`; both the key and the reason are recorded on the version.",
    )
    reason: str | None = Field(
        None, min_length=1, max_length=1000, description="Why the gate is overridden; required with force."
    )

    @model_validator(mode="after")
    def _reason_with_force(self) -> PromoteRequest:
        if self.force and not (self.reason and self.reason.strip()):
            raise ValueError("reason: required when force is true")
        return self


class ModelVersionOut(BaseModel):
    version: int
    job_id: str | None
    gate_passed: bool | None = Field(description="The promotion gate's verdict at registration; null: not recorded.")
    gate_reasons: list[str] = Field(description="What the gate measured against what.")
    forced_by: str | None = Field(description="The key that promoted this version past the gate.")
    forced_reason: str | None
    promoted_at: int | None = Field(description="Last promotion through the API (Unix seconds).")


class RegisteredModelOut(BaseModel):
    name: str
    created_at: int
    versions: list[ModelVersionOut] = Field(description="Newest first; empty in listings.")


class ModelList(BaseModel):
    data: list[RegisteredModelOut]


class ModelAlias(BaseModel):
    name: str
    version: int
    alias: str
    job_id: str
    model_uri: str = Field(description="What `mlflow models serve -m` takes.")


def _owned_model(session: SessionDep, name: str, project_id: int) -> RegisteredModel:
    model = session.get(RegisteredModel, name)
    if model is None or model.project_id != project_id:
        raise HTTPException(404, "model not found")
    return model


def _version_out(row: ModelVersion) -> ModelVersionOut:
    return ModelVersionOut(
        version=row.version, job_id=row.job_id, gate_passed=row.gate_passed, gate_reasons=row.gate_reasons or [],
        forced_by=row.forced_by, forced_reason=row.forced_reason,
        promoted_at=int(row.promoted_at.timestamp()) if row.promoted_at else None,
    )  # fmt: skip


@router.get("", response_model=ModelList, responses=_ERRORS)
def list_models(session: SessionDep, caller: CallerDep) -> ModelList:
    """The registered models this project owns."""
    caller.require("models:read")
    models = jobstore.project_models(session, caller.project_id)
    return ModelList(
        data=[RegisteredModelOut(name=m.name, created_at=int(m.created_at.timestamp()), versions=[]) for m in models]
    )


@router.get("/{name}", response_model=RegisteredModelOut, responses=_ERRORS)
def get_model(name: ModelName, session: SessionDep, caller: CallerDep) -> RegisteredModelOut:
    """One of this project's models with its versions: each one's job, gate verdict and promotions."""
    caller.require("models:read")
    model = _owned_model(session, name, caller.project_id)
    versions = [_version_out(v) for v in jobstore.model_versions(session, name) if v.project_id == caller.project_id]
    return RegisteredModelOut(name=model.name, created_at=int(model.created_at.timestamp()), versions=versions)


@router.post("/{name}/promote", response_model=ModelAlias, responses={**_ERRORS, **schemas.BAD_BODY})
def promote_model(
    name: ModelName, body: PromoteRequest, session: SessionDep, caller: CallerDep, settings: SettingsDep
) -> ModelAlias:
    """Point alias `champion` of the registered model at `version` (a version a job of this project registered),
    if the promotion gate passed it or `force` is set (scope models:force, with a `reason`)."""
    from mlflow import MlflowClient  # imported on use: MLflow takes seconds to import and only this route needs it

    caller.require("models:promote")
    if body.force:
        caller.require("models:force")
    _owned_model(session, name, caller.project_id)
    row = jobstore.version_verdict(session, name, body.version)
    if row is None or row.project_id != caller.project_id or row.job_id is None:
        raise HTTPException(404, "model version not found")
    passed, reasons = row.gate_passed, row.gate_reasons or []
    if passed is None:  # registered before verdicts were recorded: the gate judges the job's evaluation now
        job = jobstore.get_job(session, row.job_id)
        rule = settings.gate_rule()
        metrics = ((job.evaluation if job else None) or {}).get("metrics") or {}
        passed, reasons = evaluate_gate(metrics, rule) if rule else (True, [])
        row.gate_passed, row.gate_reasons = passed, reasons
    if not passed and not body.force:
        session.rollback()
        raise HTTPException(409, "promotion gate failed: " + "; ".join(reasons))

    adopt_library_loggers()  # MLflow's own handlers would not mask credentials
    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    try:
        if not passed:
            client.set_model_version_tag(name, str(body.version), "promotion_forced_by", caller.who)
            client.set_model_version_tag(name, str(body.version), "promotion_forced_reason", body.reason or "")
            client.set_model_version_tag(name, str(body.version), "promotion_gate_failed", "; ".join(reasons))
        client.set_registered_model_alias(name, CHAMPION, str(body.version))
    except Exception as exc:  # connection refused, timeouts, MLflow errors: the registry failed, not the request
        log.warning("model registry error", extra={"error": type(exc).__name__})
        raise HTTPException(503, "model registry unavailable") from None
    forced = not passed
    jobstore.record_promotion(session, row, forced_by=caller.who if forced else None, reason=body.reason)
    log.info("model promoted", extra={"model": name, "version": body.version, "job_id": row.job_id, "forced": forced})
    return ModelAlias(
        name=name, version=body.version, alias=CHAMPION, job_id=row.job_id, model_uri=f"models:/{name}@{CHAMPION}"
    )
