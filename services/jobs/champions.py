"""Champions moved outside invdpo: MLflow's UI (or any MLflow client with the rights) can point a model's
`champion` alias at a version the promotion gate refused, without going through POST /v1/models/{name}/promote.
The database knows each version's verdict (jobstore.version_verdict), so one pass over the registry finds them.

Each such champion is reported once per move: a warning event on the version's job, a warning log line, and the
count as the gauge `invdpo_ungated_champions` on the API's /metrics. The model server refuses to serve it anyway.
The API runs a pass after each reconciler pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from services.jobs import jobstore
from services.jobs.models import RegisteredModel

log = logging.getLogger(__name__)

CHAMPION = "champion"


@dataclass(frozen=True)
class UngatedChampion:
    name: str
    version: int
    job_id: str | None  # None: a version no invdpo job registered


def check_champions(session_factory: sessionmaker[Session], tracking_uri: str) -> list[UngatedChampion]:
    """Every invdpo-owned model whose champion is a version that may not serve (refused by the gate and not
    forced through the API, or unknown to invdpo). Reports the ones not reported before."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    champions: dict[str, int] = {}
    token = None
    while True:  # one call per 1000 models: the aliases come with the search
        page = client.search_registered_models(max_results=1000, page_token=token)
        champions.update({m.name: int(m.aliases[CHAMPION]) for m in page if CHAMPION in (m.aliases or {})})
        token = page.token
        if not token:
            break
    found = []
    with session_factory() as session:
        for model in session.scalars(select(RegisteredModel).where(RegisteredModel.name.in_(champions))).all():
            version = champions[model.name]
            row = jobstore.version_verdict(session, model.name, version)
            if row is not None and row.allowed:
                model.champion_alert_version = None  # a later bad move is reported again
                session.commit()
                continue
            found.append(UngatedChampion(model.name, version, row.job_id if row else None))
            # A conditional UPDATE: of several API replicas checking at once, one reports this move.
            claim = session.execute(
                update(RegisteredModel)
                .where(
                    RegisteredModel.name == model.name,
                    or_(
                        RegisteredModel.champion_alert_version.is_(None),
                        RegisteredModel.champion_alert_version != version,
                    ),
                )
                .values(champion_alert_version=version)
                .execution_options(synchronize_session=False)
            )
            session.commit()
            if claim.rowcount != 1:  # type: ignore[attr-defined]
                continue  # already reported
            why = "the promotion gate refused it" if row is not None else "no invdpo job registered it"
            message = (
                f"champion of {model.name} was moved outside invdpo to version {version}, which {why}; "
                "the model server will not serve it. Promote an allowed version, or force one through the API."
            )
            log.warning("ungated champion", extra={"model": model.name, "version": version})
            if row is not None and row.job_id is not None:
                jobstore.add_event(session, row.job_id, message, level="warn")
    return found
