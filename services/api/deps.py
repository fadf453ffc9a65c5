"""Dependencies of the routes, as `Annotated` aliases."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.api.security import hash_key
from services.api.settings import Settings
from services.jobs import jobstore
from services.jobs.models import ApiKey, Job


def get_db(request: Request) -> Iterator[Session]:
    with request.app.state.session_factory() as session:
        yield session


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


# scope="function": the session is closed when the route returns, not held while the response streams out.
SessionDep = Annotated[Session, Depends(get_db, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]

_bearer = HTTPBearer(auto_error=False, description="An API key made with `invdpo-admin create-key --project P`.")


@dataclass(frozen=True)
class Caller:
    project_id: int
    key_prefix: str


def get_caller(
    session: SessionDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Caller:
    if credentials is None or not credentials.credentials:
        raise HTTPException(401, "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"})
    row = session.execute(
        select(ApiKey.project_id, ApiKey.prefix).where(
            ApiKey.key_hash == hash_key(credentials.credentials), ApiKey.revoked_at.is_(None)
        )
    ).first()
    if row is None:
        raise HTTPException(401, "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"})
    return Caller(project_id=row.project_id, key_prefix=row.prefix)


CallerDep = Annotated[Caller, Depends(get_caller)]


def get_job(
    session: SessionDep,
    caller: CallerDep,
    job_id: Annotated[str, Path(description="A job id, ftjob-...")],
) -> Job:
    # Malformed ids and other projects' jobs are indistinguishable from missing ones: 404 either way.
    job = jobstore.get_job(session, job_id, caller.project_id) if jobstore.is_job_id(job_id) else None
    if job is None:
        raise HTTPException(404, "job not found")
    return job


JobDep = Annotated[Job, Depends(get_job)]
