"""Who may generate with which model version: API keys, projects and the promotion gate's verdict.

Everything the model server knows about tenancy lives here, so that it can follow the control plane's records
without importing the control plane anywhere else. A version belongs to the project whose job registered it, and may
serve if the gate passed it or its promotion was forced through the API: both read from the job database's
`model_versions` rows the worker and the promote route write (jobstore.version_verdict), never from MLflow's tags,
which anyone with write access to the registry could set. Versions recorded before verdicts were (gate_passed
null) are judged now by the gate's rule on their job's evaluation; the rule is the API's setting,
INVDPO_PROMOTION_GATE, read from the same environment variable into the server's own settings.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from invdpo_core.gate import GateRule, evaluate_gate
from services.jobs import jobstore
from services.jobs.db import make_engine, make_session_factory
from services.jobs.keys import hash_key
from services.jobs.logs import adopt_library_loggers, configure_logging  # noqa: F401  (the server's logging)
from services.jobs.models import ApiKey


def open_sessions(database_url: str) -> sessionmaker[Session]:
    """Sessions on the control plane's job database (the server only reads it)."""
    return make_session_factory(make_engine(database_url, pool_size=4, max_overflow=4))


def project_for_key(session: Session, raw_key: str) -> int | None:
    """The project of an unrevoked API key, or None."""
    return session.scalars(
        select(ApiKey.project_id).where(ApiKey.key_hash == hash_key(raw_key), ApiKey.revoked_at.is_(None))
    ).first()


def version_project(session: Session, name: str, version: int) -> int | None:
    """The project whose job registered a model version, or None if no invdpo job did."""
    row = jobstore.version_verdict(session, name, version)
    return row.project_id if row is not None and row.job_id is not None else None


def version_allowed(session: Session, name: str, version: int, rule: GateRule | None) -> tuple[bool, str]:
    """(may it be served, why): a version the promotion gate passed when the worker registered it, or one whose
    promotion was forced through the API. A version no invdpo job registered has no evidence and is refused."""
    row = jobstore.version_verdict(session, name, version)
    if row is None or row.job_id is None:
        return False, "not registered by an invdpo job"
    if row.forced_by:
        return True, f"promotion forced by {row.forced_by}"
    passed, reasons = row.gate_passed, list(row.gate_reasons or [])
    if passed is None:  # recorded before verdicts were: judged now, as the promote route does
        if rule is None:
            return True, "promotion gate off"
        job = jobstore.get_job(session, row.job_id)
        passed, reasons = evaluate_gate(((job.evaluation if job else None) or {}).get("metrics") or {}, rule)
    if not reasons:
        return bool(passed), "promotion gate off" if passed else "promotion gate failed"
    return bool(passed), ("promotion gate passed: " if passed else "promotion gate failed: ") + "; ".join(reasons)
