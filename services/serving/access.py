"""Who may generate with which model version: API keys, projects and the promotion gate's verdict.

Everything the model server knows about tenancy lives here, so that it can follow the control plane's records
without importing the control plane anywhere else. Today a version belongs to the project whose job registered it
(its `job_id` tag), and its verdict is the promotion gate evaluated on that job's evaluation, or a forced promotion
(the tags POST /v1/models/{name}/promote writes with `force`). The gate's rule is the API's setting,
INVDPO_PROMOTION_GATE, read from the same environment variable into the server's own settings.
"""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from invdpo_core.gate import GateRule, evaluate_gate
from services.jobs import jobstore
from services.jobs.db import make_engine, make_session_factory
from services.jobs.keys import hash_key
from services.jobs.logs import adopt_library_loggers, configure_logging  # noqa: F401  (the server's logging)
from services.jobs.models import ApiKey

FORCED_TAG = "promotion_forced_by"  # written by the promote route next to `promotion_gate_failed`


def open_sessions(database_url: str) -> sessionmaker[Session]:
    """Sessions on the control plane's job database (the server only reads it)."""
    return make_session_factory(make_engine(database_url, pool_size=4, max_overflow=4))


def project_for_key(session: Session, raw_key: str) -> int | None:
    """The project of an unrevoked API key, or None."""
    return session.scalars(
        select(ApiKey.project_id).where(ApiKey.key_hash == hash_key(raw_key), ApiKey.revoked_at.is_(None))
    ).first()


def version_project(session: Session, tags: Mapping[str, str]) -> int | None:
    """The project whose job registered a model version (from its tags), or None if no invdpo job did."""
    job_id = tags.get("job_id", "")
    job = jobstore.get_job(session, job_id) if jobstore.is_job_id(job_id) else None
    return job.project_id if job is not None else None


def version_allowed(session: Session, tags: Mapping[str, str], rule: GateRule | None) -> tuple[bool, str]:
    """(may it be served, why): a version the promotion gate `rule` (None: off) passes on its job's evaluation,
    or one whose promotion was forced through the API. A version no invdpo job registered has no evidence and is
    refused."""
    if tags.get(FORCED_TAG):
        return True, f"promotion forced by {tags[FORCED_TAG]}"
    job_id = tags.get("job_id", "")
    job = jobstore.get_job(session, job_id) if jobstore.is_job_id(job_id) else None
    if job is None:
        return False, "not registered by an invdpo job (no job_id tag of a known job)"
    if rule is None:
        return True, "promotion gate off"
    passed, reasons = evaluate_gate((job.evaluation or {}).get("metrics") or {}, rule)
    return passed, ("promotion gate passed: " if passed else "promotion gate failed: ") + "; ".join(reasons)
